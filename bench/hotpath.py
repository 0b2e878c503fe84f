"""In-process timing of Parley's own per-chunk work, where a whole-server run is too noisy to see a change:
a generated chunk -> StreamManager._apply -> bus -> fan-out -> frames -> encoding -> outbox -> a socket write
that completes at once (Tornado's own work and the syscall are left out: the same for the bare baseline).

    python -m bench.hotpath [--ref REV] [--viewers 1,1000] [--chunks 5000] [--write done|task]

Prints microseconds per chunk with one viewer and per delivery with many, for the working tree and for REV
(each measured in its own process, with the tree's own services/ on sys.path; CPU time, best of 5).
`--write task`: each write returns a Task that completes one loop turn later, as Tornado's `write_message` does,
so a socket is busy when the next chunk comes (the outbox merges) and the Task's cost is included.
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(viewers, chunks, mode="delta", repeats=5, write="done"):
    from tornado.concurrent import Future

    from services.providers import Chunk
    try:
        from services.delivery import fanout as fanout_module, hub as hub_module
        from services.delivery.bus import LocalBus
        from services.operations.metrics import Metrics
        from services.replies.streams import Generation, StreamManager
    except ModuleNotFoundError:  # --ref: a tree from before services/ had folders
        from services import fanout as fanout_module, hub as hub_module
        from services.bus import LocalBus
        from services.metrics import Metrics
        from services.streams import Generation, StreamManager

    async def run():
        metrics = Metrics(["p"])
        bus = LocalBus("i1", metrics=metrics)
        hub = hub_module.Hub()
        try:
            fan = fanout_module.FanOut(hub, bus, metrics, store=None)
        except TypeError:
            fan = fanout_module.FanOut(hub, bus, metrics)
        streams = StreamManager(None, bus, None, instance_id="i1", checkpoint_interval=1e9, metrics=metrics)
        done = Future()
        done.set_result(None)

        async def written():
            return None

        def write_now(text):
            return done

        def write_task(text):  # Tornado's write_message: a Task awaiting the stream's (already done) write
            return asyncio.ensure_future(written())
        identity = type("Identity", (), {"user_id": "u", "is_admin": False, "expires_at": None})()
        session = {"_id": "s" * 24, "type": "group" if viewers > 1 else "person", "pipeline": "p"}
        for i in range(viewers):
            conn = hub_module.Connection(f"c{i}", identity=identity, pipeline="p", session_type=session["type"],
                                         stream_mode=mode, write=write_task if write == "task" else write_now,
                                         close=lambda *a: None,
                                         on_sent=metrics.frame_sent)
            hub.register(conn)
            fan.join(conn, session["_id"], session["type"])
        best = float("inf")
        for r in range(repeats):
            gen = Generation(message_id=f"m{r}", session=session, seq=2, reply_to="u1", prompt="x", sender="u",
                             stream=True)
            gen.status = "streaming"
            pieces = [Chunk(text=" parley") for _ in range(chunks)]
            start = time.process_time()
            for piece in pieces:
                streams._apply(gen, piece)
                await asyncio.sleep(0)  # as the server: the loop turns between chunks (write callbacks run)
            best = min(best, time.process_time() - start)
            getattr(fan.replies, "logs", fan.replies).pop(gen.message_id, None)  # (--ref: a tree before replylog)
            for conn in hub.connections.values():
                (conn.readers if hasattr(conn, "readers") else conn.cursors).clear()
        # the loop's own turn, timed alone, is not Parley's work
        start = time.process_time()
        for _ in range(chunks):
            await asyncio.sleep(0)
        idle = time.process_time() - start
        return (best - idle) / chunks / viewers * 1e6

    return asyncio.run(run())


def child(args):
    sys.path.insert(0, args.tree)
    out = {v: round(measure(v, max(50, args.chunks // v), args.mode, write=args.write), 2) for v in args.viewers}
    print(json.dumps(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", help="git revision to compare with")
    p.add_argument("--viewers", default="1,1000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--chunks", type=int, default=5000)
    p.add_argument("--mode", default="delta")
    p.add_argument("--write", default="done", choices=("done", "task"),
                   help="done: a write completes at once; task: one loop turn later, as Tornado's")
    p.add_argument("--tree", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tree:
        return child(args)
    trees = {"current": ROOT}
    if args.ref:
        tree = tempfile.mkdtemp(prefix="parley-hotpath-")
        archive = subprocess.run(["git", "-C", ROOT, "archive", args.ref], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        trees[args.ref] = tree
    for label, tree in trees.items():
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--tree", tree, "--chunks",
                              str(args.chunks), "--mode", args.mode, "--write", args.write, "--viewers",
                              ",".join(map(str, args.viewers))], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": tree})
        if out.returncode:
            print(f"{label}: failed\n{out.stderr[-2000:]}")
            continue
        for viewers, us in json.loads(out.stdout).items():
            what = "chunk" if viewers == "1" else "delivery"
            print(f"{label}: {viewers} viewer(s), {args.mode}, write {args.write}: {us} us per {what}")


if __name__ == "__main__":
    sys.exit(main())
