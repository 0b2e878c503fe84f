"""The embedded default store: nx-27017 (MongoDB wire protocol over SQLite) as a child process.

Same driver, same queries as a real MongoDB. Data lives under `data_dir`; the child gets its own pid and log
file there (nx-27017's defaults are shared paths under /tmp), and dies with us even on kill -9 (PDEATHSIG).

Security: nx-27017 0.8.1 has no authentication, so it listens on loopback only, and its files are private to
the user running Parley (directories 0700, files 0600: the child runs with umask 077). Any local process of
another user can still connect to the port: docs/security.md says so.

Stopping: the child runs in a session of its own, so a Ctrl-C in Parley's terminal is Parley's alone; Parley ends
its replies (written to the store) and then stops the store (`stop()`: SIGTERM, then SIGKILL after 10 s).

Supervision: `supervise()` restarts the child on the same port if it dies (back-off 0.5 s doubling to 10 s);
the driver reconnects by itself, and /readyz answers 503 until it has.
"""
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0  # seconds between restarts of a store that keeps dying
STABLE_AFTER = 30.0  # a store that ran this long before dying restarts after BACKOFF_MIN again


class EmbeddedMongoError(RuntimeError):
    pass


_handed_out = set()


def _ephemeral_range():
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def free_port(host="127.0.0.1"):
    """A port free now, for a process we start later. Picked below the kernel's ephemeral range: a port from
    bind(0) is one the kernel also gives outgoing connections, and another process's connection to the store
    took one before our instance could listen on it (CI: "parley-2 exited with code 1", address in use)."""
    span = _ephemeral_range()
    if span and span[0] > 11000:
        low, high = _share(10000, span[0])
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(low, high)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _share(low, high):
    """This process's share of [low, high): the test suite's parallel workers (pytest-xdist's gw0, gw1, ...)
    each pick ports from their own part, so two never pick the same port before either listens on it."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count and count.isdigit() and int(count) > 1):
        return low, high
    size = (high - low) // int(count)
    start = low + int(worker[2:]) % int(count) * size
    return start, start + size


def _child_setup():
    os.umask(0o077)  # every file the store creates is private: 0600, directories 0700
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the parent's stop() still ends the child on a clean exit


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie or a reused pid is not our server
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"nx_27017" in cmdline or b"nx-27017" in cmdline


class EmbeddedMongo:
    def __init__(self, data_dir, *, host="127.0.0.1", port=None, db_name="parley"):
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.db_name = db_name
        self.process = None
        self.restarts = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor = None

    @property
    def url(self):
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def pid_file(self):
        return self.data_dir / "nx-27017.pid"

    def start(self, timeout=30.0):
        return self.spawn().wait_ready(timeout)

    def spawn(self):
        """Start the child without waiting for it: it needs ~0.5 s to listen, which the caller can spend on
        other work (server.py imports the app meanwhile) before wait_ready()."""
        make_private(self.data_dir)
        self._clear_stale_pid_file()
        self.port = self.port or free_port(self.host)
        self._spawn()
        return self

    def wait_ready(self, timeout=30.0):
        log.info("starting embedded MongoDB-wire server (nx-27017) on %s:%s, data in %s",
                 self.host, self.port, self.data_dir)
        try:
            self._wait_until_ready(timeout)
        except EmbeddedMongoError:
            self.stop()
            raise
        return self

    def _spawn(self):
        cmd = [sys.executable, "-m", "nx_27017.nx_27017", "--host", self.host, "--port", str(self.port),
               "--data-dir", str(self.data_dir / "db"), "--pid-file", str(self.pid_file),
               "--log-file", str(self.data_dir / "nx-27017.log")]
        with self._lock:
            if self._stopping.is_set():
                raise EmbeddedMongoError("stopping")
            # A session of its own: the terminal's Ctrl-C (SIGINT to the foreground process group) reaches
            # Parley alone, which ends its replies in the store and then stops the store (stop()).
            self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            stdin=subprocess.DEVNULL, preexec_fn=_child_setup,
                                            start_new_session=True)

    def supervise(self):
        """Restart the store whenever it dies, until stop(). The thread must outlive the child it forks
        (PDEATHSIG follows the forking thread), so it runs until stop()."""
        self._supervisor = threading.Thread(target=self._watch, name="nx-27017-supervisor", daemon=True)
        self._supervisor.start()
        return self

    def _watch(self):
        delay = BACKOFF_MIN
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER:
                delay = BACKOFF_MIN
            log.error("embedded store (nx-27017) exited with code %s; restarting in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                self._clear_stale_pid_file()
                self._spawn()
                self._wait_until_ready(30.0)
            except EmbeddedMongoError as exc:
                if not self._stopping.is_set():
                    log.error("embedded store restart failed: %s", exc)
                continue
            self.restarts += 1
            log.warning("embedded store restarted (pid %s, restart %d)", self.process.pid, self.restarts)

    def _clear_stale_pid_file(self):
        try:
            pid = int(self.pid_file.read_text().strip() or 0)
        except FileNotFoundError:
            return
        except ValueError:
            pid = 0
        if pid and _pid_alive(pid):
            raise EmbeddedMongoError(f"the embedded store in {self.data_dir} is in use (nx-27017, pid {pid}): is "
                                     "Parley already running? Stop it, or give this one its own --data-dir")
        log.info("removing stale pid file %s", self.pid_file)
        self.pid_file.unlink(missing_ok=True)

    def _wait_until_ready(self, timeout):
        """Poll the port cheaply (every 10 ms: a refused connect fails at once), then ping once it listens. A
        ping loop alone found the server ~0.1-0.35 s late (each failed probe waits out its selection timeout)."""
        from pymongo import MongoClient  # the sync client, only for this start-up probe
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EmbeddedMongoError(f"nx-27017 exited with code {self.process.returncode}; "
                                         f"see {self.data_dir / 'nx-27017.log'}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.25).close()
                with MongoClient(self.url, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000) as client:
                    client.admin.command("ping")
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise EmbeddedMongoError(f"nx-27017 did not answer ping within {timeout:g} s") from None
                time.sleep(0.01)

    def stop(self, timeout=10.0):
        with self._lock:
            self._stopping.set()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("nx-27017 did not stop within %g s; killing it", timeout)
            self.process.kill()
            self.process.wait()
        self.pid_file.unlink(missing_ok=True)


def make_private(path):
    """Create `path` 0700 and take group/other access away from what an earlier run left there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o700)
        for name in files:
            try:
                os.chmod(os.path.join(root, name), 0o600)
            except FileNotFoundError:
                pass


def start_early(argv=None):
    """For `python server.py`: spawn the embedded store as soon as the options are read, before the app's
    imports, so that the two overlap. None when the options name a MongoDB, cannot be read, or the store cannot
    start here: server.main() then goes the usual way (and reports the problem)."""
    from services.operations import settings
    try:
        config = settings.resolve(argv)
        settings.check_environment()  # (a pipeline's key variable fails this too: then the store starts later)
    except settings.SettingsError:
        return None
    if config.mongo_url or config.cluster:
        return None
    umask = os.umask(0o077)  # the data dir is private (docs/security.md); the imports that follow are not
    try:
        return EmbeddedMongo(os.path.join(config.data_dir, "mongo")).spawn()
    except (EmbeddedMongoError, OSError):
        return None
    finally:
        os.umask(umask)
