"""Pipelines: the AI apps clients talk to. Each names a provider, a model and how to call it.

Issue "LLM providers" adds loading them from a TOML file; `default_pipelines()` is what runs when none is given.
"""
from dataclasses import dataclass, field

from services.errors import NotFound


@dataclass(frozen=True)
class Timeouts:
    first_token: float = 60.0   # seconds from start to the first chunk
    stall: float = 60.0         # longest gap between two chunks
    total: float = 600.0        # whole reply


@dataclass(frozen=True)
class Pipeline:
    id: str
    name: str = ""
    provider: str = "demo"
    model: str = ""
    base_url: str = ""
    api_key_env: str = ""       # the *name* of the environment variable holding the key, never the key
    system_prompt: str = ""
    temperature: float | None = None
    max_tokens: int | None = None
    history_messages: int = 20  # earlier messages sent as context
    history_chars: int = 16000  # and at most this many characters of them
    timeouts: Timeouts = field(default_factory=Timeouts)
    options: dict = field(default_factory=dict)  # provider-specific

    def public(self):
        """What clients may see: no secrets, no environment variable names."""
        return {"id": self.id, "name": self.name or self.id, "provider": self.provider, "model": self.model}


class Pipelines:
    def __init__(self, pipelines):
        self._by_id = {p.id: p for p in pipelines}

    def get(self, pipeline_id):
        try:
            return self._by_id[pipeline_id]
        except KeyError:
            raise NotFound(f"no pipeline {pipeline_id!r}", code="pipeline_not_found") from None

    def __iter__(self):
        return iter(self._by_id.values())

    def __contains__(self, pipeline_id):
        return pipeline_id in self._by_id


def default_pipelines():
    return Pipelines([Pipeline(id="default", name="Demo assistant", provider="demo", model="demo",
                               options={"words": 60, "rate": 20})])
