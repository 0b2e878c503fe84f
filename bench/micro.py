"""In-process micro-benchmarks where a whole-server run is too noisy to see a change (a shared, loaded machine).

    python -m bench.micro [--ref REV] [--only outbox,provider]   # REV: also time the modules as they were at REV

outbox_merge: a busy socket (its window full), 5,000 delta chunks of one reply merged into the waiting one.
provider_parse: the OpenAI provider's work on a fast upstream's body (bench/upstream.py's, 500 events in 64 KB
network reads): SSE split, event decoding, the reply's chunks; no network (the response is in memory). CPU time
per event, best of 20.
"""
import argparse
import asyncio
import contextlib
import glob
import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from tornado.concurrent import Future

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_names():
    """A module of a tree from before services/ had folders imports `services.schema` and the like: the same
    modules of this tree answer for them."""
    for path in sorted(glob.glob(os.path.join(ROOT, "services", "*", "*.py"))):
        folder, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)[:-3]
        if name != "__init__" and folder != "providers":
            sys.modules.setdefault(f"services.{name}", importlib.import_module(f"services.{folder}.{name}"))


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chunk(mod, offset, text):
    """A delta chunk as that tree's outbox takes it: services/wire/schema.py's Struct, or (before it) a dict."""
    fields = {"message_id": "m", "is_final": False, "session_id": "s" * 32, "offset": offset, "delta": text,
              "timestamp": "2026-11-29T07:00:00.000000+00:00"}
    if not hasattr(mod, "schema"):
        return {"type": "response", "data": fields}
    from services.wire.schema import ReplyData, Response
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


class _Body:
    """An upstream response already in memory, as the provider reads it: aiohttp's (content.iter_chunks) or, for
    trees before aiohttp, httpx's (aiter_bytes)."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.content = self
        self.status_code = 200

    async def iter_chunks(self):
        for block in self.blocks:
            yield block, True

    async def aiter_bytes(self):
        for block in self.blocks:
            yield block

    def at_eof(self):
        return True

    def release(self):
        pass

    async def aclose(self):
        pass


def provider_parse(mod, n=500, repeats=20):
    from bench.upstream import chunk, tail
    from services.operations.pipelines import Pipeline
    from services.providers import GenerationRequest, Turn
    body = b"".join(chunk("m", " parley") for _ in range(n)) + tail("m", n)
    blocks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    provider = mod.OpenAIProvider(Pipeline(id="p", provider="openai", model="m", base_url="http://127.0.0.1:9/v1"))

    async def opened(*args):
        return _Body(blocks)
    provider._open = opened
    request = GenerationRequest(pipeline=provider.pipeline, session_id="s", session_type="person", message_id="m",
                                history=[], prompt=Turn("user", "x", "u"))

    async def run():
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            async with contextlib.aclosing(provider.stream(request)) as stream:
                async for _ in stream:
                    pass
            best = min(best, time.process_time() - start)
        await provider.aclose()
        return best
    return asyncio.run(run()) / n * 1e6


CASES = {"outbox": ("outbox_merge", "services/wire/outbox.py", outbox_merge, "us/chunk"),
         "provider": ("provider_parse", "services/providers/openai_compat.py", provider_parse, "us/event")}
FLAT = {"services/wire/outbox.py": "services/outbox.py",
        "services/providers/openai_compat.py": "services/providers/openai_compat.py"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", help="git revision to compare with")
    p.add_argument("--only", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    args = p.parse_args(argv)
    for case in args.only.split(","):
        name, module, measure, unit = CASES[case]
        trees = {"current": os.path.join(ROOT, module)}
        if args.ref:
            flat_names()
            old = subprocess.run(["git", "-C", ROOT, "show", f"{args.ref}:{module}"], capture_output=True)
            if old.returncode:  # a tree from before services/ had folders
                old = subprocess.run(["git", "-C", ROOT, "show", f"{args.ref}:{FLAT[module]}"], check=True,
                                     capture_output=True)
            old = old.stdout
            path = os.path.join(tempfile.mkdtemp(), os.path.basename(module))
            with open(path, "wb") as f:
                f.write(old)
            trees[args.ref] = path
        for label, path in trees.items():
            mod = load(path, f"{case}_{label.replace('~', '_')}")
            print(f"{name} {label}: {measure(mod):.2f} {unit}")


if __name__ == "__main__":
    sys.exit(main())
