"""A reply's ownership in the store: the claim that gives its owner an epoch, the writes that carry it, the fence
when the store refuses one (another instance ended or took over the reply), and the handover of a drain.

Every write of a live reply is conditional on its epoch (services/storage/store.py), so an owner that was paused or cut
off while another instance ended it cannot overwrite what the other stored: its final is the stored one.
"""
import asyncio
import logging

from services.wire import events

log = logging.getLogger(__name__)


class Fencing:
    def __init__(self, store, bus, metrics, *, instance_id, lease_seconds):
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.instance_id = instance_id
        self.lease_seconds = lease_seconds

    async def claim(self, gen, lease_until):
        """Mark a queued reply streaming here: the stored document (its new epoch), or None when it is no longer
        queued (the reaper ended it elsewhere while it waited)."""
        return await self._uncancelled(gen, self.store.mark_streaming(gen.message_id, instance=self.instance_id,
                                                                      lease_until=lease_until))

    @staticmethod
    async def _uncancelled(gen, write):
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

    async def refused(self, gen):
        """A checkpoint did not land. Either an earlier one landed after all (adopt its lengths), or the reply
        is no longer ours: the reaper of another instance ended it while we were paused. Then stop generating;
        the final frame will be the stored one."""
        doc = await self.store.find_message(gen.message_id)
        if (doc is not None and doc.get("epoch") == gen.epoch and doc.get("status") == "streaming"
                and gen.saved <= doc.get("length", 0) <= len(gen.content)):
            return doc
        self.fence(gen)
        return None

    def fence(self, gen):
        if not gen.fenced:
            gen.fenced = True
            self.metrics.fenced_write_refused()
            log.warning("fenced: message_id=%s was ended by another instance; its stored final wins",
                        gen.message_id)
            if gen.running and not gen.finishing and gen.task is not asyncio.current_task():
                gen.stop_reason = gen.stop_reason or "interrupted"
                gen.task.cancel()

    async def persist_end(self, gen):
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

    async def release(self, gen):
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
