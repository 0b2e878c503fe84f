"""A Parley cluster on loopback: one store, N instances, nginx in front (`make cluster`; the cluster tests).

    python nginx/cluster.py [--instances 3] [--port 8080]     # Ctrl-C stops everything

As a command it supervises (nginx/supervisor.py): an instance that exits or hangs is reported and started again,
one that is not ready is taken out of nginx until it is; Ctrl-C stops everything and removes the temporary
directory.

Everything runs as real processes: nx-27017 (or --mongo-url), `server.py --cluster` per instance on a free
port, and `nginx -p <workdir> -c <workdir>/nginx.conf` built from nginx/parley.conf (backends, listen port and
static root rewritten). Each process has its own pid and log file under the work directory.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nginx.supervisor import Supervisor  # noqa: E402
from services.storage.embedded_mongo import EmbeddedMongo, free_port  # noqa: E402

NGINX = os.environ.get("PARLEY_NGINX", "/usr/sbin/nginx")
TEMPLATE = ROOT / "nginx" / "parley.conf"


def nginx_binary():
    """The nginx executable, or None."""
    return NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")


SERVER_LINES = re.compile(r"(?m)^    server 127\.0\.0\.1:\d+( [^;\n]*)?;\n(?:    server [^\n]*\n)*")


def render_conf(workdir, *, port, backends, down=(), template=TEMPLATE):
    """A complete nginx.conf: nginx/parley.conf inside an `http {}` whose state all lives in `workdir`. Each
    backend port gets the template's first `server` line's parameters as shipped; the ports in `down` are marked
    `down` (ip_hash keeps the other clients where they are)."""
    body = Path(template).read_text()
    found = SERVER_LINES.search(body)
    assert found, "nginx/parley.conf: upstream server lines not found"
    params = found.group(1) or ""
    servers = "".join(f"    server 127.0.0.1:{p}{params}{' down' if p in down else ''};\n" for p in backends)
    body = body[:found.start()] + servers + body[found.end():]
    body = re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{port};", body)
    body = body.replace("/srv/parley/static/", f"{ROOT / 'static'}/")
    w = Path(workdir)
    temp = "\n".join(f"    {kind}_temp_path {w / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    mime = "    include /etc/nginx/mime.types;\n" if Path("/etc/nginx/mime.types").exists() else ""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would otherwise drop to `nobody`
    return (f"{user}worker_processes 1;\npid {w / 'nginx.pid'};\nerror_log {w / 'nginx-error.log'} info;\n"
            f"events {{ worker_connections 4096; }}\n"  # two per client: bench/cluster_load.py has 1,000
            f"http {{\n{mime}    default_type application/octet-stream;\n"
            f"    access_log {w / 'nginx-access.log'};\n{temp}\n{body}\n}}\n")


def wait_http(url, timeout, proc=None, what="server"):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:g} s")
        time.sleep(0.1)


class Instance:
    def __init__(self, cluster, index):
        self.cluster = cluster
        self.index = index
        self.id = f"parley-{index + 1}"
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc = None
        self.started_at = 0.0
        self.log_path = Path(cluster.workdir) / f"{self.id}.log"
        self.pid_path = Path(cluster.workdir) / f"{self.id}.pid"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self):
        c = self.cluster
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-port", str(self.metrics_port),
               "--mongo-url", c.mongo_url, "--db-name", c.db_name, "--instance-id", self.id,
               "--trusted-proxies", "127.0.0.1", "--cluster", *c.extra_args]
        if c.token:  # from a file: a secret on the command line shows in `ps`
            token_file = Path(c.workdir) / "token"
            token_file.write_text(c.token)
            token_file.chmod(0o600)
            cmd += ["--token-file", str(token_file)]
        if c.pipelines_file:
            cmd += ["--pipelines", str(c.pipelines_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        env.update(c.env)
        log = open(self.log_path, "ab")
        # A session of its own: a terminal's Ctrl-C reaches the supervisor, which stops everything in order.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.started_at = time.monotonic()
        self.pid_path.write_text(f"{self.proc.pid}\n")
        return self

    def wait_ready(self, timeout=120):  # a bound: instances start slowly on a loaded machine
        wait_http(self.url + "/readyz", timeout, self.proc, self.id)

    def terminate(self):
        """SIGTERM (it drains); stop() waits for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused instance cannot act on SIGTERM
            self.proc.terminate()

    def signal(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout=20):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


