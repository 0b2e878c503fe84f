"""Cluster latencies (`make bench BENCH_ARGS="--only cluster"`): three instances on one store behind a real nginx
(nginx/cluster.py), clients on different loopback networks so ip_hash puts them on different instances.

- stop_across_instances: a reply generates on A; the stop is sent through B (nginx routes the stopper there);
  the time from sending `stop` to the `stopped` final on the stopper's socket. Baseline: the same stop sent on A.
- follower_lag: a paced upstream stamps each token with its emission time (bench/common.py); a viewer on B
  follows a reply generating on A; the delay from emission to arrival of each token, against a viewer on A.
- failover_continued / failover_interrupted: kill -9 of the instance generating a reply that viewers on the two
  others follow: time to the first continued token (another instance goes on with it), or to the final (a
  pipeline with on_instance_lost = interrupt), and the characters viewers were told to drop (`rewind`).
- failover_text: every continued reply is read to its final, which must equal the answer the demo pipeline
  gives uninterrupted (counts the viewers whose final differs: 0).

Only the current tree runs here (the cluster is started from this checkout); the baseline is the same measure
within one instance, in the same run.
"""
import asyncio
import json
import os
import time

from bench.client import SECRET, token
from bench.common import percentile, pipelines, stamps


def _stats(values):
    ms = [v * 1e3 for v in values]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "reps": len(ms)}


class Socket:
    """A Parley WebSocket through nginx from one loopback source address (its own ip_hash bucket)."""

    def __init__(self, ws):
        self.ws = ws
        self.instance = ws.headers.get("X-Parley-Instance")

    @classmethod
    async def open(cls, url, pipeline, src, user):
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect
        request = HTTPRequest(f"{url.replace('http', 'ws', 1)}/api/v1/pipelines/{pipeline}/ws/connect"
                              "?stream_mode=delta&protocol=parley.v1",
                              headers={"Authorization": f"Bearer {token(user)}"}, network_interface=src,
                              request_timeout=30)
        self = cls(await websocket_connect(request))
        self.connected = await self.recv("connected")
        return self

    async def recv(self, *types, timeout=60):
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), timeout)
            if raw is None:
                raise RuntimeError("socket closed")
            frame = json.loads(raw)
            if not types or frame["type"] in types:
                return frame

    async def send(self, frame):
        await self.ws.write_message(json.dumps(frame))

    async def say(self, text):
        await self.send({"type": "message", "message": [{"type": "Plain", "text": text}]})
        return (await self.recv("ack"))["data"]["reply_message_id"]

    async def final_of(self, message_id):
        while True:
            data = (await self.recv("response"))["data"]
            if data["message_id"] == message_id and data["is_final"]:
                return data

    def close(self):
        self.ws.close()


async def _placed(cluster, pipeline, user):
    """One socket per instance for `user`: {instance id: Socket}, found by trying loopback networks."""
    found = {}
    for n in range(1, 60):
        sock = await Socket.open(cluster.url, pipeline, f"127.0.{n}.1", user)
        if sock.instance in found:
            sock.close()
        else:
            found[sock.instance] = sock
        if len(found) == len(cluster.instances):
            return found
    raise RuntimeError(f"ip_hash placed the test networks on {sorted(found)} only")


async def _stop_latency(cluster, reps, across):
    socks = await _placed(cluster, "slow", f"stopper-{across}")
    owner, other = list(socks.values())[:2]
    stopper = other if across else owner
    times = []
    try:
        for i in range(reps):
            reply = await owner.say(f"talk until stopped {i}")
            while (await owner.recv("response"))["data"]["message_id"] != reply:
                pass  # generating (on the owner's instance)
            started = time.monotonic()
            await stopper.send({"type": "stop", "session_id": owner.connected["session_id"]})
            final = await stopper.final_of(reply)
            times.append(time.monotonic() - started)
            assert final["status"] == "stopped", final
            for sock in socks.values():  # everyone has seen the end before the next reply
                if sock is not stopper:
                    await sock.final_of(reply)
    finally:
        for sock in socks.values():
            sock.close()
    return _stats(times)


async def _follower_lag(cluster, reps):
    socks = await _placed(cluster, "paced", "follower")
    owner, follower = list(socks.values())[:2]
    await asyncio.sleep(0.5)  # the follower's instance has announced its interest in the session
    lags = {"owner_viewer": [], "follower": []}

    async def watch(sock, reply, out):
        while True:
            data = (await sock.recv("response"))["data"]
            if data["message_id"] != reply:
                continue
            if data["is_final"]:
                return
            now = time.monotonic()
            out.extend(now - s for s in stamps(data.get("delta", "")))

    try:
        for i in range(reps):
            reply = await owner.say(f"paced {i}")
            await asyncio.gather(watch(owner, reply, lags["owner_viewer"]), watch(follower, reply, lags["follower"]))
    finally:
        for sock in socks.values():
            sock.close()
    return {kind: _stats(values) for kind, values in lags.items()}


