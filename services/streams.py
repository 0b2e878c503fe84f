"""The generation lifecycle: one task per reply, the stop-callback dictionary, live buffers and timeouts.

A generation belongs to its session, not to the socket that asked for it: sockets come and go as viewers
(services/fanout.py); the task here runs to exactly one terminal state, persists it, and sends exactly one final
frame. Replies of one session run one at a time, in the order they were accepted.

`stop_callbacks` maps message id -> callable, one entry per accepted reply (queued or running), removed in the
task's `finally` whatever the reason it ended; `by_session` finds them by session.
"""
import asyncio
import contextlib
import logging
import time

from services import events, frames, logs
from services.codes import LIVE, Code, ReplyCode, ReplyStatus
from services.errors import Busy
from services.metrics import Metrics
from services.providers import GenerationRequest, ProviderError, Turn, make_provider

log = logging.getLogger(__name__)

HANDOVER = "handover"  # the stop reason (and passing status) of a reply a draining instance gives to another
TURN_RECHECK = 1.0  # seconds: a waiting reply claims its turn again when woken by a final, or after this
HOLE_GRACE = 1.0    # seconds a reply waits for earlier sends of its session whose numbers are reserved, not stored
HOLE_POLL = 0.05
HOLE_ROUND_TRIPS = 10  # ... or this many of the store's round trips, when they are slow


class Generation:
    def __init__(self, *, message_id, session, seq, reply_to, prompt, sender, stream, images=(), epoch=0,
                 history=None, prompt_seq=None, continuation=None):
        self.message_id = message_id
        self.session_id = session["_id"]
        self.session_type = session["type"]
        self.pipeline_id = session["pipeline"]
        self.seq = seq
        self.reply_to = reply_to      # the user message id this answers
        # that message's number: the context is what came before it (a regenerated reply is numbered later)
        self.prompt_seq = seq - 1 if prompt_seq is None else prompt_seq
        self.prompt = prompt          # the user's text
        self.images = images          # image URLs (http(s) or data:) for pipelines with image input
        self.sender = sender
        self.stream = stream          # False: viewers get only the final frame
        self.status = "queued"
        self._content = []            # the answer's pieces, joined when read: `+=` per chunk copied the reply
        self.content_length = 0
        self.thinking = ""
        self.error = None             # {"code", "message"} when failed/timeout
        self.usage = None
        self.model = None
        self.stop_reason = None       # set once by stop(): the terminal status to end with
        self.task = None
        self.running = False          # the task has begun executing (cancelling before that skips its finally)
        self.done = asyncio.Event()   # set after the terminal state is persisted and sent
        self.previous = None          # the generation this one waits for (same session)
        self.checkpoint_task = None
        self.last_checkpoint = None   # the loop's clock at the latest checkpoint (at first: at the first chunk)
        self.dirty_since = None       # monotonic time of the oldest character not yet checkpointed
        self.epoch = epoch            # fencing token from the store's claim: every write of ours must match it
        self.bases = []               # [epoch, offset, thinking_offset] of every owner that took it over
        self.claimed = epoch > 0      # stored already streaming, with this epoch (services/chat.py send)
        self.history = history        # a task reading the context already (prefetch_history), or None
        self.saved = self.saved_thinking = 0  # characters of content/thinking already checkpointed
        self.fenced = False           # the store refused our write: another instance ended this reply
        self.has_turn = False         # cluster mode: holds its session's generation turn in the store
        self.turn_free = asyncio.Event()  # cluster mode: a reply of its session ended (claim the turn again)
        self.finishing = False        # _finish has begun: nothing may cancel the task any more
        # Taken over from a lost instance (services/failover.py): the stored text so far, and every owner's start
        self.continuing = continuation is not None
        self.continuations = 0        # how many times it went on with another instance
        self.saved_from = 0           # characters of answer it was taken over with
        self.taken_over_at = None     # monotonic time another instance's reply was taken over here (metrics)
        if continuation is not None:
            self.add_content(continuation["content"])
            self.thinking = continuation["thinking"]
            self.saved, self.saved_thinking = self.content_length, len(self.thinking)
            self.bases = [list(b) for b in continuation["bases"]]
            self.continuations = continuation["continuations"]
            self.saved_from = self.content_length
        # monotonic times for metrics (services/metrics.py)
        self.accepted_at = time.monotonic()
        self.started_epoch = time.time()  # epoch seconds it started streaming (accepted, until then)
        self.started_at = self.first_token_at = self.stop_requested_at = None

    @property
    def content(self):
        """The answer so far."""
        parts = self._content
        if len(parts) > 1:
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def add_content(self, text):
        if text:
            self._content.append(text)
            self.content_length += len(text)


