"""Parley command-line client, on Tornado's websocket_connect.

  make client                              interactive chat with the `default` pipeline (or: .venv/bin/parley-client)
  python client.py default                 the same; the pipeline is the first argument, as in LangBot's client
  python client.py default --multi 5       5 concurrent connections, each in its own session, each sends once
  python client.py --resume-demo           send, drop the connection mid-reply, reconnect and resume from offsets

In the chat, lines starting with `/` are commands for the client and never reach the model: /help lists them.
A reply's reasoning prints apart from its answer (dimmed on a terminal; --thinking hide leaves it out). When the
server goes away (a restart), the client says so, reconnects with backoff and resumes every unfinished reply
from the offsets it holds; what you type meanwhile is sent once it is back.
The token comes from --token, --token-file, the PARLEY_TOKEN environment variable, the `?token=` of the URL
`make run` prints (pass it as --url), or, with none of them, from the server `make run` started in this
directory (data/server.json: its URL too). Replies stream in `delta` mode; offsets count Unicode code points.
"""
import argparse
import asyncio
import json
import os
import stat
import sys
import time
import uuid
from urllib.parse import parse_qs, urlsplit

try:
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
    from tornado.websocket import WebSocketClosedError, WebSocketError, websocket_connect

    from services.operations import runtime
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


DEFAULT_URL = "ws://127.0.0.1:8888"


class Chat:
    """One WebSocket at a time: JSON frames in and out, plus what we hold of each reply (which outlives a
    connection: after a reconnect, `resume_frame()` asks for the rest from the offsets held)."""

    def __init__(self, args, session_id=None):
        self.args = args
        self.session_id = session_id
        self.ws = None
        self.text = {}       # message_id -> answer text received so far
        self.thinking = {}
        self.epochs = {}     # message_id -> the epoch (owner) of the text held (docs/protocol.md `rewind`)
        self.finals = set()  # replies whose final frame we have

    def _headers(self):
        return {"Authorization": f"Bearer {self.args.token}"} if self.args.token else {}

    async def connect(self):
        url = (f"{self.args.url}/api/v1/pipelines/{self.args.pipeline}/ws/connect?stream_mode=delta"
               f"&session_type={self.args.session_type}")
        if self.session_id:
            url += f"&session_id={self.session_id}"
        self.ws = await websocket_connect(HTTPRequest(url, headers=self._headers(), connect_timeout=10,
                                                      request_timeout=10), subprotocols=["parley.v1"])
        hello = await self.recv(timeout=10)
        if hello.get("type") != "connected":
            raise Refused(hello.get("message") or hello.get("code") or f"unexpected first frame: {hello}")
        self.session_id = hello["session_id"]
        return hello

    async def send(self, frame):
        """Raises ConnectionError when the socket is closed (the caller decides what to do)."""
        if self.ws is None:
            raise ConnectionError("not connected")
        try:
            await self.ws.write_message(json.dumps(frame))
        except WebSocketClosedError:
            raise ConnectionError("the connection is closed") from None

    async def recv(self, timeout=60):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError(self.ws.close_reason or "the server closed the connection")
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
        """Apply one response frame to what we hold; returns the new (answer, reasoning) it brought, or None
        when it starts past what we hold (a gap: resume from our offsets)."""
        mid = data["message_id"]
        fresh = {}
        for key, off, store in (("delta", "offset", self.text), ("thinking_delta", "thinking_offset", self.thinking)):
            if key in data:
                have = store.get(mid, "")
                if data[off] > len(have):
                    return None
                new = data[key][len(have) - data[off]:]
                store[mid] = have + new
                fresh[key] = new
        return fresh.get("delta", ""), fresh.get("thinking_delta", "")

    def complete(self, mid, kind, whole):
        """Take a final's whole text (or reasoning) as ours; returns the part we lacked ("" if none)."""
        store = self.text if kind == "text" else self.thinking
        have = store.get(mid, "")
        if len(whole) > len(have) and whole.startswith(have):
            store[mid] = whole
            return whole[len(have):]
        return ""

    def cut(self, mid, offset, thinking_offset, epoch=None):
        """Text past the offsets is void (its server was lost before storing it): drop it. True if any went."""
        if epoch is not None:
            if self.epochs.get(mid, epoch) > epoch:
                return False  # an instance that has not heard of the newer owner yet
            self.epochs[mid] = epoch
        text, thinking = self.text.get(mid, ""), self.thinking.get(mid, "")
        if offset >= len(text) and thinking_offset >= len(thinking):
            return False
        self.text[mid], self.thinking[mid] = text[:offset], thinking[:thinking_offset]
        return True

    def offsets(self, mid):
        offsets = {"offset": len(self.text.get(mid, "")), "thinking_offset": len(self.thinking.get(mid, ""))}
        if mid in self.epochs:
            offsets["epoch"] = self.epochs[mid]
        return offsets

    def resume_frame(self):
        """Every reply we hold unfinished, from where our copy ends (the server adds live ones we lack)."""
        unfinished = {mid: self.offsets(mid) for mid in {*self.text, *self.thinking} - self.finals}
        return {"type": "resume", "session_id": self.session_id, "offsets": unfinished}

    def close(self):
        if self.ws is not None:
            self.ws.close()


