"""The load client: one process, separate from the server it measures, runs one scenario and prints one JSON
line. It drives Parley, the bare Tornado baseline and python-socketio through the same code.

    python -m bench.client '{"scenario": "relay", "kind": "parley", "port": 8888, "pid": 123, ...}'

Every wait is bounded (`deadline`); a scenario that cannot finish raises and the runner reports the failure.
`client_cpu` in each result is this process's CPU time over wall time: near 1.0 means the client, not the
server, was the bottleneck.
"""
import asyncio
import json
import sys
import time
import urllib.request

import jwt
import msgspec
from websockets.asyncio.client import connect

from bench.common import percentile, proc_cpu, proc_rss, raise_fd_limit, stamps

decode = msgspec.json.decode
SECRET = "bench-secret-0123456789abcdef0123456789"  # Parley runs with --auth jwt --jwt-secret SECRET


def token(user, admin=False):
    claims = {"sub": user, "exp": int(time.time()) + 3600}
    if admin:
        claims["role"] = "admin"
    return jwt.encode(claims, SECRET, algorithm="HS256")


class Target:
    def __init__(self, kind, port, pid, timeout, sources=(), pids=()):
        self.kind, self.port, self.pid, self.timeout = kind, port, pid, timeout
        self.sources = list(sources)       # local addresses to connect from, in turn (nginx's ip_hash: bench/cluster_load.py)
        self.pids = list(pids) or [pid]    # the processes whose CPU time a scenario reports (a cluster's instances, its store)

    def cpu(self):
        """CPU seconds used so far by each of `pids`, in order."""
        return [proc_cpu(pid) for pid in self.pids]

    def url(self, pipeline, mode="delta", session_type="person"):
        if self.kind == "sio":
            return f"ws://127.0.0.1:{self.port}/socket.io/?EIO=4&transport=websocket"
        return (f"ws://127.0.0.1:{self.port}/api/v1/pipelines/{pipeline}/ws/connect"
                f"?session_type={session_type}&stream_mode={mode}&protocol=parley.v1")  # Parley's dialect

    async def open(self, pipeline, user="bench", mode="delta", session_type="person", source=None):
        extra = {"local_addr": (source, 0)} if source else {}
        ws = await connect(self.url(pipeline, mode, session_type), compression=None, max_size=None,
                           ping_interval=None, open_timeout=self.timeout,
                           additional_headers={"Authorization": f"Bearer {token(user)}"}, **extra)
        if self.kind == "sio":
            await ws.send("40")
            while not (await asyncio.wait_for(ws.recv(), self.timeout)).startswith("40"):
                pass
            return ws
        await self.wait(ws, lambda f: f["type"] == "connected")
        return ws

    async def wait(self, ws, predicate, on_frame=None):
        """Frames until one matches `predicate` (returned); on_frame(frame, raw) sees each of them."""
        deadline = time.monotonic() + self.timeout
        while True:
            raw = await asyncio.wait_for(ws.recv(), max(0.001, deadline - time.monotonic()))
            frame = decode(raw)
            if on_frame is not None:
                on_frame(frame, raw)
            if frame.get("type") == "error":
                raise RuntimeError(f"error frame: {raw[:300]}")
            if predicate(frame):
                return frame

    async def open_many(self, count, pipeline, users, mode="delta", session_type="person", concurrency=100):
        gate = asyncio.Semaphore(concurrency)

        async def one(i):
            async with gate:
                source = self.sources[i % len(self.sources)] if self.sources else None
                return await self.open(pipeline, users(i), mode, session_type, source)
        return await asyncio.gather(*(one(i) for i in range(count)))

    def post_broadcast(self, text):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/broadcast", method="POST",
                                     data=json.dumps({"message": text}).encode(),
                                     headers={"Authorization": f"Bearer {token('admin', admin=True)}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            resp.read()


def cpu_result(before, after, tokens):
    """The CPU time of the measured processes per token: all of them, and each (µs)."""
    each = [(b - a) / max(1, tokens) * 1e6 for a, b in zip(before, after)]
    return {"cpu_us_per_token": sum(each), "cpu_us_per_token_each": each}


MESSAGE = json.dumps({"type": "message", "message": [{"type": "Plain", "text": "benchmark"}]})


def is_final(f):
    return f.get("type") == "response" and f["data"].get("is_final")


def is_token(f):
    if f.get("type") != "response" or f["data"].get("is_final"):
        return False
    d = f["data"]
    return bool(d.get("delta") or d.get("content") or d.get("thinking_delta"))


def reply_text(f):
    d = f["data"]
    return d.get("delta") if "delta" in d else d.get("content", "")[d.get("offset", 0):]


async def relay(t, p):
    """One client, one long reply at full speed: tokens/s, frames and bytes per reply."""
    ws = await t.open(p["pipeline"], mode=p.get("mode", "delta"))
    runs = []
    for _ in range(p.get("reps", 3)):
        counts = {"frames": 0, "bytes": 0}

        def count(frame, raw):
            if frame.get("type") == "response":
                counts["frames"] += 1
                counts["bytes"] += len(raw.encode()) if isinstance(raw, str) else len(raw)
        start = time.monotonic()
        await ws.send(MESSAGE)
        await t.wait(ws, is_final, count)
        elapsed = time.monotonic() - start
        runs.append({"tokens_per_s": p["n"] / elapsed, "seconds": elapsed, **counts,
                     "bytes_per_frame": counts["bytes"] / max(1, counts["frames"])})
    await ws.close()
    runs.sort(key=lambda r: r["tokens_per_s"])
    return {**runs[len(runs) // 2], "runs": [round(r["tokens_per_s"]) for r in runs]}


async def many(t, p):
    """C clients, each its own session, all send at once: first-token latency and total throughput."""
    socks = await t.open_many(p["clients"], p["pipeline"], lambda i: f"u{i}")
    firsts, ends = [], []
    cpu0 = t.cpu()
    start = time.monotonic()

    async def one(ws):
        sent = time.monotonic()
        await ws.send(MESSAGE)
        await t.wait(ws, is_token)
        firsts.append(time.monotonic() - sent)
        await t.wait(ws, is_final)
        ends.append(time.monotonic())
    await asyncio.gather(*(one(ws) for ws in socks))
    cpu = t.cpu()
    await asyncio.gather(*(ws.close() for ws in socks))
    return {"first_token_p50_ms": percentile(firsts, 50) * 1e3, "first_token_p99_ms": percentile(firsts, 99) * 1e3,
            "tokens_per_s": p["clients"] * p["n"] / (max(ends) - start),
            **cpu_result(cpu0, cpu, p["clients"] * p["n"])}


async def paced(t, p):
    """C clients each get a reply of stamped tokens at a fixed rate: the delay each token added on the way."""
    socks = await t.open_many(p["clients"], p["pipeline"], lambda i: f"p{i}")
    delays = []

    async def one(ws):
        seen = 0  # characters that came in chunks: tokens the final brings first are timed too (a busy socket's
                  # waiting chunks may go out folded into the final)

        def on(frame, raw):
            nonlocal seen
            if is_token(frame):
                text = reply_text(frame)
            elif is_final(frame):
                text = frame["data"].get("content", "")[seen:]
            else:
                return
            seen += len(text)
            now = time.monotonic()
            delays.extend(now - s for s in stamps(text))
        await ws.send(MESSAGE)
        await t.wait(ws, is_final, on)
    cpu0, start = t.cpu(), time.monotonic()
    await asyncio.gather(*(one(ws) for ws in socks))
    cpu, seconds = t.cpu(), time.monotonic() - start
    await asyncio.gather(*(ws.close() for ws in socks))
    return {"delay_p50_ms": percentile(delays, 50) * 1e3, "delay_p99_ms": percentile(delays, 99) * 1e3,
            "tokens": len(delays), "seconds": seconds, **cpu_result(cpu0, cpu, len(delays))}


async def idle(t, p):
    """Open N idle authenticated connections of `users` users (default: each its own, so each its own session):
    connect rate and the server's memory per connection."""
    users = p.get("users") or p["clients"]
    rss0 = proc_rss(t.pid)
    start = time.monotonic()
    socks = await t.open_many(p["clients"], p.get("pipeline", "short"), lambda i: f"i{i % users}")
    elapsed = time.monotonic() - start
    await asyncio.sleep(1.0)
    rss1 = proc_rss(t.pid)
    await asyncio.gather(*(ws.close() for ws in socks))
    return {"connects_per_s": p["clients"] / elapsed, "kb_per_connection": (rss1 - rss0) / p["clients"] / 1024,
            "connections": p["clients"], "users": users}


async def streaming(t, p):
    """N connections of distinct users, each with a reply streaming to it (a slow pipeline): the server's memory
    per connection while they stream. Every reply is stopped before the sockets close."""
    rss0 = proc_rss(t.pid)
    socks = await t.open_many(p["clients"], p["pipeline"], lambda i: f"s{i}")

    async def start(ws):
        await ws.send(MESSAGE)
        await t.wait(ws, is_token)
    await asyncio.gather(*(start(ws) for ws in socks))
    await asyncio.sleep(1.0)  # every reply past its first token, checkpointing
    rss1 = proc_rss(t.pid)

    async def stop(ws):
        await ws.send(json.dumps({"type": "stop"}))
        await t.wait(ws, is_final)
    await asyncio.gather(*(stop(ws) for ws in socks))
    await asyncio.gather(*(ws.close() for ws in socks))
    return {"kb_per_connection": (rss1 - rss0) / p["clients"] / 1024, "connections": p["clients"]}


async def fanout(t, p):
    """V viewers of one group session; one of them asks: per token, when the last viewer had it, and the
    server's CPU per delivery."""
    socks = await t.open_many(p["viewers"], p["pipeline"], lambda i: "fan", session_type="group")
    got = {}  # stamp -> latest receipt (the last viewer)
    all_delays = []

    async def one(ws, sender):
        def on(frame, raw):
            if is_token(frame):
                now = time.monotonic()
                for s in stamps(reply_text(frame)):
                    got[s] = max(got.get(s, 0.0), now)
                    all_delays.append(now - s)
        if sender:
            await ws.send(MESSAGE)
        await t.wait(ws, is_final, on)
    cpu0 = proc_cpu(t.pid)
    await asyncio.gather(*(one(ws, i == 0) for i, ws in enumerate(socks)))
    cpu = proc_cpu(t.pid) - cpu0
    await asyncio.gather(*(ws.close() for ws in socks))
    last = [r - s for s, r in got.items()]
    deliveries = len(all_delays)
    return {"last_viewer_p50_ms": percentile(last, 50) * 1e3, "last_viewer_p99_ms": percentile(last, 99) * 1e3,
            "cpu_us_per_delivery": cpu / max(1, deliveries) * 1e6, "deliveries": deliveries}


async def broadcast(t, p):
    """N connections, M broadcasts posted back to back: deliveries per second."""
    socks = await t.open_many(p["clients"], p.get("pipeline", "short"), lambda i: f"b{i % 50}")
    m = p["messages"]

    async def one(ws):
        seen = 0
        deadline = time.monotonic() + t.timeout
        while seen < m:
            raw = await asyncio.wait_for(ws.recv(), max(0.001, deadline - time.monotonic()))
            if t.kind == "sio":
                if raw == "2":
                    await ws.send("3")
                seen += raw.startswith("42")
            else:
                seen += '"broadcast"' in raw
    start = time.monotonic()
    waiting = [asyncio.ensure_future(one(ws)) for ws in socks]
    for i in range(m):
        await asyncio.to_thread(t.post_broadcast, f"announcement {i}")
    await asyncio.gather(*waiting)
    elapsed = time.monotonic() - start
    await asyncio.gather(*(ws.close() for ws in socks))
    return {"deliveries_per_s": p["clients"] * m / elapsed, "seconds": elapsed}


async def latency(t, p):
    """Repeated single-client round trips: message -> first token, stop -> final, or resume -> first frame."""
    what = p["what"]
    ws = await t.open(p["pipeline"], user=f"lat-{what}")
    other = await t.open(p["pipeline"], user=f"lat-{what}") if what == "resume" else None
    times = []
    for _ in range(p["reps"]):
        if what == "first_token":
            await asyncio.sleep(0.05)  # an idle server
            start = time.monotonic()
            await ws.send(MESSAGE)
            await t.wait(ws, is_token)
            times.append(time.monotonic() - start)
            await t.wait(ws, is_final)
            continue
        await ws.send(MESSAGE)
        ack = await t.wait(ws, lambda f: f.get("type") == "ack")
        await t.wait(ws, is_token)
        if what == "stop":
            start = time.monotonic()
            await ws.send(json.dumps({"type": "stop"}))
            await t.wait(ws, is_final)
            times.append(time.monotonic() - start)
        else:
            start = time.monotonic()
            await other.send(json.dumps({"type": "resume", "message_id": ack["data"]["reply_message_id"],
                                         "offset": 0}))
            await t.wait(other, lambda f: f.get("type") == "resumed")
            times.append(time.monotonic() - start)
            await ws.send(json.dumps({"type": "stop"}))
            await t.wait(ws, is_final)
            if t.kind == "parley":
                await t.wait(other, is_final)
    for s in (ws, other):
        if s is not None:
            await s.close()
    return {"p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3, "reps": len(times)}


SCENARIOS = {"relay": relay, "many": many, "paced": paced, "idle": idle, "streaming": streaming, "fanout": fanout,
             "broadcast": broadcast, "latency": latency}


async def run(p):
    t = Target(p["kind"], p["port"], p["pid"], p.get("timeout", 120), p.get("sources", ()), p.get("pids", ()))
    wall0, cpu0 = time.monotonic(), time.process_time()
    result = await SCENARIOS[p["scenario"]](t, p)
    result["client_cpu"] = round((time.process_time() - cpu0) / (time.monotonic() - wall0), 2)
    return result


def main():
    raise_fd_limit()
    params = json.loads(sys.argv[1])
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(params))), flush=True)


if __name__ == "__main__":
    main()