class StreamManager:
    def __init__(self, store, bus, pipelines, *, instance_id, checkpoint_interval=1.0, lease_seconds=30.0,
                 max_queued=8, provider_factory=make_provider, metrics=None, cluster=False):
        self.store = store
        self.bus = bus
        self.pipelines = pipelines
        self.instance_id = instance_id
        self.checkpoint_interval = checkpoint_interval
        self.lease_seconds = lease_seconds
        self.max_queued = max_queued
        self.cluster = cluster    # replies of a session may be accepted on several instances: turns are claimed in the store
        self.hole_grace = HOLE_GRACE
        self.provider_factory = provider_factory
        self.metrics = metrics or Metrics()
        self._providers = {}      # pipeline id -> provider, so HTTP clients and their pools are reused
        self.generations = {}     # message_id -> Generation (live: queued or streaming)
        self.stop_callbacks = {}  # message_id -> callable(reason)
        self.by_session = {}      # session_id -> {message_id: Generation}, in acceptance order
        self.on_handover = lambda: None  # another instance handed replies over (the reaper sweeps at once)
        bus.subscribe(self._on_event)

    def _on_event(self, event):
        """A stop published by another instance: the owner of the reply fires its stop callback here. A final
        (from any instance) wakes the replies of its session waiting for their turn."""
        kind = type(event)
        if kind is events.Stop and event.origin != self.instance_id:
            if self._stop_here(event.session_id, event.message_id, "stopped"):
                self.metrics.stop_requested("local")
        elif kind is events.Handover and event.origin != self.instance_id:
            self.on_handover()  # another instance gave replies up: take them now (services/reaper.py)
        elif kind is events.ReplyFinal and self.cluster:
            for gen in self.by_session.get(event.session_id, {}).values():
                gen.turn_free.set()

    # accepting and stopping

    def check_capacity(self, session_id):
        if len(queue := self.by_session.get(session_id, {})) > self.max_queued:
            self.metrics.session_busy(next(iter(queue.values())).pipeline_id)
            raise Busy("this session already has replies waiting; try again when one finishes",
                       code=Code.SESSION_BUSY)

    async def check_shared_capacity(self, session_id, pipeline_id):
        """Cluster mode: the `session_busy` limit counts the session's live replies on every instance."""
        if self.cluster and await self.store.count_live_replies(session_id) > self.max_queued:
            self.metrics.session_busy(pipeline_id)
            raise Busy("this session already has replies waiting; try again when one finishes",
                       code=Code.SESSION_BUSY)

    def accept(self, **fields):
        """Start a reply. Synchronous: registered and visible before the caller's next await. A `continuation`
        (services/failover.py) goes first: it holds its session's turn already."""
        gen = Generation(**fields)
        queue = self.by_session.setdefault(gen.session_id, {})
        if gen.continuing:
            gen.has_turn = self.cluster
            queue = self.by_session[gen.session_id] = {gen.message_id: gen, **queue}
        elif queue:
            gen.previous = next(reversed(queue.values()))
        queue[gen.message_id] = gen
        self.generations[gen.message_id] = gen
        self.stop_callbacks[gen.message_id] = lambda reason="stopped", g=gen: self._request_stop(g, reason)
        log.debug("stream signal registered message_id=%s session_id=%s", gen.message_id, gen.session_id,
                  extra={"pipeline": gen.pipeline_id, "session_id": gen.session_id, "message_id": gen.message_id})
        self.metrics.generation_accepted(gen)
        gen.task = asyncio.get_running_loop().create_task(self._run(gen), name=f"generation-{gen.message_id}")
        return gen

    def live(self, session_id):
        """The live replies of a session here, in acceptance order."""
        return list(self.by_session.get(session_id, {}).values())

    def stop(self, session_id, message_id=None, reason="stopped"):
        """Stop one reply of a session, or all of them. Returns the message ids a stop was sent to. Counted
        `local` when something ran here; in a cluster else `forwarded` (the caller publishes the stop: the
        owner, if any, counts it `local` too); on a single box else `noop`."""
        stopped = self._stop_here(session_id, message_id, reason)
        if not stopped and self.cluster:
            log.info("stop forwarded to another instance session_id=%s message_id=%s", session_id, message_id,
                     extra={"session_id": session_id, "message_id": message_id})
        self.metrics.stop_requested("local" if stopped else "forwarded" if self.cluster else "noop")
        return stopped

    def _stop_here(self, session_id, message_id, reason):
        targets = self.by_session.get(session_id, {})
        ids = [message_id] if message_id else list(targets)
        stopped = []
        for mid in ids:
            if mid in targets and (callback := self.stop_callbacks.get(mid)):
                if targets[mid].stop_requested_at is None:
                    targets[mid].stop_requested_at = time.monotonic()
                callback(reason)
                stopped.append(mid)
        if stopped:
            log.info("stop executed locally session_id=%s message_ids=%s", session_id, stopped,
                     extra={"session_id": session_id, "message_id": ",".join(stopped)})
        return stopped

    def _request_stop(self, gen, reason):
        if gen.stop_reason is None or (gen.stop_reason == HANDOVER and not gen.finishing):
            gen.stop_reason = reason  # (a stop wins over a handover not yet made)
        # (again on a repeated stop, e.g. the durable flag: a cancellation can be lost inside the driver's
        # asyncio.wait_for on Python 3.11, services/bus.py stop_task)
        if gen.running and not gen.finishing:
            gen.task.cancel()

    async def hand_over(self, can_continue):
        """A draining instance gives its live replies to the others (`can_continue(pipeline_id)`: the pipeline
        goes on elsewhere): each stops generating here, its whole text is stored and its lease given up
        (store.release), and the others' reapers take it over at once (a `handover` event wakes them). Returns
        how many were handed over."""
        gens = [g for g in self.generations.values() if can_continue(g.pipeline_id)]
        for gen in gens:
            self._request_stop(gen, HANDOVER)
        if gens:
            log.info("draining: %d replies go on with other instances", len(gens))
            await asyncio.gather(*(g.done.wait() for g in gens))
        return sum(1 for g in gens if g.status == HANDOVER)

    async def drain(self, timeout):
        """Wait up to `timeout` seconds for the live replies to end on their own."""
        pending = [g.done.wait() for g in self.generations.values()]
        if pending:
            log.info("draining: %d replies get %g s to finish", len(pending), timeout)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*pending)
            except TimeoutError:
                log.info("draining: %d replies still running are interrupted", len(self.generations))

    async def shutdown(self):
        """Interrupt every live reply and wait until each has persisted its terminal state."""
        gens = list(self.generations.values())
        for gen in gens:
            if cb := self.stop_callbacks.get(gen.message_id):
                cb("interrupted")
        await asyncio.gather(*(g.task for g in gens), return_exceptions=True)
        for provider in self._providers.values():
            if hasattr(provider, "aclose"):
                await provider.aclose()
        self._providers.clear()

    # the task

    async def _run(self, gen):
        gen.running = True
        # This task's log lines name its reply (it was started from the sender's connection; it outlives it).
        logs.bind(pipeline=gen.pipeline_id, session_id=gen.session_id, message_id=gen.message_id, conn_id=None)
        try:
            if gen.stop_reason:  # stopped before the task began
                raise asyncio.CancelledError
            pipeline = self.pipelines.get(gen.pipeline_id)
            if gen.previous is not None:
                await gen.previous.done.wait()
            gen.previous = None  # let the finished one be collected
            if self.cluster and not gen.continuing:
                await self._wait_turn(gen)
            gen.status = "streaming"
            self.metrics.generation_streaming(gen)
            if not gen.claimed:
                doc = await self._uncancelled(gen, self.store.mark_streaming(
                    gen.message_id, instance=self.instance_id, lease_until=self.lease_until()))
                if doc is None:  # no longer queued: ended elsewhere (the reaper) while it waited here
                    gen.fenced = True
                    raise asyncio.CancelledError
                gen.epoch = doc["epoch"]
                if doc.get("stop_requested"):  # stopped while queued, and the signal did not reach us
                    gen.stop_reason = gen.stop_reason or "stopped"
                    raise asyncio.CancelledError
            gen.started_epoch = time.time()
            self.bus.publish(events.reply_started(gen))
            request = await self._request(gen, pipeline)
            self._heed_stop(gen)  # (the context read awaits the store)
            await self._consume(gen, pipeline, request)
            if not gen.content:
                raise ProviderError(ReplyCode.EMPTY_COMPLETION, "the model returned no text")
            gen.status = "completed"
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
            gen.status = gen.stop_reason or "interrupted"
        except ProviderError as exc:
            gen.status, gen.error = exc.status, {"code": exc.code, "message": exc.message}
            if gen.continuing and gen.content_length == gen.saved_from:  # it would not go on with the answer
                gen.status = ReplyStatus.INTERRUPTED
                gen.error = {"code": ReplyCode.CONTINUATION_REFUSED,
                             "message": f"another server could not continue this reply: {exc.message}"}
            log.warning("generation %s pipeline=%s session_id=%s message_id=%s code=%s: %s", exc.status,
                        gen.pipeline_id, gen.session_id, gen.message_id, exc.code, exc.detail or exc.message)
        except Exception:
            log.exception("generation crashed pipeline=%s session_id=%s message_id=%s",
                          gen.pipeline_id, gen.session_id, gen.message_id)
            gen.status = ReplyStatus.FAILED
            gen.error = {"code": ReplyCode.INTERNAL_ERROR, "message": "the reply failed"}
        finally:
            await self._finish(gen)

    async def _wait_turn(self, gen):
        """Replies of a session accepted on other instances go first when they were accepted first."""
        # A send reserves its numbers, then inserts: one accepted just before ours on another instance may not be
        # stored yet, and the claim below would not see it. Wait (briefly: a number can also stay empty for good)
        # until every earlier number is stored.
        # The grace grows with the store's round trip as we see it (a loaded machine: the other send's insert is
        # slow too), so a send that is merely late keeps its place.
        missing, grace = (), self.hole_grace
        while time.monotonic() - gen.accepted_at < grace:
            asked = time.monotonic()
            missing = await self.store.missing_before(gen.session_id, gen.seq - 1)
            grace = max(grace, HOLE_ROUND_TRIPS * (time.monotonic() - asked))
            self._heed_stop(gen)
            if not missing:
                break
            await asyncio.sleep(HOLE_POLL)
        if missing:
            log.info("turn: message_id=%s waited %.1f s for numbers %s of its session that were never stored",
                     gen.message_id, time.monotonic() - gen.accepted_at, missing[:8])
        while True:
            gen.has_turn = True  # (maybe: the claim may land even if we are stopped meanwhile; release is safe)
            gen.turn_free.clear()  # a final from here on wakes the wait below
            turn = await self.store.claim_turn(gen.session_id, gen.message_id, gen.seq)
            self._heed_stop(gen)
            if turn:
                return
            gen.has_turn = False
            if turn is None:  # ended elsewhere while it waited: mark_streaming will find it is not ours
                return
            # The turn frees when a reply of the session ends: its final reaches every instance on the bus. A lost
            # event costs at most TURN_RECHECK.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TURN_RECHECK):
                    await gen.turn_free.wait()

    @staticmethod
    def _heed_stop(gen):
        """After awaiting the store: a stop that arrived meanwhile may have been swallowed by the driver's
        asyncio.wait_for (Python 3.11 returns a result that is ready instead of raising the cancellation); its
        reason is set all the same, so it ends the reply here."""
        if gen.stop_reason:
            raise asyncio.CancelledError

    async def _uncancelled(self, gen, write):
        """Await a claim even if the task is stopped meanwhile: a write that lands must be known (its epoch),
        or the terminal write, conditional on it, could never land. The stop takes effect right after."""
        task = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                doc = await task
            except Exception:
                doc = None
            if doc is not None:
                gen.epoch = doc["epoch"]
            raise

    def prefetch_history(self, session_id, pipeline_id):
        """Start reading a reply's context before its messages are stored: the session's latest messages, for a
        send that nothing else of the session runs beside (services/chat.py). None if the pipeline uses none."""
        pipeline = self.pipelines.get(pipeline_id)
        if pipeline.history_messages <= 0:
            return None
        return asyncio.get_running_loop().create_task(
            self.store.recent_messages(session_id, before_seq=None, limit=pipeline.history_messages))

    async def _request(self, gen, pipeline):
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
        provider = self._providers.get(pipeline.id)
        if provider is None:
            provider = self._providers[pipeline.id] = self.provider_factory(pipeline)
        return provider

    async def warm_up(self):
        """Before the first client: make every pipeline's provider (imports, HTTP client, TLS context) and let
        it prepare, so the first reply is as fast as the tenth. A provider that cannot warm up is not an error
        here: its first reply reports the problem."""
        for pipeline in self.pipelines:
            warm = getattr(self.provider(pipeline), "warm_up", None)
            if warm is not None:
                await warm()

    async def _consume(self, gen, pipeline, request):
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
                        if self._apply(gen, chunk, now):
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

    def _apply(self, gen, chunk, now=None):
        """One chunk of the provider's stream: True if it carried text. `now`: the loop's clock."""
        if chunk.usage:
            gen.usage = chunk.usage
        if chunk.model:
            gen.model = chunk.model
        text, thinking = chunk.text, chunk.thinking
        if not (text or thinking):
            return False
        if now is None:
            now = time.monotonic()  # = the loop's clock
        offset, thinking_offset = gen.content_length, len(gen.thinking)
        self.metrics.streamed(gen, text, thinking)
        if gen.dirty_since is None:
            gen.dirty_since = now
            if gen.last_checkpoint is None:
                # The first checkpoint comes one interval after the first chunk, not with it: a reply that ends
                # (or is stopped) sooner is saved by its terminal write alone, which would queue behind it.
                gen.last_checkpoint = now
        gen.add_content(text)
        if thinking:
            gen.thinking += thinking
        if gen.stream:
            self.bus.publish(events.reply_delta(gen, offset, text, thinking_offset, thinking))
        if gen.checkpoint_task is None and now - gen.last_checkpoint >= self.checkpoint_interval:
            gen.last_checkpoint = now
            gen.checkpoint_task = asyncio.get_running_loop().create_task(self._checkpoint(gen))
        return True

    async def _checkpoint(self, gen):
        stopped = gen.stop_reason  # a stop taken before this checkpoint of a reply that still streams
        dirty_since, gen.dirty_since = gen.dirty_since, None
        offset, thinking_offset = gen.saved, gen.saved_thinking
        text, thinking = gen.content[offset:], gen.thinking[thinking_offset:]
        try:
            doc = await self.store.checkpoint(gen.message_id, epoch=gen.epoch, offset=offset, text=text,
                                              thinking_offset=thinking_offset, thinking=thinking,
                                              lease_until=self.lease_until())
            if doc is None:
                if gen.finishing:  # the terminal write, sent beside it, landed first: it has the whole text
                    return
                doc = await self._refused(gen)
            if doc is None:
                return
            gen.saved, gen.saved_thinking = doc.get("length", 0), doc.get("thinking_length", 0)
            if dirty_since is not None:
                self.metrics.checkpointed(gen, dirty_since)
            # A durable stop (recorded in MongoDB) is honoured even if its signal never reached this task; a stop
            # taken here before the reply streamed on is fired again (its cancellation was lost in the driver: see
            # _request_stop; a stop taken here is recorded by the terminal write, not by a flag to read back).
            if (doc.get("stop_requested") or stopped) and (callback := self.stop_callbacks.get(gen.message_id)):
                if not stopped:
                    log.info("durable stop honoured message_id=%s", gen.message_id)
                callback(stopped or "stopped")
        except Exception as exc:  # a missed checkpoint only costs freshness; the terminal write decides
            gen.dirty_since = gen.dirty_since or dirty_since
            log.warning("checkpoint failed message_id=%s: %s", gen.message_id, exc)
        finally:
            gen.checkpoint_task = None

    async def _refused(self, gen):
        """A checkpoint did not land. Either an earlier one landed after all (adopt its lengths), or the reply
        is no longer ours: the reaper of another instance ended it while we were paused. Then stop generating;
        the final frame will be the stored one."""
        doc = await self.store.find_message(gen.message_id)
        if (doc is not None and doc.get("epoch") == gen.epoch and doc.get("status") == "streaming"
                and gen.saved <= doc.get("length", 0) <= len(gen.content)):
            return doc
        self._fence(gen)
        return None

    def _fence(self, gen):
        if not gen.fenced:
            gen.fenced = True
            self.metrics.fenced_write_refused()
            log.warning("fenced: message_id=%s was ended by another instance; its stored final wins",
                        gen.message_id)
            if gen.running and not gen.finishing and gen.task is not asyncio.current_task():
                gen.stop_reason = gen.stop_reason or "interrupted"
                gen.task.cancel()

    async def _persist_end(self, gen):
        """The terminal write, retried while the store is failing (the lease stays ours: the reaper renews it).
        True: durable. False: fenced (someone else ended it). None: gave up; the reaper will end it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_seconds
        delay = 0.05
        while True:
            try:
                return await self.store.finish(gen.message_id, epoch=gen.epoch, status=gen.status,
                                               content=gen.content, thinking=gen.thinking, error=gen.error,
                                               usage=gen.usage, model=gen.model,
                                               stop_requested=gen.status == "stopped"
                                               and gen.stop_requested_at is not None)
            except Exception as exc:
                if loop.time() + delay > deadline:
                    log.error("could not persist the end of message_id=%s status=%s; its final frame waits for "
                              "the reaper: %s", gen.message_id, gen.status, exc)
                    return None
                log.warning("persisting the end of message_id=%s failed, retrying: %s", gen.message_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _finish(self, gen):
        # From here on a stop is a no-op: the reply is already ending.
        gen.finishing = True
        self.stop_callbacks.pop(gen.message_id, None)
        if gen.history is not None:  # ended before it needed its context
            gen.history.cancel()
            gen.history.add_done_callback(lambda t: t.cancelled() or t.exception())
            gen.history = None
        log.debug("stream signal removed message_id=%s status=%s", gen.message_id, gen.status)
        final = None  # what viewers are told: only ever a state the store holds
        if gen.status == HANDOVER and await self._release(gen):
            self._forget(gen)
            gen.done.set()
            return
        if gen.status == HANDOVER:  # it could not be handed over: it ends here, as without another instance
            gen.status = ReplyStatus.INTERRUPTED
        try:
            # The terminal write does not wait for a checkpoint in flight (a stop right after the first token
            # finds one more often than not): a checkpoint matches only a `streaming` reply, so whichever of the
            # two lands first, the stored message ends terminal with the whole text.
            durable = None if gen.fenced else await self._persist_end(gen)
            if durable:
                final = gen
            elif durable is False or gen.fenced:
                if not gen.fenced:
                    self._fence(gen)
                doc = await self.store.find_message(gen.message_id)
                if doc is not None and doc["status"] not in LIVE:
                    final = frames.snapshot(doc)
                    gen.status, gen.error = doc["status"], doc.get("error")
            if gen.has_turn:  # conditional on holding it; the next reply still waits until this one is not live
                await self.store.release_turn(gen.session_id, gen.message_id)
        except Exception:
            log.exception("could not end message_id=%s status=%s", gen.message_id, gen.status)
        finally:
            self._forget(gen)
            if final is not None:
                self.bus.publish(events.reply_final(final))
            if gen.status not in LIVE:
                self.metrics.generation_finished(gen)
            try:
                if gen.checkpoint_task is not None:  # no task outlives its reply
                    await asyncio.wait((gen.checkpoint_task,))
            finally:
                gen.done.set()

    def _forget(self, gen):
        self.generations.pop(gen.message_id, None)
        queue = self.by_session.get(gen.session_id)
        if queue is not None:
            queue.pop(gen.message_id, None)
            if not queue:
                del self.by_session[gen.session_id]

    async def _release(self, gen):
        """Hand a reply over (a drain): its whole text stored, its lease given up, the others told. The session's
        turn stays with it (its next owner continues it). False: it could not be (fenced, or the store away)."""
        if gen.checkpoint_task is not None:  # its append would land after the whole text, and be refused
            await asyncio.wait((gen.checkpoint_task,))
        try:
            if gen.started_at is None and not gen.claimed:  # it never started: it runs elsewhere from the start
                released = await self.store.release_queued([gen.message_id], instance=self.instance_id) == 1
            else:
                released = await self.store.release(gen.message_id, epoch=gen.epoch, content=gen.content,
                                                    thinking=gen.thinking)
        except Exception as exc:
            log.warning("could not hand message_id=%s over: %s", gen.message_id, exc)
            return False
        if released:
            log.info("handed over message_id=%s at %d characters", gen.message_id, gen.content_length)
            self.bus.publish(events.Handover(session_id=gen.session_id, message_id=gen.message_id))
        return released

    def lease_until(self):
        # Epoch seconds, not a datetime: nx-27017 stores a datetime written by $set as a string.
        return time.time() + self.lease_seconds