class Refused(Exception):
    """The server answered the connection with something other than `connected`."""


class Fatal(Exception):
    """The chat cannot go on (the message says why and what to do)."""


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
    try:
        code, body = await rest(args, "/sessions")
    except OSError as exc:
        return f"[could not list sessions: {exc.strerror or exc}]"
    if code != 200:
        return f"[could not list sessions: {body.get('message', code)}]"
    lines = [f"{'*' if s['session_id'] == current else ' '} {s['session_id']}  {s['session_type']:6}  "
             f"{s['last_seq']:3} messages  {s['title'] or '(untitled)'}" for s in body["data"]["sessions"]]
    return "\n".join(lines) or "(no sessions)"


DIM, RESET = "\x1b[2m", "\x1b[0m"
RECONNECT_MIN, RECONNECT_MAX = 0.25, 8.0  # seconds between attempts while the server is away


class Screen:
    """What the chat prints: a reply's reasoning apart from its answer (dimmed on a terminal, after a
    `thinking:` label; --thinking hide leaves it out), the client's own notes in brackets on stderr."""

    def __init__(self, args):
        self.show_thinking = args.thinking == "show"
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.part = {}  # message_id -> "thinking" | "answer": what its last printed piece was

    def note(self, text):
        print(text, file=sys.stderr, flush=True)

    def reply(self, mid, answer, thinking):
        out = ""
        if thinking and self.show_thinking:
            if self.part.get(mid) != "thinking":
                out += "thinking: "
            out += f"{DIM}{thinking}{RESET}" if self.color else thinking
            self.part[mid] = "thinking"
        if answer:
            if self.part.get(mid) == "thinking":
                out += "\n\n"  # the answer starts on a line of its own
            self.part[mid] = "answer"
            out += answer
        print(out, end="", flush=True)

    def end(self, mid, status):
        print("", flush=True)
        self.part.pop(mid, None)
        self.note(f"[{status}]")


async def input_lines():
    """readline() for what the user types: a terminal or pipe through the loop; a file (or /dev/null, which the
    loop's poller refuses) in a thread, so `make client < script.txt` works too."""
    loop = asyncio.get_running_loop()
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if sys.stdin.isatty() or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return reader.readline
    return lambda: loop.run_in_executor(None, sys.stdin.buffer.readline)


