"""Parley command-line client, on Tornado's websocket_connect.

  make client                              interactive chat with the `default` pipeline (or: .venv/bin/parley-client)
  python client.py default                 the same; the pipeline is the first argument, as in LangBot's client
  python client.py default --multi 5       5 concurrent connections, each in its own session, each sends once
  python client.py --resume-demo           send, drop the connection mid-reply, reconnect and resume from offsets

In the chat, lines starting with `/` are commands for the client and never reach the model: /help lists them.
The token comes from --token, --token-file, the PARLEY_TOKEN environment variable, or the `?token=` of the URL
`make run` prints (pass it as --url). Replies stream in `delta` mode; offsets count Unicode code points.
"""
import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from urllib.parse import parse_qs, urlsplit

try:
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect
except ImportError:  # run with a Python that lacks Parley's dependencies
    sys.exit("client.py needs Parley's dependencies (Tornado). From the repository, run `make client` "
             "(it creates .venv), or `.venv/bin/parley-client` after `make install`.")

HELP = """commands (never sent to the model):
  /help       this list
  /stop       stop the reply being written
  /resume     fetch the rest of the last reply from where this client's copy ends
  /sessions   list your sessions of this pipeline
  /quit       leave (Ctrl-D too)
  //text      send a message that starts with "/"
anything else is sent to the model"""


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
        url = (f"{self.args.url}/api/v1/pipelines/{self.args.pipeline}/ws/connect?stream_mode=delta"
               f"&session_type={self.args.session_type}")
        if self.session_id:
            url += f"&session_id={self.session_id}"
        self.ws = await websocket_connect(HTTPRequest(url, headers=self._headers()), subprotocols=["parley.v1"])
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


async def rest(args, path, method="GET", body=None, *, under_pipeline=True):
    """A REST call with the client's token; returns (status, parsed JSON body)."""
    prefix = f"/api/v1/pipelines/{args.pipeline}" if under_pipeline else "/api/v1"
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    response = await AsyncHTTPClient().fetch(
        f"{args.http_url}{prefix}{path}", method=method, headers=headers,
        body=None if method == "GET" else json.dumps(body or {}), raise_error=False, request_timeout=15)
    try:
        return response.code, json.loads(response.body or b"{}")
    except ValueError:
        return response.code, {}


async def create_session(args):
    code, body = await rest(args, "/sessions", "POST", {"session_type": args.session_type})
    if code != 201:
        raise SystemExit(f"could not create a session: {body.get('message', code)}")
    return body["data"]["session_id"]


NO_TOKEN_HINT = ("This server needs a token. Pass --token TOKEN (or --token-file FILE, or set PARLEY_TOKEN); "
                 "`make run` prints it in the URL it shows (after ?token=), and --url accepts that URL as it is.")


async def preflight(args):
    """Fail at once, with what to do, rather than after the server's authentication timeout."""
    try:
        code, body = await rest(args, "/pipelines", under_pipeline=False)
    except OSError as exc:
        raise SystemExit(f"cannot reach Parley at {args.http_url} ({exc.strerror or exc}); is it running? "
                         "(`make run` starts it)") from None
    if code == 401:
        raise SystemExit(NO_TOKEN_HINT if not args.token else
                         f"the server refused this token: {body.get('message', 'unauthorized')}")
    if code != 200:
        raise SystemExit(f"the server answered {code}: {body.get('message', '')}")
    names = [p["id"] for p in body["data"]["pipelines"]]
    if args.pipeline not in names:
        raise SystemExit(f"no pipeline {args.pipeline!r} on this server; it has: {', '.join(names)}")


async def list_sessions(args, current):
    code, body = await rest(args, "/sessions")
    if code != 200:
        return f"[could not list sessions: {body.get('message', code)}]"
    lines = [f"{'*' if s['session_id'] == current else ' '} {s['session_id']}  {s['session_type']:6}  "
             f"{s['last_seq']:3} messages  {s['title'] or '(untitled)'}" for s in body["data"]["sessions"]]
    return "\n".join(lines) or "(no sessions)"


