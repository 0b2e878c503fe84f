"""`make bench`: every scenario against Parley and its baselines in one invocation; ratios, JSON, a table.

    python -m bench.run [--quick] [--only relay,stop] [--ref REV] [--candidates uvloop,gcfreeze] [--out FILE]

Servers and the load client are separate processes on loopback. Each scenario starts a fresh server of each
kind (Parley; the bare Tornado baseline, bench/baseline.py; python-socketio where the issue compares with it),
runs bench/client.py against it, and stops it. `--ref REV` also runs Parley as it was at REV (from
`git archive`), so a change is measured before/after in the same run; `--candidates` runs the same tree with an
untried idea switched on from outside (bench/candidates/*/sitecustomize.py), to measure it before adopting it.
Everything is bounded: each client run has a timeout, each server start a deadline.
"""
import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata

from bench.cluster import scenarios as cluster_scenarios
from bench.cluster_load import scenarios as cluster_load_scenarios
from bench.common import pipelines, raise_fd_limit
from bench.client import SECRET, token
from services.storage.embedded_mongo import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def wait_port(port, proc, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on port {port}")


class Server:
    """One server process: Parley (from a source tree), the bare baseline, python-socketio or the upstream."""

    def __init__(self, kind, bench, extra=()):
        self.kind, self.bench, self.extra = kind, bench, list(extra)
        self.port = free_port()
        self.proc = None
        self.pipelines = True

    def command(self):
        b = self.bench
        if self.kind.startswith("parley"):
            tree = b.trees[self.kind]
            pipelines = ["--pipelines", b.toml] if self.pipelines else []  # else: the built-in demo pipeline
            return [PY, os.path.join(tree, "server.py"), "--port", str(self.port), "--auth", "jwt",
                    "--jwt-secret", SECRET, *pipelines, "--log-level", "warning",
                    "--max-connections", "20000", "--max-connections-per-user", "20000",
                    "--rate-limit", "100000", "--rate-burst", "100000", *self.extra], tree
        module = {"tornado": "bench.baseline", "sio": "bench.sio_server", "upstream": "bench.upstream"}[self.kind]
        args = [] if self.kind == "sio" else ["--pipelines", json.dumps(b.specs)]
        return [PY, "-m", module, "--port", str(self.port), *args], ROOT

    def start(self, *, mongo=True):
        cmd, cwd = self.command()
        if self.kind.startswith("parley") and mongo:
            cmd += ["--mongo-url", self.bench.mongo_url, "--db-name", f"bench_{self.port}_{int(time.time())}"]
        self.started = time.monotonic()
        path = os.pathsep.join(filter(None, [self.bench.paths.get(self.kind), cwd]))
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.bench.log, env={**os.environ, "PYTHONPATH": path})
        return self

    def ready(self, timeout=60):
        wait_port(self.port, self.proc, time.monotonic() + timeout)
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self.start().ready()

    def __exit__(self, *exc):
        self.stop()