async def _failover(cluster, reps, pipeline):
    """kill -9 the instance generating a reply that viewers on the two others follow: for each viewer, the time
    from the kill to the reply's first continued token (`lost`: another instance goes on with it) or to its final
    (`lost_once`: on_instance_lost = interrupt), and the characters it was told to drop (streamed after the last
    checkpoint: `rewind`). The instance is started again after each kill."""
    loop = asyncio.get_running_loop()
    waits, dropped, mismatches = [], [], 0
    for i in range(reps):
        socks = await _placed(cluster, pipeline, f"lost-{pipeline}-{i}")
        owner_id = cluster.instances[0].id
        viewers = [s for iid, s in socks.items() if iid != owner_id]
        reply = await socks[owner_id].say(f"lose me {i}")
        held = {}
        for sock in viewers:  # each follows it live
            seen = 0
            while seen < 30:
                data = (await sock.recv("response"))["data"]
                if data["message_id"] == reply:
                    seen += 1
                    held[sock] = data["offset"] + len(data.get("delta", ""))
        owner = cluster.by_id(owner_id)
        owner.proc.kill()
        killed = time.monotonic()
        owner.proc.wait()
        try:
            for sock in viewers:
                rewound = None
                while True:
                    frame = await sock.recv("response", "rewind")
                    data = frame["data"]
                    if data["message_id"] != reply:
                        continue
                    if frame["type"] == "rewind":
                        rewound = data["offset"]
                        continue
                    if data["is_final"] or (pipeline == "lost" and rewound is not None):
                        waits.append(time.monotonic() - killed)
                        dropped.append(max(0, held[sock] - (rewound if rewound is not None else held[sock])))
                        break
            if pipeline == "lost":  # a continued reply must end as the uninterrupted one would have
                for sock in viewers:
                    final = await sock.final_of(reply)
                    mismatches += final["content"] != whole(pipeline, f"lose me {i}")
        finally:
            for sock in socks.values():
                sock.close()
            owner.start()
            await loop.run_in_executor(None, owner.wait_ready)
            await asyncio.sleep(1.0)  # the others see it back (its heartbeat) before the next kill
    out = {**_stats(waits), "dropped_chars_mean": sum(dropped) / len(dropped), "dropped_chars_max": max(dropped)}
    if pipeline == "lost":
        out["final_text_mismatches"] = mismatches  # 0: every viewer's final equals the uninterrupted answer
    return out


def whole(pipeline, question):
    """The answer the demo pipeline gives `question` uninterrupted (bench/run.py's TOML for it)."""
    from services.operations.pipelines import Pipeline
    from services.providers.demo import DemoProvider
    spec = pipelines(False)[pipeline]
    options = {"words": spec["n"] - 1, "rate": spec["rate"]}
    return DemoProvider(Pipeline(id=pipeline, options=options)).whole(question)[1]


async def _measure(cluster, reps, replies):
    return (await _stop_latency(cluster, reps, across=True), await _stop_latency(cluster, reps, across=False),
            await _follower_lag(cluster, replies), await _failover(cluster, max(2, reps // 3), "lost"),
            await _failover(cluster, max(2, reps // 3), "lost_once"))


def scenarios(b):
    """The `cluster` group for bench/run.py."""

    def cluster(b):
        from nginx.cluster import Cluster, nginx_binary
        if nginx_binary() is None:
            raise RuntimeError("nginx is not installed (Debian package nginx)")
        reps = 3 if b.quick else 30
        c = Cluster(os.path.join(b.workdir, "cluster"), instances=3, mongo_url=b.mongo_url,
                    db_name=f"bench_cluster_{int(time.time())}", pipelines_file=b.toml,
                    extra_args=["--auth", "jwt", "--jwt-secret", SECRET, "--log-level", "warning",
                                "--rate-limit", "100000", "--rate-burst", "100000"])
        c.start()
        try:
            across, local, lag, continued, ended = asyncio.run(_measure(c, reps, 1 if b.quick else 5))
        finally:
            c.stop()
        return {"stop_across_instances": {"parley": across, "same_instance": local, "metric": "stop→final p99 ms",
                                          "key": "p99_ms", "base": "same_instance", "target": "p99 <= 20 ms"},
                "follower_lag": {**lag, "metric": "token lag p99 ms", "key": "p99_ms", "base": "owner_viewer",
                                 "target": "follower p99 <= 50 ms"},
                # (no baseline: nothing else continues a reply elsewhere; the targets are absolute)
                "failover_continued": {"parley": continued, "metric": "kill -9 → first continued token, ms",
                                       "key": "p99_ms", "base": None, "target": "p99 <= 3000 ms"},
                "failover_text": {"parley": continued, "metric": "continued finals ≠ the uninterrupted answer",
                                  "key": "final_text_mismatches", "base": None, "target": "0"},
                "failover_interrupted": {"parley": ended, "metric": "kill -9 → final (interrupt pipelines), ms",
                                         "key": "p99_ms", "base": None, "target": "p99 <= 5000 ms"}}

    return {"cluster": cluster}
