"""The model's side of a reply: its request (the context from the store, the prompt, a continuation's stored
text), one provider per pipeline (so HTTP clients and their pools are reused), and the provider's stream consumed
under the pipeline's time limits (first token, stall, total). What each chunk does is the lifecycle's
(services/replies/streams.py `_apply`)."""
import asyncio
import contextlib

from services.providers import GenerationRequest, ProviderError, Turn, make_provider
from services.wire.codes import ReplyCode


class Upstream:
    def __init__(self, store, pipelines, *, provider_factory=make_provider):
        self.store = store
        self.pipelines = pipelines
        self.provider_factory = provider_factory
        self.providers = {}       # pipeline id -> provider

    def prefetch_history(self, session_id, pipeline_id):
        """Start reading a reply's context before its messages are stored: the session's latest messages, for a
        send that nothing else of the session runs beside (services/conversations/sending.py). None if the pipeline
        uses none."""
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline.history_messages <= 0:
            return None
        return asyncio.get_running_loop().create_task(
            self.store.recent_messages(session_id, before_seq=None, limit=pipeline.history_messages))

    async def request(self, gen, pipeline):
        turns = []
        if gen.history is not None:
            history, gen.history = gen.history, None
            docs = [d for d in await history if d["seq"] < gen.prompt_seq]
        elif pipeline.history_messages > 0:
            docs = await self.store.recent_messages(gen.session_id, before_seq=gen.prompt_seq,
                                                    limit=pipeline.history_messages)
        else:
            docs = ()
        turns = [Turn(role=d["role"], text=d["content"], sender=d.get("sender"))
                 for d in docs if d.get("content") and d.get("status") in ("completed", "stopped")]
        request = GenerationRequest(pipeline=pipeline, session_id=gen.session_id, session_type=gen.session_type,
                                    message_id=gen.message_id, history=turns,
                                    prompt=Turn(role="user", text=gen.prompt, sender=gen.sender, images=gen.images))
        if gen.continuing:  # the provider goes on from the stored answer (services/providers, docs/providers.md)
            request.partial, request.partial_thinking = gen.content, gen.thinking
        return request

    def provider(self, pipeline):
        provider = self.providers.get(pipeline.id)
        if provider is None:
            provider = self.providers[pipeline.id] = self.provider_factory(pipeline)
        return provider

    async def warm_up(self):
        """Before the first client: make every pipeline's provider (imports, HTTP client, TLS context) and let
        it prepare, so the first reply is as fast as the tenth. A provider that cannot warm up is not an error
        here: its first reply reports the problem."""
        for pipeline in self.pipelines:
            warm = getattr(self.provider(pipeline), "warm_up", None)
            if warm is not None:
                await warm()

    async def close(self):
        for provider in self.providers.values():
            if hasattr(provider, "aclose"):
                await provider.aclose()
        self.providers.clear()

    async def consume(self, gen, pipeline, request, apply):
        loop = asyncio.get_running_loop()
        limits = pipeline.timeouts
        total_deadline = loop.time() + limits.total
        provider = self.provider(pipeline)
        got_token = False
        async with contextlib.aclosing(provider.stream(request)) as chunks:
            try:
                # From the first token on, the deadline is the stall limit after the latest chunk (or the total
                # limit). It moves only when it would move by more than `slack` (a stall is then detected at most
                # 1 % early): rescheduling the timer for every chunk was ~9 % of a relay's CPU.
                stall = limits.stall
                slack = stall / 100
                due = None  # the stall deadline as last set
                async with asyncio.timeout_at(min(total_deadline, loop.time() + limits.first_token)) as deadline:
                    async for chunk in chunks:
                        now = loop.time()
                        if apply(gen, chunk, now):
                            got_token = True
                        if got_token:
                            when = now + stall
                            if when > total_deadline:
                                when = total_deadline
                            if due is None or when - due > slack:
                                deadline.reschedule(when)
                                due = when
            except TimeoutError:
                if not deadline.expired():
                    raise
                if loop.time() >= total_deadline:
                    code, what = ReplyCode.TOTAL_TIMEOUT, f"the reply took longer than {limits.total:g} s"
                elif not got_token:
                    code, what = ReplyCode.FIRST_TOKEN_TIMEOUT, f"no first token within {limits.first_token:g} s"
                else:
                    code, what = ReplyCode.STALL_TIMEOUT, f"the model stalled for {limits.stall:g} s"
                raise ProviderError(code, what) from None
