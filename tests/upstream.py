"""A fake OpenAI-compatible Chat Completions server for tests: a small Tornado app on a free loopback port that
speaks the streaming SSE format, misbehaves on request, and records what it received and when its client left.

    upstream = FakeUpstream(api_key="sk-test")      # api_key=None accepts any (or no) key
    await upstream.start()                           # inside the running loop
    upstream.plan("m", Script(status=429), Script(content=["Hi", "!"]))   # per model; the last one repeats
    ... AsyncOpenAI(base_url=upstream.base_url) ...
    call = upstream.calls[-1]; call.body["messages"]; await call.wait_disconnect(1.0)
    await upstream.stop()

A model with no plan gets a 404 `model_not_found`, as real servers answer.
"""
import asyncio
import json
import socket
import time
from dataclasses import dataclass, field

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web


@dataclass
class Script:
    content: list = field(default_factory=lambda: ["Hello", ", ", "world", "."])
    reasoning: list = field(default_factory=list)   # sent before the content, in `reasoning_field`
    reasoning_field: str = "reasoning_content"     # vLLM/DeepSeek; OpenRouter and newer vLLM use "reasoning"
    rate: float = 0.0                # chunks per second; 0 = as fast as possible
    status: int = 200                # anything else: an OpenAI-style JSON error body, no stream
    retry_after: str | None = None   # Retry-After header on an error status
    stall_before_headers: bool = False   # accept the request, then never answer
    stall_after: int | None = None   # send K chunks, then hang until the client disconnects
    error_after: int | None = None   # send K chunks, then an in-stream {"error": ...} event and end
    close_after: int | None = None   # send K chunks, then drop the TCP connection mid-body
    malformed_after: int | None = None   # send K chunks, then `malformed` as a data line, and end
    malformed: str = "{this is not json"     # e.g. '{"choices": "oops"}': JSON of the wrong shape
    finish: bool = True              # send the finish_reason chunk
    done: bool = True                # end with `data: [DONE]` (False: the body just ends)
    reported_model: str | None = None    # the `model` in chunks; default: the requested model
    comments: bool = False           # an SSE comment line (": keep-alive") before every chunk, as OpenRouter does


@dataclass
class Call:
    body: dict
    headers: dict
    started: float                   # time.monotonic()
    chunks_sent: int = 0
    status: int = 200
    completed: bool = False          # the stream ended normally
    disconnected: float | None = None    # time.monotonic() when the client went away
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model(self):
        return self.body.get("model")

    async def wait_disconnect(self, timeout):
        await asyncio.wait_for(self.released.wait(), timeout)
        return self.disconnected


class FakeUpstream:
    def __init__(self, *, api_key=None):
        self.api_key = api_key
        self.calls = []
        self._plans = {}
        self._server = None
        self.port = None

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def plan(self, model, *scripts):
        self._plans[model] = list(scripts)

    def _next_script(self, model):
        scripts = self._plans.get(model)
        if not scripts:
            return None
        return scripts.pop(0) if len(scripts) > 1 else scripts[0]

    async def start(self, port=0):
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        app = tornado.web.Application([(r"/v1/chat/completions", ChatCompletionsHandler, {"upstream": self})])
        self._server = tornado.httpserver.HTTPServer(app)
        self._server.add_sockets(sockets)
        return self

    async def stop(self):
        if self._server is None:
            return
        self._server.stop()
        for call in self.calls:
            call.released.set()       # let stalled handlers return
        await self._server.close_all_connections()
        self._server = None

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc):
        await self.stop()


def closed_port():
    """A loopback port with nothing listening: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChatCompletionsHandler(tornado.web.RequestHandler):
    def initialize(self, upstream):
        self.upstream = upstream
        self.call = None
        self.script = None

    def on_connection_close(self):
        if self.call and self.call.disconnected is None and not self.call.completed:
            self.call.disconnected = time.monotonic()
            self.call.released.set()

    def _error(self, status, message, code=None, retry_after=None):
        self.call.status = status
        self.set_status(status)
        if retry_after is not None:
            self.set_header("Retry-After", retry_after)
        kind = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        self.finish({"error": {"message": message, "type": kind.get(status, "server_error"), "code": code}})

    async def post(self):
        body = json.loads(self.request.body)
        self.call = Call(body=body, headers=dict(self.request.headers), started=time.monotonic())
        self.upstream.calls.append(self.call)
        auth = self.request.headers.get("Authorization", "")
        if self.upstream.api_key is not None and auth != f"Bearer {self.upstream.api_key}":
            # Like OpenAI, echo (part of) what was sent: the provider must scrub it.
            return self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
                               "invalid_api_key")
        script = self.upstream._next_script(body.get("model"))
        if script is None:
            return self._error(404, f"The model `{body.get('model')}` does not exist", "model_not_found")
        if script.status != 200:
            return self._error(script.status, f"scripted status {script.status}", retry_after=script.retry_after)
        if script.stall_before_headers:
            await self.call.released.wait()
            return

        self.script = script
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        model = script.reported_model or body.get("model")
        pieces = [{script.reasoning_field: r} for r in script.reasoning] + [{"content": c} for c in script.content]
        try:
            for i, delta in enumerate(pieces):
                if i == script.stall_after:
                    await self.call.released.wait()
                    return
                if i == script.close_after:
                    self.detach().close()    # mid-body: no terminating chunk
                    return
                if i == script.error_after:
                    await self._send({"error": {"message": "scripted failure mid-stream", "type": "server_error",
                                                "code": 500}})
                    self.call.completed = True
                    return
                if i == script.malformed_after:
                    await self._send_raw(f"data: {script.malformed}\n\n")
                    self.call.completed = True
                    return
                if script.rate and i:
                    await asyncio.sleep(1 / script.rate)
                    if self.call.disconnected:
                        return
                if i == 0:
                    delta = {"role": "assistant", **delta}
                await self._send(_chunk(model, delta))
                self.call.chunks_sent += 1
            n = len(pieces)
            if n == script.stall_after:
                await self.call.released.wait()
                return
            if n == script.close_after:
                self.detach().close()
                return
            if n == script.error_after:
                await self._send({"error": {"message": "scripted failure mid-stream", "type": "server_error"}})
                self.call.completed = True
                return
            if script.finish:
                await self._send(_chunk(model, {}, finish_reason="stop"))
            if (body.get("stream_options") or {}).get("include_usage"):
                words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                await self._send({**_chunk(model, None), "choices": [],
                                  "usage": {"prompt_tokens": words, "completion_tokens": n,
                                            "total_tokens": words + n}})
            if script.done:
                await self._send_raw("data: [DONE]\n\n")
            self.call.completed = True
        except tornado.iostream.StreamClosedError:
            self.on_connection_close()

    async def _send(self, obj):
        if self.script.comments:
            self.write(": keep-alive\n\n")
        await self._send_raw(f"data: {json.dumps(obj)}\n\n")

    async def _send_raw(self, text):
        self.write(text)
        await self.flush()


def _chunk(model, delta, finish_reason=None):
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": []}
    if delta is not None:
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return chunk
