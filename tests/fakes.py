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


class ContextProvider:
    """Answers with what it was given: "answer N to <prompt> after [role: text | ...]" (N counts its replies,
    so two answers to one question differ)."""

    def __init__(self, pipeline):
        self.replies = 0

    async def stream(self, request):
        self.replies += 1
        context = " | ".join(f"{t.role}: {t.text}" for t in request.history)
        yield Chunk(text=f"answer {self.replies} to {request.prompt.text} after [{context}]")


FAKE_PROVIDERS = {"stall": StallProvider, "fail": FailProvider, "empty": EmptyProvider, "context": ContextProvider}