async def interactive(args):
    await preflight(args)
    chat = Chat(args, args.session_id)
    hello = await chat.connect()
    screen = Screen(args)
    screen.note(f"connected to {args.pipeline} (session {hello['session_id']}); type /help for commands")
    readline = await input_lines()
    last = {"id": None}
    online = asyncio.Event()
    online.set()
    waiting = []  # messages typed while the server was away: sent (idempotently) once it is back

    def show(frame):
        data = frame.get("data", {})
        if frame["type"] == "response" and data.get("role", "assistant") == "assistant":
            mid = data["message_id"]
            last["id"] = mid
            if mid in chat.finals:
                return
            fresh = chat.take(data)
            if fresh is None:  # a gap: ask for the rest from what we hold
                return asyncio.ensure_future(send_quietly({"type": "resume", "message_id": mid,
                                                           **chat.offsets(mid)}))
            if data.get("is_final"):  # the whole text: what we lack of it (a final that carries no delta)
                fresh = (fresh[0] + chat.complete(mid, "text", data.get("content", "")),
                         fresh[1] + chat.complete(mid, "thinking", data.get("thinking", "")))
            screen.reply(mid, *fresh)
            if data.get("is_final"):
                chat.finals.add(mid)
                screen.end(mid, data.get("status", "completed"))
        elif frame["type"] == "resumed":
            for reply in data.get("replies", []):
                screen.note(f"[resuming {reply['message_id']} at {reply['offset']}: {reply['status']}]")
                if reply["message_id"] not in chat.finals and chat.cut(
                        reply["message_id"], reply["offset"], reply["thinking_offset"], reply.get("epoch")):
                    screen.note(f"[the text after character {reply['offset']} was lost with its server; "
                                "it goes on from there:]")
        elif frame["type"] == "status" and "epoch" in data:
            mid = data["message_id"]
            if not chat.text.get(mid) and not chat.thinking.get(mid):
                chat.epochs[mid] = data["epoch"]
        elif frame["type"] == "rewind":
            mid = data["message_id"]
            if mid not in chat.finals and chat.cut(mid, data["offset"], data["thinking_offset"], data["epoch"]):
                screen.note(f"\n[the server handling this reply went away; the text after character "
                            f"{data['offset']} was not saved and another server goes on from there:]")
        elif frame["type"] == "error":
            screen.note(f"\n[error {frame.get('code')}: {frame.get('message')}]")

    async def send_quietly(frame):
        try:
            await chat.send(frame)
        except ConnectionError:
            pass  # the reader notices the loss and reconnects; a resume follows

    async def reconnect(reason):
        """Until the server is back (a restart, a deploy): then resume every reply we hold unfinished."""
        online.clear()
        chat.close()
        screen.note(f"\n[the connection to the server was lost ({reason}); reconnecting…]")
        delay, attempts = RECONNECT_MIN, 0
        while True:
            await asyncio.sleep(delay)
            attempts += 1
            try:
                await chat.connect()
                break
            except HTTPClientError as exc:
                if exc.code in (401, 403):
                    raise Fatal("[the server refused this client's token after it came back: if it makes "
                                     "a new token at each start, run the client again with the new one]") from None
                problem = str(exc)
            except (OSError, ConnectionError, Refused, WebSocketError, asyncio.TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
            if attempts in (4, 16) or attempts % 60 == 0:
                screen.note(f"[still reconnecting ({problem})]")
            delay = min(delay * 2, RECONNECT_MAX)
        screen.note(f"[reconnected (session {chat.session_id})]")
        await chat.send(chat.resume_frame())
        while waiting:
            await chat.send(waiting.pop(0))
        online.set()

    async def receive():
        while True:
            try:
                frame = await chat.recv(timeout=None)
            except (ConnectionError, WebSocketClosedError) as exc:
                await reconnect(str(exc) or "closed")
                continue
            if frame["type"] == "reconnect":  # the server is going away (a restart): it closes next
                await reconnect(f"server: {frame.get('reason') or 'reconnect'}")
                continue
            show(frame)

    async def command(line):
        name = line.split()[0]
        if name == "/help":
            screen.note(HELP)
        elif name == "/sessions":
            screen.note(await list_sessions(args, chat.session_id))
        elif not online.is_set():
            screen.note("[not connected: reconnecting to the server…]")
        elif name == "/stop":
            await send_quietly({"type": "stop"})
        elif name == "/resume":
            if last["id"] is None:
                screen.note("[nothing to resume yet]")
            else:
                await send_quietly({"type": "resume", "message_id": last["id"], **chat.offsets(last["id"])})
        else:
            screen.note(f"[unknown command {name}; /help lists them, //text sends a message starting with /]")

    receiver = asyncio.create_task(receive())
    lines = asyncio.ensure_future(readline())
    try:
        while True:
            await asyncio.wait([lines, receiver], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():
                receiver.result()  # a fatal end (Fatal) surfaces here
            if not lines.done():
                continue
            line = lines.result().decode()
            if not line:
                break  # Ctrl-D
            lines = asyncio.ensure_future(readline())
            line = line.strip()
            if not line:
                continue
            if line == "/quit":
                break
            if line.startswith("/") and not line.startswith("//"):
                await command(line)
                continue
            if line.startswith("//"):
                line = line[1:]
            frame = {"type": "message", "message": [{"type": "Plain", "text": line}],
                     "client_msg_id": uuid.uuid4().hex}
            if not online.is_set():
                waiting.append(frame)
                screen.note("[not connected: the message is sent when the server is back]")
                continue
            try:
                await chat.send(frame)
            except ConnectionError:
                waiting.append(frame)  # the reader is reconnecting; a client_msg_id makes a resend safe
    finally:
        lines.cancel()
        receiver.cancel()
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
    p.add_argument("--url", default=os.environ.get("PARLEY_URL"),
                   help="server base URL, ws(s):// or http(s)://; the URL `make run` prints (with ?token=) works "
                        "as it is (env PARLEY_URL; default: the server `make run` started in this directory, "
                        f"from data/server.json, else {DEFAULT_URL})")
    p.add_argument("--token", help="sent as Authorization: Bearer (default: env PARLEY_TOKEN)")
    p.add_argument("--token-file", metavar="FILE", help="read the token from this file")
    p.add_argument("--session-type", choices=["person", "group"], default="person")
    p.add_argument("--session-id", help="join this session instead of your default one")
    p.add_argument("--thinking", choices=["show", "hide"], default="show",
                   help="a reply's reasoning: shown apart from the answer, dimmed on a terminal (default), or hidden")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--multi", type=int, metavar="N", help="N concurrent connections, each in its own session, "
                      "each sends --text once and reads the reply (LangBot's test client's --multi)")
    mode.add_argument("--resume-demo", action="store_true", help="drop mid-reply and resume from offsets")
    p.add_argument("--cut-after", type=int, default=10, help="frames to read before dropping (--resume-demo)")
    p.add_argument("--text", default="Tell me about resumable streams.", help="what --multi and --resume-demo send")
    return p


def resolve(args):
    """Fill pipeline, token and both URL forms (ws for the socket, http for REST) from what was given. Without a
    URL or a token, the server `make run` started in this directory (services/operations/runtime.py) provides them."""
    running = runtime.read(os.environ.get("PARLEY_DATA_DIR") or "data")
    args.url = args.url or (running["url"] if running else DEFAULT_URL)
    parts = urlsplit(args.url)
    token_in_url = parse_qs(parts.query).get("token", [None])[0]
    if args.token_file:
        with open(args.token_file) as f:
            args.token = f.read().strip()
    args.token = args.token or token_in_url or os.environ.get("PARLEY_TOKEN") or None
    if args.token is None and running and running["token"] and urlsplit(running["url"]).netloc == parts.netloc:
        args.token = running["token"]
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
    except (Fatal, Refused) as exc:
        raise SystemExit(str(exc)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
