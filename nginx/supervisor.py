"""`make cluster`'s supervisor: the active health checker open-source nginx does not have (nginx/README.md).

Every `interval` seconds it asks each instance's `/readyz`, with a short timeout:
- an instance whose process exited is reported and started again (same id, same port), with a growing delay
  when it keeps dying young;
- an instance that fails `down_after` checks in a row (503, refused, no answer) is marked `down` in nginx.conf
  and nginx reloaded, so the clients `ip_hash` sends there go to the others; one 200 brings it back;
- an instance that accepts connections but answers nothing for `hung_after` seconds (stopped, deadlocked) is
  killed: its sockets close, so its clients reconnect elsewhere at once instead of waiting out nginx's
  `proxy_read_timeout`; then it is started again.
nginx itself is started again if it exits. Reports go to `report` (stderr by default) and to `events`.
"""
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

YOUNG = 10.0  # seconds: an instance that dies sooner after its start is restarted after a growing delay
MAX_DELAY = 30.0


def probe(url, timeout):
    """`ready`, `unready` (an answer other than 200, or the connection reset), `refused` (nothing listens) or
    `silent` (connected, no answer within `timeout`)."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=timeout) as response:
            return "ready" if response.status == 200 else "unready"
    except urllib.error.HTTPError:
        return "unready"
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return "refused"
        return "silent" if isinstance(exc.reason, (TimeoutError, socket.timeout)) else "unready"
    except (TimeoutError, socket.timeout):
        return "silent"
    except OSError:
        return "unready"


def nginx_workers(master_pid):
    """The pids of an nginx master's worker processes, each with its title."""
    try:
        children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    except OSError:
        return {}
    titles = {}
    for pid in children:
        try:
            titles[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            pass
    return titles


class Supervisor:
    def __init__(self, cluster, *, interval=1.0, timeout=2.0, down_after=2, hung_after=6.0, report=None):
        self.cluster = cluster
        self.interval, self.timeout, self.down_after, self.hung_after = interval, timeout, down_after, hung_after
        self.report = report or (lambda line: print(f"cluster: {line}", file=sys.stderr, flush=True))
        self.events = []           # (instance id or "nginx", what): for tests and the curious
        self.down = set()          # instance ids marked down in nginx.conf
        self.failures = {}         # instance id -> failed checks in a row
        self.silent_since = {}     # instance id -> when it stopped answering
        self.young = {}            # instance id -> times in a row it died within YOUNG seconds of its start
        self.not_before = {}       # instance id -> when it may be started again
        self._changes = []         # (who, what, line) said once nginx has the change
        self._stopping = threading.Event()
        self._thread = None

    def _say(self, who, what, line):
        self.events.append((who, what))
        self.report(line)

    def run(self):
        """Check until stop() (or a KeyboardInterrupt in the thread that runs it)."""
        while not self._stopping.wait(self.interval):
            self.check()

    def start(self):
        """run() in a thread of its own (tests); stop() ends it."""
        self._thread = threading.Thread(target=self.run, name="cluster-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(30)

    def check(self):
        marked = set(self.down)
        for inst in self.cluster.instances:
            if self._stopping.is_set():
                return
            self._check(inst)
        nginx = self.cluster.nginx
        if nginx is not None and nginx.poll() is not None:
            self._say("nginx", "exited", f"nginx exited with code {nginx.returncode}; starting it again")
            self.cluster.start_nginx(down=self._down_instances())
        elif self.down != marked:
            self.reload()
        for change in self._changes:  # nginx has them now
            self._say(*change)
        self._changes.clear()

    def _down_instances(self):
        return [i for i in self.cluster.instances if i.id in self.down]

    def _check(self, inst):
        now = time.monotonic()
        if inst.proc.poll() is not None:
            self._restart(inst, now)
            return
        state = probe(inst.url, self.timeout)
        if state == "ready":
            self.failures[inst.id] = 0
            self.silent_since.pop(inst.id, None)
            if inst.id in self.down:
                self.down.discard(inst.id)
                self._changes.append((inst.id, "ready", f"{inst.id} is ready: back in nginx"))
            return
        self.failures[inst.id] = self.failures.get(inst.id, 0) + 1
        if self.failures[inst.id] >= self.down_after and inst.id not in self.down:
            self.down.add(inst.id)
            self._changes.append((inst.id, "down", f"{inst.id} is not ready ({state}): marked down in nginx"))
        if state != "silent":
            self.silent_since.pop(inst.id, None)
            return
        since = self.silent_since.setdefault(inst.id, now - self.timeout)
        if self.hung_after is not None and now - since >= self.hung_after:
            self._say(inst.id, "hung", f"{inst.id} (pid {inst.proc.pid}) has answered nothing for "
                                       f"{now - since:.0f} s: killing it")
            inst.proc.send_signal(signal.SIGKILL)  # a stopped process cannot act on SIGTERM
            inst.proc.wait()
            self.silent_since.pop(inst.id, None)
            self._restart(inst, time.monotonic())

    def _restart(self, inst, now):
        """Start an instance whose process ended; one that keeps dying young waits 2, 4, 8 ... 30 s between."""
        if now < self.not_before.get(inst.id, 0.0):
            return
        young = self.young.get(inst.id, 0) + 1 if now - inst.started_at < YOUNG else 0
        self.young[inst.id] = young
        self.not_before[inst.id] = now + min(2 ** young, MAX_DELAY) if young else 0.0
        self.down.add(inst.id)  # until it answers ready
        self._say(inst.id, "exited", f"{inst.id} (pid {inst.proc.pid}) exited with code {inst.proc.returncode}; "
                                     "starting it again")
        self.failures[inst.id] = 0
        inst.start()

    def reload(self, timeout=10.0):
        """Write nginx.conf with the instances marked down and reload nginx; returns once the workers that held
        the old configuration no longer accept connections (nginx starts the new ones, then tells the old ones)."""
        nginx = self.cluster.nginx
        self.cluster.write_conf(down=self._down_instances())
        old = nginx_workers(nginx.pid)
        nginx.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = nginx_workers(nginx.pid)
            if set(now) - set(old) and all(pid not in now or "shutting down" in now[pid] for pid in old):
                return True
            time.sleep(0.02)
        self.report("nginx did not reload in time (see nginx-error.log)")
        return False
