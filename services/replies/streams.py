"""The generation lifecycle: one task per reply, the stop-callback dictionary, live buffers and timeouts.

A generation belongs to its session, not to the socket that asked for it: sockets come and go as viewers
(services/delivery/fanout.py); the task here runs to exactly one terminal state, persists it, and sends exactly one
final frame. Replies of one session run one at a time, in the order they were accepted. What a cluster adds lives
beside it: the turns of a session's replies across instances (services/cluster/turns.py) and the store's word on who
owns a reply (services/cluster/fencing.py: the claim, the writes that carry its epoch, the fence, the handover).

`stop_callbacks` maps message id -> callable, one entry per accepted reply (queued or running), removed in the
task's `finally` whatever the reason it ended; `by_session` finds them by session.
"""
import asyncio
import logging
import time

from services.operations import logs

from services.cluster.fencing import Fencing
from services.cluster.turns import Turns
from services.operations.metrics import Metrics
from services.providers import ProviderError, make_provider
from services.replies.generation import Generation
from services.replies.upstream import Upstream
from services.wire import events, frames
from services.wire.codes import LIVE, Code, ReplyCode, ReplyStatus
from services.wire.errors import Busy

log = logging.getLogger(__name__)

HANDOVER = "handover"  # the stop reason (and passing status) of a reply a draining instance gives to another


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
        self.metrics = metrics or Metrics()
        self.upstream = Upstream(store, pipelines, provider_factory=provider_factory)  # the model's side
        self.turns = Turns(store, self.metrics, max_queued=max_queued)
        self.fencing = Fencing(store, bus, self.metrics, instance_id=instance_id, lease_seconds=lease_seconds)
        self.generations = {}     # message_id -> Generation (live: queued or streaming)
        self.closed = False       # shut down: nothing more starts here
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
            self.on_handover()  # another instance gave replies up: take them now (services/cluster/reaper.py)
        elif kind is events.ReplyFinal and self.cluster:
            self.turns.wake(self.by_session.get(event.session_id, {}).values())

    # accepting and stopping

    def check_capacity(self, session_id):
        if len(queue := self.by_session.get(session_id, {})) > self.max_queued:
            self.metrics.session_busy(next(iter(queue.values())).pipeline_id)
            raise Busy("this session already has replies waiting; try again when one finishes",
                       code=Code.SESSION_BUSY)

    async def check_shared_capacity(self, session_id, pipeline_id):
        """Cluster mode: the `session_busy` limit counts the session's live replies on every instance."""
        if self.cluster:
            await self.turns.check_capacity(session_id, pipeline_id)

    def accept(self, **fields):
        """Start a reply. Synchronous: registered and visible before the caller's next await. A `continuation`
        (services/cluster/failover.py) goes first: it holds its session's turn already."""
        gen = Generation(**fields)
        if self.closed:  # a send stored as the server shut down: left live in the store, as after a crash
            log.info("not started (shutting down): another instance or the next start takes it up message_id=%s",
                     gen.message_id)
            return gen
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

    async def ended(self, message_ids):
        """Wait until each of these replies here has persisted its terminal state and sent its final."""
        for message_id in message_ids:
            gen = self.generations.get(message_id)
            if gen is not None:
                await gen.done.wait()

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
        # asyncio.wait_for on Python 3.11, services/delivery/bus.py stop_task)
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
        self.closed = True  # nothing starts after this (it would run on after the store closed)
        gens = list(self.generations.values())
        for gen in gens:
            if cb := self.stop_callbacks.get(gen.message_id):
                cb("interrupted")
        await asyncio.gather(*(g.task for g in gens), return_exceptions=True)
        await self.upstream.close()

    def prefetch_history(self, session_id, pipeline_id):
        """Start reading a reply's context before its messages are stored (services/replies/upstream.py)."""
        return self.upstream.prefetch_history(session_id, pipeline_id)

    async def warm_up(self):
        """Before the first client: every pipeline's provider made and prepared (services/replies/upstream.py)."""
        await self.upstream.warm_up()

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
                await self.turns.wait(gen)
            gen.status = "streaming"
            self.metrics.generation_streaming(gen)
            if not gen.claimed:
                doc = await self.fencing.claim(gen, self.lease_until())
                if doc is None:  # no longer queued: ended elsewhere (the reaper) while it waited here
                    gen.fenced = True
                    raise asyncio.CancelledError
                gen.epoch = doc["epoch"]
                if doc.get("stop_requested"):  # stopped while queued, and the signal did not reach us
                    gen.stop_reason = gen.stop_reason or "stopped"
                    raise asyncio.CancelledError
            if not gen.continuing:
                gen.started_epoch = time.time()
            self.bus.publish(events.reply_started(gen))
            if gen.continuing and (gen.content or gen.thinking):
                # the text it goes on from: this instance's log of the reply may be new and lack it (every delta
                # after it would be a gap, and its viewers here would see nothing until the final)
                self.bus.publish(events.reply_sync(gen))
            request = await self.upstream.request(gen, pipeline)
            gen.heed_stop()  # (the context read awaits the store)
            await self.upstream.consume(gen, pipeline, request, self._apply)
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
                doc = await self.fencing.refused(gen)
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
        if gen.status == HANDOVER and await self.fencing.release(gen):
            self._forget(gen)
            gen.done.set()
            return
        if gen.status == HANDOVER:  # it could not be handed over: it ends here, as without another instance
            gen.status = ReplyStatus.INTERRUPTED
        try:
            # The terminal write does not wait for a checkpoint in flight (a stop right after the first token
            # finds one more often than not): a checkpoint matches only a `streaming` reply, so whichever of the
            # two lands first, the stored message ends terminal with the whole text.
            durable = None if gen.fenced else await self.fencing.persist_end(gen)
            if durable:
                final = gen
            elif durable is False or gen.fenced:
                if not gen.fenced:
                    self.fencing.fence(gen)
                doc = await self.store.find_message(gen.message_id)
                if doc is not None and doc["status"] not in LIVE:
                    final = frames.snapshot(doc)
                    gen.status, gen.error = doc["status"], doc.get("error")
            await self.turns.release(gen)
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

    def lease_until(self):
        # Epoch seconds, not a datetime: nx-27017 stores a datetime written by $set as a string.
        return time.time() + self.lease_seconds
