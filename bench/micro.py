"""In-process micro-benchmarks where a whole-server run is too noisy to see a change (a shared, loaded machine).

    python -m bench.micro [--ref REV]     # REV: also time services/outbox.py as it was at REV

outbox_merge: a busy socket (its window full), 5,000 delta chunks of one reply merged into the waiting one.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from tornado.concurrent import Future

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chunk(mod, offset, text):
    """A delta chunk as that tree's outbox takes it: services/schema.py's Struct, or (before it) a dict."""
    fields = {"message_id": "m", "is_final": False, "session_id": "s" * 32, "offset": offset, "delta": text,
              "timestamp": "2026-11-29T07:00:00.000000+00:00"}
    if not hasattr(mod, "schema"):
        return {"type": "response", "data": fields}
    from services.schema import ReplyData, Response
    return Response(session_type="person", data=ReplyData(id=2, role="assistant", connection_id="", seq=2,
                                                          reply_to=None, **fields))


def outbox_merge(mod, n=5000, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        box = mod.Outbox(lambda text: Future(), limit=10 ** 9, on_overflow=lambda: None)
        box.in_flight = mod.WINDOW
        frames = [chunk(mod, i * 7, " parley") for i in range(n)]
        start = time.perf_counter()
        for frame in frames:
            box.put(frame, mod.encode(frame))
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", help="git revision to compare with")
    args = p.parse_args(argv)
    trees = {"current": os.path.join(ROOT, "services", "outbox.py")}
    if args.ref:
        old = subprocess.run(["git", "-C", ROOT, "show", f"{args.ref}:services/outbox.py"], check=True,
                             capture_output=True).stdout
        path = os.path.join(tempfile.mkdtemp(), "outbox_ref.py")
        with open(path, "wb") as f:
            f.write(old)
        trees[args.ref] = path
    for label, path in trees.items():
        print(f"outbox_merge {label}: {outbox_merge(load(path, 'outbox_' + label.replace('~', '_'))):.1f} us/chunk")


if __name__ == "__main__":
    sys.exit(main())
