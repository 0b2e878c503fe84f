"""LLM providers: turn a prompt into an async stream of Chunks.

A provider is an object with `stream(request) -> AsyncIterator[Chunk]` (an async generator). The stream
manager consumes it inside `contextlib.aclosing`, so cancelling the generation closes the generator at once;
a provider that holds an upstream connection must release it in its own `finally`.

Errors: raise ProviderError with a stable code. Timeouts (first token, stall, total) are enforced around any
provider by services/replies/streams.py, so providers need not implement them.
"""
from dataclasses import dataclass, field

from services.wire.codes import ReplyCode


@dataclass
class Chunk:
    text: str = ""          # answer text increment
    thinking: str = ""      # reasoning increment
    usage: dict | None = None  # {"prompt_tokens": n, "completion_tokens": m} when the upstream reports it
    model: str | None = None


@dataclass
class Turn:
    role: str        # "user" | "assistant"
    text: str
    sender: str | None = None  # user id of a user turn (group sessions label speakers)
    images: tuple = ()         # image URLs (http(s) or data:) sent with the prompt (pipelines with image input)


@dataclass
class GenerationRequest:
    pipeline: "object"           # services.operations.pipelines.Pipeline
    session_id: str
    session_type: str
    message_id: str
    history: list = field(default_factory=list)  # earlier Turns, oldest first, already windowed
    prompt: Turn = None
    # A continuation (services/cluster/failover.py): the answer so far, stored by an instance that was lost; the stream
    # goes on from its end (the chunks are what comes after it, never it again)
    partial: str | None = None
    partial_thinking: str = ""


class ProviderError(Exception):
    """A provider failure that ends the reply with `status` and a stable `code` (docs/protocol.md)."""

    def __init__(self, code, message, *, status=None, detail=None):
        super().__init__(message)
        self.code = ReplyCode(code)  # a row of services/wire/codes.py's table: it says the status the reply ends with
        self.message = message    # shown to viewers and stored: never the upstream's own words
        self.status = status or self.code.status
        self.detail = detail      # for the log only (e.g. the upstream's error text)


def make_provider(pipeline):
    kind = pipeline.provider
    if kind == "demo":
        from services.providers.demo import DemoProvider
        return DemoProvider(pipeline)
    if kind == "openai":
        from services.providers.openai_compat import OpenAIProvider
        return OpenAIProvider(pipeline)
    raise ValueError(f"unknown provider {kind!r}")