class Cluster:
    def __init__(self, workdir, *, instances=3, port=None, mongo_url=None, db_name="parley", token=None,
                 pipelines_file=None, extra_args=(), env=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.mongo_url = mongo_url
        self.db_name = db_name
        self.token = token
        self.pipelines_file = pipelines_file
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.store = None
        self.nginx = None
        self.instances = [Instance(self, i) for i in range(instances)]

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def by_id(self, instance_id):
        return next(i for i in self.instances if i.id == instance_id)

    def start(self, timeout=120):
        if nginx_binary() is None:
            raise RuntimeError("nginx is not installed (Debian package nginx)")
        try:
            if self.mongo_url is None:
                self.store = EmbeddedMongo(self.workdir / "mongo").start()
                self.mongo_url = self.store.url
            for inst in self.instances:
                inst.start()
            for inst in self.instances:
                inst.wait_ready(timeout)
            self.start_nginx()
            wait_http(self.url + "/healthz", timeout, self.nginx, "nginx")
        except BaseException:
            self.stop()
            raise
        return self

    def write_conf(self, down=()):
        """nginx.conf for this cluster; the instances in `down` are marked `down`. Returns its path."""
        conf = self.workdir / "nginx.conf"
        conf.write_text(render_conf(self.workdir, port=self.port, backends=[i.port for i in self.instances],
                                    down={i.port for i in down}))
        return conf

    def start_nginx(self, down=()):
        self.nginx = start_nginx(self.workdir, self.write_conf(down))

    def stop(self):
        for inst in self.instances:  # all drain at once: their clients' sockets close, so nginx can quit
            inst.terminate()
        stop_nginx(self.nginx)
        for inst in self.instances:
            inst.stop()
        if self.store is not None:
            self.store.stop()


def start_nginx(workdir, conf):
    """nginx in the foreground (`daemon off`) with its state in `workdir`: the Popen of its master."""
    log = open(Path(workdir) / "nginx.out", "ab")
    proc = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc


def stop_nginx(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description="Parley on loopback: one store, N instances, nginx in front; "
                                            "supervised (nginx/README.md)")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--port", type=int, default=8080, help="nginx's port on 127.0.0.1")
    p.add_argument("--mongo-url", help="a shared MongoDB (replica set); default: an embedded nx-27017")
    p.add_argument("--token", default=None, help="the instances' shared token (default: a random one)")
    p.add_argument("--workdir", help="pid files, logs, nginx.conf and store data (default: a temporary directory, "
                                     "removed when the cluster stops)")
    p.add_argument("--hung-after", type=float, default=6.0, metavar="SECONDS",
                   help="an instance that answers nothing for this long is killed and started again")
    p.add_argument("server_args", nargs="*", help="more server.py options, after --")
    args = p.parse_args(argv)
    token = args.token or os.urandom(16).hex()
    workdir = args.workdir or tempfile.mkdtemp(prefix="parley-cluster-")
    cluster = Cluster(workdir, instances=args.instances, port=args.port, mongo_url=args.mongo_url, token=token,
                      extra_args=args.server_args)
    supervisor = Supervisor(cluster, hung_after=args.hung_after)

    def interrupt(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)  # `kill`, or the terminal going away: stop as Ctrl-C does
    signal.signal(signal.SIGHUP, interrupt)
    failed = False
    try:
        cluster.start()
        print(f"\n    Parley cluster: nginx on {cluster.url}/ in front of "
              f"{', '.join(f'{i.id} ({i.url})' for i in cluster.instances)}\n"
              f"    Open {cluster.url}/?token={token}\n    Logs, pid files and state: {workdir}\n"
              f"    An instance that exits or hangs is started again. Ctrl-C stops all.\n", flush=True)
        supervisor.run()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # did not start: say why, keep the logs
        failed = True
        print(f"cluster: {exc}; logs in {workdir}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut the clean-up
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()
        if args.workdir is None and not failed:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
