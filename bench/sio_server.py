"""The python-socketio baseline for broadcast and idle connections: AsyncServer on Tornado, one HTTP endpoint
that emits a broadcast to every client.

    python -m bench.sio_server --port 9200
"""
import argparse
import asyncio
import json

import socketio
import tornado.web

from bench.common import raise_fd_limit


class Broadcast(tornado.web.RequestHandler):
    def initialize(self, sio):
        self.sio = sio

    def check_xsrf_cookie(self):
        pass

    async def post(self):
        body = json.loads(self.request.body)
        await self.sio.emit("broadcast", {"message": body["message"]})
        self.finish({"code": 0})


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    raise_fd_limit()
    sio = socketio.AsyncServer(async_mode="tornado", cors_allowed_origins="*")
    app = tornado.web.Application([(r"/socket.io/", socketio.get_tornado_handler(sio)),
                                   (r"/api/v1/broadcast", Broadcast, {"sio": sio})])
    app.listen(args.port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
