"""The bare Tornado baseline: the least a Tornado WebSocket server can do to stream the same replies.

It speaks just enough of Parley's protocol (same URL, `connected`, `ack`, `response` frames shaped and sized
like Parley's delta frames, `stop_ack`, `resumed`, REST broadcast) that bench/client.py drives it exactly as it
drives Parley. No store, no auth, no metrics: each frame is built and JSON-encoded, then written.

    python -m bench.baseline --port 9000 --pipelines '{"relay": {"n": 5000, "rate": 0}}'
"""
import argparse
import asyncio
import datetime
import json

import tornado.web
import tornado.websocket

from bench.common import dumps, new_id, raise_fd_limit, token


def timestamp():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


class Socket(tornado.websocket.WebSocketHandler):
    def initialize(self, state):
        self.state = state
        self.task = None

    def check_origin(self, origin):
        return True

    def open(self, pipeline):
        self.set_nodelay(True)
        self.pipeline = pipeline
        self.session_id = new_id()
        self.state["sockets"].add(self)
        self.write_message(dumps({"type": "connected", "connection_id": new_id(), "session_id": self.session_id,
                                  "timestamp": timestamp()}))

    def on_close(self):
        self.state["sockets"].discard(self)
        if self.task:
            self.task.cancel()

    def on_message(self, message):
        frame = json.loads(message)
        kind = frame.get("type")
        if kind == "message":
            reply = Reply(self.state["pipelines"][self.pipeline], self.session_id)
            self.write_message(dumps({"type": "ack", "data": {"message_id": new_id(),
                                                              "reply_message_id": reply.message_id}}))
            if self.pipeline == "fan":  # a group session: every viewer of the pipeline gets the reply
                self.task = asyncio.ensure_future(reply.stream(
                    [s for s in self.state["sockets"] if s.pipeline == self.pipeline]))
            else:
                self.task = asyncio.ensure_future(reply.stream([self]))
        elif kind == "stop":
            if self.task:
                self.task.cancel()
            self.write_message(dumps({"type": "stop_ack", "data": {"stopped": [], "count": 0}}))
            self.write_message(dumps({"type": "response", "data": {"is_final": True, "status": "stopped"}}))
        elif kind == "resume":
            self.write_message(dumps({"type": "resumed", "data": {"replies": []}}))
        elif kind == "ping":
            self.write_message(dumps({"type": "pong", "timestamp": timestamp()}))


class Reply:
    def __init__(self, spec, session_id):
        self.spec = spec
        self.session_id = session_id
        self.message_id = new_id()
        self.conn_id = new_id()

    def frame(self, offset, text, is_final=False):
        data = {"id": 2, "role": "assistant", "timestamp": timestamp(), "is_final": is_final,
                "connection_id": self.conn_id, "session_id": self.session_id, "message_id": self.message_id,
                "seq": 2, "reply_to": self.message_id}
        if is_final:
            data.update(content=text, message_chain=[{"type": "Plain", "text": text}], status="completed")
        else:
            data.update(offset=offset, delta=text)
        return dumps({"type": "response", "data": data})

    async def stream(self, sockets):
        spec, loop = self.spec, asyncio.get_running_loop()
        start, parts, offset = loop.time(), [], 0
        for i in range(spec["n"]):
            if spec["rate"]:
                await asyncio.sleep(max(0.0, start + i / spec["rate"] - loop.time()))
            text = token(i, spec)
            data = self.frame(offset, text)  # encoded once, the same bytes to every socket
            parts.append(text)
            offset += len(text)
            for s in sockets:
                if s.ws_connection is not None:
                    future = s.write_message(data)
            if len(sockets) == 1 and not spec["rate"]:
                await future  # one reader at full speed: wait for the socket like a well-behaved handler
        final = self.frame(0, "".join(parts), is_final=True)
        for s in sockets:
            if s.ws_connection is not None:
                s.write_message(final)


class Broadcast(tornado.web.RequestHandler):
    def initialize(self, state):
        self.state = state

    def check_xsrf_cookie(self):
        pass

    def post(self):
        body = json.loads(self.request.body)
        data = dumps({"type": "broadcast", "message": body["message"], "timestamp": timestamp()})
        delivered = 0
        for s in list(self.state["sockets"]):
            s.write_message(data)
            delivered += 1
        self.finish({"code": 0, "data": {"delivered": delivered}})


def make_app(pipelines):
    state = {"sockets": set(), "pipelines": pipelines}
    return tornado.web.Application([
        (r"/api/v1/pipelines/(?P<pipeline>[^/]+)/ws/connect", Socket, {"state": state}),
        (r"/api/v1/broadcast", Broadcast, {"state": state}),
    ])


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pipelines", required=True, help="JSON: name -> spec (bench/common.py)")
    args = p.parse_args()
    raise_fd_limit()
    pipelines = json.loads(args.pipelines)
    make_app(pipelines).listen(args.port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
