"""The embedded default store: nx-27017 (MongoDB wire protocol over SQLite) as a child process.

Same driver, same queries as a real MongoDB. Data lives under `data_dir`; the child gets its own pid and log
file there (nx-27017's defaults are shared paths under /tmp), and dies with us even on kill -9 (PDEATHSIG).
"""
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class EmbeddedMongoError(RuntimeError):
    pass


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent():
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

    @property
    def url(self):
        return f"mongodb://{self.host}:{self.port}/"

    @property
    def pid_file(self):
        return self.data_dir / "nx-27017.pid"

    def start(self, timeout=30.0):
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale_pid_file()
        self.port = self.port or free_port(self.host)
        cmd = [sys.executable, "-m", "nx_27017.nx_27017", "--host", self.host, "--port", str(self.port),
               "--data-dir", str(self.data_dir / "db"), "--pid-file", str(self.pid_file),
               "--log-file", str(self.data_dir / "nx-27017.log")]
        log.info("starting embedded MongoDB-wire server (nx-27017) on %s:%s, data in %s",
                 self.host, self.port, self.data_dir)
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._wait_until_ready(timeout)
        return self

    def _clear_stale_pid_file(self):
        try:
            pid = int(self.pid_file.read_text().strip() or 0)
        except FileNotFoundError:
            return
        except ValueError:
            pid = 0
        if pid and _pid_alive(pid):
            raise EmbeddedMongoError(f"another nx-27017 (pid {pid}) is using {self.data_dir}: "
                                     "stop it, or give this Parley its own --data-dir")
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
                    self.stop()
                    raise EmbeddedMongoError(f"nx-27017 did not answer ping within {timeout:g} s") from None
                time.sleep(0.01)

    def stop(self, timeout=10.0):
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
