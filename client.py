"""Parley command-line client, on Tornado's websocket_connect.

  python client.py                         interactive chat (/stop stops the reply, /quit leaves)
  python client.py --multi 5 "hello"       5 concurrent connections, each in its own session, each sends once
  python client.py --resume-demo           send, drop the connection mid-reply, reconnect and resume from offsets

Replies stream in `delta` mode; offsets count Unicode code points, as Python's len() does.
"""
import argparse
import asyncio
import json
import sys
import time
import uuid

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect


class Chat:
    """One WebSocket: JSON frames in and out, plus what we hold of each reply."""

    def __init__(self, args, session_id=None):
        self.args = args
        self.session_id = session_id
        self.ws = None
        self.text = {}       # message_id -> answer text received so far
        self.thinking = {}

    def _headers(self):
        return {"Authorization": f"Bearer {self.args.token}"} if self.args.token else {}

    async def connect(self):
        url = f"{self.args.url}/api/v1/pipelines/{self.args.pipeline}/ws/connect?stream_mode=delta"
        if self.session_id:
            url += f"&session_id={self.session_id}"
        self.ws = await websocket_connect(HTTPRequest(url, headers=self._headers()))
        hello = await self.recv()
        if hello.get("type") != "connected":
            raise SystemExit(f"could not connect: {hello}")
        self.session_id = hello["session_id"]
        return hello

    async def send(self, frame):
        await self.ws.write_message(json.dumps(frame))

    async def recv(self, timeout=60):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("the server closed the connection")
        return json.loads(raw)

    async def say(self, text):
        """Send one message; returns its ack (idempotent: a client_msg_id per message)."""
        await self.send({"type": "message", "message": [{"type": "Plain", "text": text}],
                         "client_msg_id": uuid.uuid4().hex})
        while True:
            frame = await self.recv()
            if frame["type"] in ("ack", "error"):
                return frame

    def take(self, data):
        """Apply one response frame to what we hold; returns the new text (answer + thinking) it brought."""
        mid = data["message_id"]
        fresh = ""
        for key, off, store in (("delta", "offset", self.text), ("thinking_delta", "thinking_offset", self.thinking)):
            if key in data:
                have = store.get(mid, "")
                if data[off] > len(have):
                    raise RuntimeError(f"gap at {data[off]} (have {len(have)})")
                new = data[key][len(have) - data[off]:]
                store[mid] = have + new
                fresh += new
        return fresh

    def close(self):
        if self.ws is not None:
            self.ws.close()


async def create_session(args):
    client = AsyncHTTPClient()
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    response = await client.fetch(f"{args.url.replace('ws', 'http', 1)}/api/v1/pipelines/{args.pipeline}/sessions",
                                  method="POST", body="{}", headers=headers)
    return json.loads(response.body)["data"]["session_id"]


async def interactive(args):
    chat = Chat(args, args.session_id)
    hello = await chat.connect()
    print(f"connected to {args.pipeline} (session {hello['session_id']}); /stop, /quit", file=sys.stderr)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def show():
        while True:
            frame = await chat.recv(timeout=None)
            data = frame.get("data", {})
            if frame["type"] == "response" and data.get("is_final"):
                print(f"\n[{data['status']}]", flush=True)
            elif frame["type"] == "response":
                print(chat.take(data), end="", flush=True)
            elif frame["type"] == "error":
                print(f"\n[error {frame['code']}: {frame['message']}]", flush=True)

    shower = asyncio.create_task(show())
    try:
        while line := (await reader.readline()).decode():
            line = line.strip()
            if line == "/quit":
                break
            if line == "/stop":
                await chat.send({"type": "stop"})
            elif line:
                await chat.send({"type": "message", "message": [{"type": "Plain", "text": line}],
                                 "client_msg_id": uuid.uuid4().hex})
    finally:
        shower.cancel()
        chat.close()


async def multi(args):
    """Like LangBot's test client: N connections at once, each sends one message and reads the reply."""
    async def one(i):
        chat = Chat(args, await create_session(args))
        await chat.connect()
        started = time.monotonic()
        ack = await chat.say(f"{args.text} ({i})")
        if ack["type"] != "ack":
            return i, "error", ack["code"], 0, 0.0
        first = None
        while True:
            frame = await chat.recv()
            data = frame.get("data", {})
            if frame["type"] != "response" or data["message_id"] != ack["data"]["reply_message_id"]:
                continue
            if first is None:
                first = time.monotonic() - started
            if data.get("is_final"):
                chat.close()
                return i, data["status"], len(data["content"]), first, time.monotonic() - started
            chat.take(data)

    results = await asyncio.gather(*(one(i) for i in range(args.multi)))
    for i, status, chars, first, total in results:
        print(f"conn {i}: {status} {chars} chars, first frame {first * 1000:.0f} ms, total {total * 1000:.0f} ms")
    return 0 if all(r[1] == "completed" for r in results) else 1


async def resume_demo(args):
    """Drop mid-reply, reconnect, resume from our offsets; check the stitched text against the final."""
    chat = Chat(args, args.session_id)
    await chat.connect()
    ack = await chat.say(args.text)
    reply_id = ack["data"]["reply_message_id"]
    for _ in range(args.cut_after):
        frame = await chat.recv()
        if frame["type"] == "response" and frame["data"]["message_id"] == reply_id:
            chat.take(frame["data"])
    have = len(chat.text.get(reply_id, ""))
    print(f"dropping the connection after {have} characters", file=sys.stderr)
    chat.close()

    again = Chat(args, chat.session_id)
    again.text, again.thinking = chat.text, chat.thinking
    await again.connect()
    await again.send({"type": "resume", "message_id": reply_id, "offset": have,
                      "thinking_offset": len(chat.thinking.get(reply_id, ""))})
    while True:
        frame = await again.recv()
        data = frame.get("data", {})
        if frame["type"] == "resumed":
            print(f"resumed at offset {data['replies'][0]['offset']} ({data['replies'][0]['status']})", file=sys.stderr)
        elif frame["type"] == "error":
            raise SystemExit(f"resume failed: {frame}")
        elif frame["type"] == "response" and data["message_id"] == reply_id:
            if data["is_final"]:
                break
            again.take(data)
    again.close()
    stitched = again.text.get(reply_id, "")
    print(stitched)
    ok = stitched == data["content"]
    print(f"[{data['status']}] {len(stitched)} characters; stitched text {'equals' if ok else 'DIFFERS FROM'} "
          f"the final", file=sys.stderr)
    return 0 if ok else 1


def build_parser():
    p = argparse.ArgumentParser(description="Parley command-line client")
    p.add_argument("--url", default="ws://127.0.0.1:8888", help="server base URL (ws:// or wss://)")
    p.add_argument("--pipeline", default="default")
    p.add_argument("--token", help="sent as Authorization: Bearer")
    p.add_argument("--session-id")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--multi", type=int, metavar="N", help="N concurrent connections, each sends TEXT once")
    mode.add_argument("--resume-demo", action="store_true", help="drop mid-reply and resume from offsets")
    p.add_argument("--cut-after", type=int, default=10, help="frames to read before dropping (--resume-demo)")
    p.add_argument("text", nargs="?", default="Tell me about resumable streams.")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.multi:
        return asyncio.run(multi(args))
    if args.resume_demo:
        return asyncio.run(resume_demo(args))
    asyncio.run(interactive(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
