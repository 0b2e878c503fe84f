"""A fast OpenAI-compatible streaming upstream for the bench: answers /v1/chat/completions with SSE chunks.

The model name picks the pipeline spec (bench/common.py): a full-speed reply is encoded up front and written
in one go, so the upstream is never the bottleneck; a paced one writes each (stamped) token on its schedule.

    python -m bench.upstream --port 9100 --pipelines '{"fast": {"n": 5000, "rate": 0}}'
"""
import argparse
import asyncio
import json

import tornado.iostream
import tornado.web

from bench.common import raise_fd_limit, token


def sse(obj):
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(model, content=None, finish=None):
    delta = {"content": content} if content is not None else {}
    return sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def tail(model, n):
    return (chunk(model, finish="stop")
            + sse({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": n + 5}})
            + b"data: [DONE]\n\n")


class Completions(tornado.web.RequestHandler):
    def initialize(self, pipelines, cache):
        self.pipelines = pipelines
        self.cache = cache

    def check_xsrf_cookie(self):
        pass

    async def post(self):
        model = json.loads(self.request.body)["model"]
        spec = self.pipelines.get(model)
        if spec is None:
            self.set_status(404)
            return self.finish({"error": {"message": "no such model", "type": "invalid_request_error"}})
        self.set_header("Content-Type", "text/event-stream")
        loop = asyncio.get_running_loop()
        try:
            if not spec["rate"]:
                if model not in self.cache:
                    self.cache[model] = b"".join(chunk(model, token(i, spec)) for i in range(spec["n"]))
                self.write(self.cache[model] + tail(model, spec["n"]))
                await self.flush()
            else:
                start = loop.time()
                for i in range(spec["n"]):
                    await asyncio.sleep(max(0.0, start + i / spec["rate"] - loop.time()))
                    self.write(chunk(model, token(i, spec)))
                    await self.flush()
                self.write(tail(model, spec["n"]))
            self.finish()
        except tornado.iostream.StreamClosedError:
            pass  # the reply was stopped: Parley closed the connection


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pipelines", required=True)
    args = p.parse_args()
    raise_fd_limit()
    app = tornado.web.Application([(r"/v1/chat/completions", Completions,
                                    {"pipelines": json.loads(args.pipelines), "cache": {}})])
    app.listen(args.port, "127.0.0.1", backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
