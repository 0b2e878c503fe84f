"""First reply vs tenth: start a real `server.py` (embedded store, fresh data dir), then time ten replies.

    .venv/bin/python scripts/first_reply.py [--runs 3] [server.py options...]

For each reply: connect (the first connection of the process too), send, time to the first answer text and to
the final frame. `--provider demo` (default) runs the demo at full speed (rate 0), so the numbers are Parley's
own overhead; `--provider openai` talks to a fake OpenAI-compatible upstream on loopback (tests/upstream.py), so
they include the OpenAI client's start-up.
Prints a table and the median over runs of reply 1 and reply 10. Numbers go in docs/operations.md ("Warm-up").
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from services.storage.embedded_mongo import free_port  # noqa: E402

TOKEN = "first-reply-token-0123456789"
PIPELINES = {
    "demo": '[pipelines.default]\nprovider = "demo"\noptions = { rate = 0, words = 40 }\n',
    "openai": '[pipelines.default]\nprovider = "openai"\nmodel = "m"\nbase_url = "{url}"\n',
}


async def wait_ready(port, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/readyz", raise_error=False)
            if r.code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("server did not become ready")


async def one_reply(port, text):
    started = time.perf_counter()
    ws = await websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{port}/api/v1/pipelines/default/ws/connect?stream_mode=delta",
        headers={"Authorization": f"Bearer {TOKEN}"}))
    connected = time.perf_counter()
    await ws.read_message()
    sent = time.perf_counter()
    await ws.write_message(json.dumps({"type": "message", "message": [{"type": "Plain", "text": text}]}))
    first = None
    while True:
        frame = json.loads(await asyncio.wait_for(ws.read_message(), 30))
        if frame["type"] != "response" or frame["data"].get("role") != "assistant":
            continue
        if first is None:
            first = time.perf_counter()
        if frame["data"]["is_final"]:
            done = time.perf_counter()
            ws.close()
            return {"connect": connected - started, "first_token": first - sent, "total": done - sent}


async def run_once(provider, extra, upstream_url):
    with tempfile.TemporaryDirectory() as tmp:
        pipelines = Path(tmp) / "p.toml"
        pipelines.write_text(PIPELINES[provider].replace("{url}", upstream_url or ""))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port), "--data-dir", tmp,
                                 "--pipelines", str(pipelines), "--log-level", "warning", *extra],
                                cwd=ROOT, env={**env, "PARLEY_TOKEN": TOKEN}, stdout=subprocess.DEVNULL)
        try:
            await wait_ready(port, proc)
            return [await one_reply(port, f"question number {i}") for i in range(1, 11)]
        finally:
            proc.terminate()
            proc.wait(30)


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--provider", choices=sorted(PIPELINES), default="demo")
    args, extra = p.parse_known_args()
    upstream = None
    if args.provider == "openai":
        from tests.upstream import FakeUpstream, Script
        upstream = FakeUpstream()
        await upstream.start()
        upstream.plan("m", Script(content=["word "] * 40))
    try:
        runs = [await run_once(args.provider, extra, upstream and upstream.base_url) for _ in range(args.runs)]
    finally:
        if upstream:
            await upstream.stop()
    print(f"provider {args.provider}")
    ms = lambda v: f"{v * 1000:7.1f}"  # noqa: E731
    print("reply  connect ms  first token ms  total ms   (median of %d runs)" % args.runs)
    for i in range(10):
        med = {k: statistics.median(r[i][k] for r in runs) for k in ("connect", "first_token", "total")}
        print(f"{i + 1:5}  {ms(med['connect'])}     {ms(med['first_token'])}       {ms(med['total'])}")


if __name__ == "__main__":
    asyncio.run(main())
