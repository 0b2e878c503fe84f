"""Small named fake providers for the failure paths of the stream manager (pure logic, no network)."""
import asyncio

from services.providers import Chunk, ProviderError


class StallProvider:
    """Sends `before_first` seconds of silence, two chunks, then hangs forever."""

    def __init__(self, pipeline):
        self.before_first = float(pipeline.options.get("before_first", 0))

    async def stream(self, request):
        await asyncio.sleep(self.before_first)
        yield Chunk(text="half")
        yield Chunk(text=" a reply")
        await asyncio.Event().wait()


class FailProvider:
    """Sends some text, then fails the way an upstream outage does."""

    def __init__(self, pipeline):
        pass

    async def stream(self, request):
        yield Chunk(text="partial")
        await asyncio.sleep(0)
        raise ProviderError("upstream_error", "the upstream answered 502")


class EmptyProvider:
    def __init__(self, pipeline):
        pass

    async def stream(self, request):
        yield Chunk(usage={"prompt_tokens": 1, "completion_tokens": 0})


FAKE_PROVIDERS = {"stall": StallProvider, "fail": FailProvider, "empty": EmptyProvider}