async def interactive(args):
    await preflight(args)
    chat = Chat(args, args.session_id)
    hello = await chat.connect()
    say = lambda text="", end="\n": print(text, end=end, file=sys.stderr, flush=True)  # noqa: E731
    say(f"connected to {args.pipeline} (session {hello['session_id']}); type /help for commands")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    last = {"id": None}

    async def show():
        while True:
            frame = await chat.recv(timeout=None)
            data = frame.get("data", {})
            if frame["type"] == "response" and data.get("role", "assistant") == "assistant":
                last["id"] = data.get("message_id", last["id"])
                if data.get("is_final"):
                    print(chat.take(data) if "delta" in data else "", flush=True)
                    say(f"[{data.get('status', 'completed')}]")
                else:
                    print(chat.take(data), end="", flush=True)
            elif frame["type"] == "resumed":
                for reply in data.get("replies", []):
                    say(f"[resuming {reply['message_id']} at {reply['offset']}: {reply['status']}]")
            elif frame["type"] == "error":
                say(f"\n[error {frame.get('code')}: {frame.get('message')}]")

    shower = asyncio.create_task(show())
    try:
        while line := (await reader.readline()).decode():
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                command = line.split()[0]
                if command == "/quit":
                    break
                if command == "/help":
                    say(HELP)
                elif command == "/stop":
                    await chat.send({"type": "stop"})
                elif command == "/resume":
                    if last["id"] is None:
                        say("[nothing to resume yet]")
                    else:
                        await chat.send({"type": "resume", "message_id": last["id"],
                                         "offset": len(chat.text.get(last["id"], "")),
                                         "thinking_offset": len(chat.thinking.get(last["id"], ""))})
                elif command == "/sessions":
                    say(await list_sessions(args, chat.session_id))
                else:
                    say(f"[unknown command {command}; /help lists them, //text sends a message starting with /]")
                continue
            if line.startswith("//"):
                line = line[1:]
            await chat.send({"type": "message", "message": [{"type": "Plain", "text": line}],
                             "client_msg_id": uuid.uuid4().hex})
    finally:
        shower.cancel()
        chat.close()


async def multi(args):
    """Like LangBot's test client: N connections at once, each sends one message and reads the reply."""
    await preflight(args)

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
    await preflight(args)
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
    p = argparse.ArgumentParser(description="Parley command-line client (in the chat, /help lists commands)")
    p.add_argument("pipeline_arg", nargs="?", metavar="PIPELINE", help="pipeline to talk to (default: default)")
    p.add_argument("--pipeline", help="the same, as an option")
    p.add_argument("--url", default=os.environ.get("PARLEY_URL", "ws://127.0.0.1:8888"),
                   help="server base URL, ws(s):// or http(s)://; the URL `make run` prints (with ?token=) works "
                        "as it is (env PARLEY_URL)")
    p.add_argument("--token", help="sent as Authorization: Bearer (default: env PARLEY_TOKEN)")
    p.add_argument("--token-file", metavar="FILE", help="read the token from this file")
    p.add_argument("--session-type", choices=["person", "group"], default="person")
    p.add_argument("--session-id", help="join this session instead of your default one")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--multi", type=int, metavar="N", help="N concurrent connections, each in its own session, "
                      "each sends --text once and reads the reply (LangBot's test client's --multi)")
    mode.add_argument("--resume-demo", action="store_true", help="drop mid-reply and resume from offsets")
    p.add_argument("--cut-after", type=int, default=10, help="frames to read before dropping (--resume-demo)")
    p.add_argument("--text", default="Tell me about resumable streams.", help="what --multi and --resume-demo send")
    return p


def resolve(args):
    """Fill pipeline, token and both URL forms (ws for the socket, http for REST) from what was given."""
    parts = urlsplit(args.url)
    token_in_url = parse_qs(parts.query).get("token", [None])[0]
    if args.token_file:
        with open(args.token_file) as f:
            args.token = f.read().strip()
    args.token = args.token or token_in_url or os.environ.get("PARLEY_TOKEN") or None
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise SystemExit(f"--url must look like ws://host:port or http://host:port, not {args.url!r}")
    base = parts.path.rstrip("/")
    args.url = f"{scheme}://{parts.netloc}{base}"
    args.http_url = f"{'https' if scheme == 'wss' else 'http'}://{parts.netloc}{base}"
    args.pipeline = args.pipeline or args.pipeline_arg or "default"
    return args


def main(argv=None):
    args = resolve(build_parser().parse_args(argv))
    if args.multi is not None and args.multi < 1:
        raise SystemExit("--multi needs at least 1 connection")
    try:
        if args.multi:
            return asyncio.run(multi(args))
        if args.resume_demo:
            return asyncio.run(resume_demo(args))
        asyncio.run(interactive(args))
    except KeyboardInterrupt:
        pass
    except HTTPClientError as exc:
        raise SystemExit(f"the server refused the connection: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