class Bench:
    def __init__(self, args, workdir):
        self.quick = args.quick
        self.workdir = workdir
        self.log = open(os.path.join(workdir, "servers.log"), "ab")
        self.specs = pipelines(args.quick)
        self.trees = {"parley": ROOT}
        self.paths = {}  # kind -> extra PYTHONPATH entry (a candidate's sitecustomize)
        for name in filter(None, args.candidates.split(",")):
            self.trees["parley+" + name] = ROOT
            self.paths["parley+" + name] = os.path.join(ROOT, "bench", "candidates", name)
        if args.ref:
            tree = os.path.join(workdir, "ref")
            os.makedirs(tree)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.ref], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
            self.trees["parley@" + args.ref] = tree
        self.results = {}

    def write_toml(self, upstream_port):
        lines = []
        for name, spec in self.specs.items():
            lines.append(f"[pipelines.{name}]")
            if spec["source"] == "demo":
                lines += ['provider = "demo"', 'model = "demo"',
                          f'options = {{ words = {spec["n"] - 1}, rate = {spec["rate"]} }}']
            else:
                lines += ['provider = "openai"', f'model = "{name}"', 'retries = 0',
                          f'base_url = "http://127.0.0.1:{upstream_port}/v1"']
            if name != "short":  # long replies would make each next request's history large
                lines.append("history_messages = 0")
            if spec.get("on_instance_lost"):
                lines.append(f'on_instance_lost = "{spec["on_instance_lost"]}"')
            lines += [f"[pipelines.{name}.timeouts]", "first_token = 60", "stall = 60", "total = 900", ""]
        self.toml = os.path.join(self.workdir, "pipelines.toml")
        with open(self.toml, "w") as f:
            f.write("\n".join(lines))

    def client(self, server, params, timeout=300):
        params = {**params, "kind": "parley" if server.kind.startswith("parley") else server.kind,
                  "port": server.port, "pid": server.proc.pid}
        out = subprocess.run([PY, "-m", "bench.client", json.dumps(params)], cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})
        if out.returncode != 0:
            raise RuntimeError(f"client failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def each(self, kinds, params, extra=()):
        out = {}
        for kind in kinds:
            with Server(kind, self, extra) as server:
                out[kind] = self.client(server, params)
        return out

    def parleys(self):
        return list(self.trees)


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def scenarios(b):
    """name -> function(bench) -> {kind: result, ...}; each records the metric and target it is judged by."""
    q = b.quick
    P = b.parleys()

    def relay(b):
        r = b.each(P + ["tornado"], {"scenario": "relay", "pipeline": "relay", "n": b.specs["relay"]["n"]})
        fast = b.each(P, {"scenario": "relay", "pipeline": "fast", "n": b.specs["fast"]["n"]})
        cumulative = b.each(P[:1], {"scenario": "relay", "pipeline": "relay", "n": b.specs["relay"]["n"],
                                    "mode": "cumulative", "reps": 1})
        no_ckpt = b.each(P[:1], {"scenario": "relay", "pipeline": "relay", "n": b.specs["relay"]["n"]},
                         extra=["--checkpoint-interval", "1000000"])
        base = r["tornado"]["tokens_per_s"]
        rows = {
            "relay_demo": {k: r[k] for k in r} | {"metric": "tokens/s", "key": "tokens_per_s", "base": "tornado",
                                                   "target": ">= 1.0x tornado"},
            "relay_fast_upstream": {**fast, "tornado": r["tornado"], "metric": "tokens/s", "key": "tokens_per_s",
                                    "base": "tornado", "target": ">= 0.8x tornado"},
            "bytes_cumulative_vs_delta": {"parley": cumulative[P[0]], "delta": r[P[0]], "metric": "bytes/reply",
                                          "key": "bytes", "base": "delta",
                                          "target": "proportional to the reply"},
            "checkpoints_on_vs_off": {"parley": r[P[0]], "off": no_ckpt[P[0]], "metric": "tokens/s",
                                      "key": "tokens_per_s", "base": "off", "target": ">= 0.95x"},
        }
        return rows

    def many(b):
        r = b.each(P + ["tornado"], {"scenario": "many", "pipeline": "many", "n": b.specs["many"]["n"],
                                     "clients": 10 if q else 100})
        return {"many_streams_first_token": {**r, "metric": "first token p99 ms", "key": "first_token_p99_ms",
                                             "base": "tornado", "target": "p99 <= 100 ms"},
                "many_streams_throughput": {**r, "metric": "tokens/s", "key": "tokens_per_s", "base": "tornado",
                                            "target": "-"}}

    def paced(b):
        r = b.each(P + ["tornado"], {"scenario": "paced", "pipeline": "paced", "clients": 20 if q else 1000})
        return {"paced_added_delay": {**r, "metric": "added delay p99 ms", "key": "delay_p99_ms",
                                      "base": "tornado", "target": "p99 <= 50 ms"}}

    def idle(b):
        n = 200 if q else 10000
        # each connection its own user (and so its own session): a store lookup and a session's state each
        r = b.each(P + ["tornado"], {"scenario": "idle", "clients": n})
        # python-socketio connects ~5x slower: fewer connections keep the run short (memory is per connection)
        r.update(b.each(["sio"], {"scenario": "idle", "clients": n if q else 2000}))
        # the earlier spread, 50 users: all but the first connection of each find the session viewed here
        spread = b.each(P, {"scenario": "idle", "clients": n, "users": 50})
        spread["tornado"] = r["tornado"]
        return {"idle_memory": {**r, "metric": "KB/connection", "key": "kb_per_connection", "base": "tornado",
                                "target": "<= 14 KB"},
                "idle_memory_50_users": {**spread, "metric": "KB/connection", "key": "kb_per_connection",
                                         "base": "tornado", "target": "<= 20 KB"},
                "idle_connect_rate": {**r, "metric": "connects/s", "key": "connects_per_s", "base": "tornado",
                                      "target": ">= 0.8x tornado"},
                "idle_connect_rate_50_users": {**spread, "metric": "connects/s", "key": "connects_per_s",
                                               "base": "tornado", "target": ">= 0.8x tornado"}}

    def streaming(b):
        r = b.each(P + ["tornado"], {"scenario": "streaming", "pipeline": "trickle", "clients": 50 if q else 1000})
        return {"streaming_memory": {**r, "metric": "KB/connection", "key": "kb_per_connection", "base": "tornado",
                                     "target": "-"}}

    def fanout(b):
        r = b.each(P + ["tornado"], {"scenario": "fanout", "pipeline": "fan", "viewers": 20 if q else 1000})
        return {"fanout_cpu": {**r, "metric": "CPU us/delivery", "key": "cpu_us_per_delivery", "base": "tornado",
                               "target": "<= 1.3x tornado"},
                "fanout_last_viewer": {**r, "metric": "last viewer p99 ms", "key": "last_viewer_p99_ms",
                                       "base": "tornado", "target": "-"}}

    def broadcast(b):
        r = b.each(P + ["tornado", "sio"], {"scenario": "broadcast", "clients": 50 if q else 5000,
                                            "messages": 3 if q else 20})
        return {"broadcast": {**r, "metric": "deliveries/s", "key": "deliveries_per_s", "base": "sio",
                              "target": ">= 2.5x python-socketio"}}

    def latencies(b):
        rows = {}
        for what, pipeline, reps, target in (("first_token", "short", 5 if q else 50, "p99 <= 15 ms"),
                                             ("stop", "slow", 3 if q else 30, "p99 <= 10 ms"),
                                             ("resume", "slow", 3 if q else 30, "p99 <= 20 ms")):
            r = b.each(P + ["tornado"], {"scenario": "latency", "what": what, "pipeline": pipeline, "reps": reps})
            rows[what] = {**r, "metric": "p99 ms", "key": "p99_ms", "base": "tornado", "target": target}
        return rows

    def coldstart(b):
        out = {}
        for kind in P + ["tornado"]:
            times = []
            for _ in range(1 if q else 3):
                server = Server(kind, b)
                if kind.startswith("parley"):  # as `make run` starts: embedded store, the demo pipeline
                    server.extra = ["--data-dir", tempfile.mkdtemp(dir=b.workdir)]
                    server.pipelines = False
                server.start(mongo=False)
                try:
                    times.append(asyncio.run(first_connection(server)))
                finally:
                    server.stop()
            times.sort()
            out[kind] = {"ms": times[len(times) // 2] * 1e3, "runs": [round(t * 1e3) for t in times]}
        return {"cold_start": {**out, "metric": "ms to first accepted connection", "key": "ms", "base": "tornado",
                               "target": "half of 942 ms"}}

    return {"relay": relay, "many": many, "paced": paced, "idle": idle, "streaming": streaming, "fanout": fanout,
            "broadcast": broadcast, "latency": latencies, "coldstart": coldstart, **cluster_scenarios(b),
            **cluster_load_scenarios(b)}


async def first_connection(server, timeout=60):
    """From process start to the first WebSocket that completes its handshake and gets `connected`."""
    from websockets.asyncio.client import connect
    pipeline = "short" if server.pipelines else "default"
    url = f"ws://127.0.0.1:{server.port}/api/v1/pipelines/{pipeline}/ws/connect?session_type=person"
    deadline = server.started + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            async with connect(url, open_timeout=5, compression=None,
                               additional_headers={"Authorization": f"Bearer {token('cold')}"}) as ws:
                while '"connected"' not in await asyncio.wait_for(ws.recv(), 5):
                    pass
                return time.monotonic() - server.started
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.005)
        except Exception as exc:  # handshake refused while starting (e.g. 503): try again
            if "InvalidStatus" not in type(exc).__name__ and "ConnectionClosed" not in type(exc).__name__:
                raise
            await asyncio.sleep(0.005)
    raise RuntimeError("no connection accepted in time")


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for pkg in ("tornado", "pymongo", "nx-27017", "openai", "websockets", "python-socketio", "msgspec", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "versions": versions, "commit": rev.stdout.strip()}


def table(results):
    lines = ["| scenario | metric | " + " | ".join(["kind", "value", "baseline", "ratio"]) + " | target |",
             "|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if "error" in row:
            lines.append(f"| {name} | error | {row['error'][:80]} | | | | |")
            continue
        key, base = row["key"], row["base"]
        base_value = row.get(base, {}).get(key)
        for kind, value in row.items():
            if not isinstance(value, dict) or kind == base:
                continue
            v = value.get(key)
            lines.append(f"| {name} | {row['metric']} | {kind} | {fmt(v)} | {base} {fmt(base_value)} | "
                         f"{fmt(ratio(v, base_value))} | {row['target']} |")
    return "\n".join(lines)


def fmt(v):
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts: checks the harness in seconds")
    p.add_argument("--only", default="", help="comma-separated scenario groups")
    p.add_argument("--ref", help="also run Parley as of this git revision (before/after in one run)")
    p.add_argument("--candidates", default="", help="comma-separated: also run Parley with each candidate of "
                   "bench/candidates/ (uvloop, gcfreeze) installed, beside the plain one")
    p.add_argument("--out", help="results JSON (default bench/results/<date>.json; quick runs: not written)")
    args = p.parse_args(argv)
    raise_fd_limit()
    workdir = tempfile.mkdtemp(prefix="parley-bench-")
    from services.storage.embedded_mongo import EmbeddedMongo
    mongo = EmbeddedMongo(os.path.join(workdir, "mongo")).start()
    b = Bench(args, workdir)
    b.mongo_url = mongo.url
    b.store_pid = mongo.process.pid  # its CPU: the cluster's bus writes there (bench/cluster_load.py)
    upstream = Server("upstream", b)
    try:
        upstream.start().ready()
        b.write_toml(upstream.port)
        groups = scenarios(b)
        only = [g for g in args.only.split(",") if g] or list(groups)
        for name in only:
            started = time.monotonic()
            try:
                b.results.update(groups[name](b))
            except Exception as exc:  # one broken scenario must not hide the others' numbers
                b.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"# {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    finally:
        upstream.stop()
        mongo.stop()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "machine": machine(), "trees": list(b.trees), "results": b.results}
    out = args.out or (None if args.quick else os.path.join(
        ROOT, "bench", "results", datetime.date.today().isoformat() + ".json"))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    print(table(b.results))
    shutil.rmtree(workdir, ignore_errors=True)
    failed = [n for n, r in b.results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
