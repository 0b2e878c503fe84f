"""Failover: a reply whose instance is gone goes on here — the same message, from its last stored point.

The reaper (services/cluster/reaper.py) hands over every live reply whose instance is gone
(services/cluster/liveness.py), whose lease expired, or that a draining instance gave up (`handover`). For each, one
surviving instance — whichever wins the compare-and-set in the store — decides:
- queued (it had not started): it runs here, as if accepted here (`adopt`);
- streaming: it goes on here (`store.take_over` raises its epoch, so the old owner, should it wake, is fenced;
  records where this owner took it up; the provider is asked to continue the stored answer), unless
  - a stop was asked for: it ends `stopped` with its stored text;
  - its pipeline says `on_instance_lost = "interrupt"`, or it went on --max-continuations times already: it ends
    `interrupted` (`instance_lost`), as before.
Viewers are told through the reply's log (services/delivery/replylog.py): the new owner's start names its epoch and
where it took the reply up, so text streamed after the last checkpoint is taken back (`rewind`) and streamed again.
"""
import logging
import time

from services.storage.store import INSTANCE_LOST
from services.wire import events, frames
from services.wire.codes import ReplyCode, ReplyStatus
from services.wire.errors import NotFound

log = logging.getLogger(__name__)

DRAIN, LOST = "drain", "instance_lost"  # why a reply changed hands (metrics, the stored `continued` entries)


class Failover:
    def __init__(self, store, bus, streams, sending, pipelines, *, max_continuations=3, metrics=None):
        self.store = store
        self.bus = bus
        self.streams = streams
        self.sending = sending    # its prompt_of: a stored question as the model gets it again
        self.pipelines = pipelines
        self.max_continuations = max_continuations
        self.metrics = metrics

    async def recover(self, doc, *, lease_expired=False):
        """One abandoned live reply (a store.live_leases document). Returns what became of it: "continued",
        "adopted", "stopped", "interrupted", or None when another instance got to it first (or it ended)."""
        reason = DRAIN if doc.get("handover") else LOST
        pipeline = self.pipelines.get(doc["pipeline"]) if doc.get("pipeline") in self.pipelines else None
        # (a message without the fields a takeover is decided by was written by an older version: it ends)
        goes_on = (pipeline is not None and pipeline.on_instance_lost == "continue" and "epoch" in doc
                   and "length" in doc)
        condition = {"lease_until": doc.get("lease_until")} if lease_expired else {"epoch": doc.get("epoch") or 0}
        if doc.get("stop_requested"):
            outcome = await self._end(doc, condition, ReplyStatus.STOPPED, None)
        elif not goes_on:
            outcome = await self._end(doc, condition, ReplyStatus.INTERRUPTED, INSTANCE_LOST)
        elif doc["status"] == ReplyStatus.QUEUED:
            outcome = await self._adopt(doc, pipeline)
        elif (doc.get("continuations") or 0) >= self.max_continuations:
            outcome = await self._end(doc, condition, ReplyStatus.INTERRUPTED, {
                "code": ReplyCode.INSTANCE_LOST, "message": f"the servers handling this reply went away "
                f"{self.max_continuations + 1} times; it was not continued again"})
        else:
            outcome = await self._continue(doc, pipeline, reason)
        if outcome is not None and self.metrics is not None:
            self.metrics.continuation(reason, outcome)
        return outcome

    async def _end(self, doc, condition, status, error):
        ended = await self.store.interrupt_abandoned(doc["_id"], status=status, error=error, **condition)
        if ended is None:  # finished, renewed, or taken over meanwhile
            return None
        self.bus.publish(events.reply_final(frames.snapshot(ended)))
        return status

    async def _adopt(self, doc, pipeline):
        adopted = await self.store.adopt(doc, instance=self.streams.instance_id,
                                         lease_until=self.streams.lease_until())
        if adopted is None:
            return None
        fields = await self._prompt(adopted, pipeline)
        if fields is None:  # its session or question is gone (a reset): nothing to run
            return await self._end(adopted, {"epoch": adopted.get("epoch") or 0}, ReplyStatus.INTERRUPTED,
                                   INSTANCE_LOST)
        self.streams.accept(epoch=0, **fields)
        log.info("adopted queued message_id=%s of a gone instance", doc["_id"])
        return "adopted"

    async def _continue(self, doc, pipeline, reason):
        claimed = await self.store.take_over(doc, instance=self.streams.instance_id,
                                             lease_until=self.streams.lease_until(), reason=reason)
        if claimed is None:  # another instance won, or it ended or moved on meanwhile
            return None
        fields = await self._prompt(claimed, pipeline)
        if fields is None:  # its session or question is gone (a reset): nothing to go on with
            return await self._end(claimed, {"epoch": claimed["epoch"]}, ReplyStatus.INTERRUPTED, INSTANCE_LOST)
        continued = claimed.get("continued") or ()
        gen = self.streams.accept(epoch=claimed["epoch"], continuation={
            "content": claimed.get("content") or "", "thinking": claimed.get("thinking") or "",
            "continuations": claimed.get("continuations") or 0, "sent_at": events.epoch_seconds(claimed.get("created_at")),
            "bases": [[c["epoch"], c.get("offset", 0), c.get("thinking_offset", 0)] for c in continued]},
            **fields)
        gen.taken_over_at = time.monotonic()
        if claimed.get("stop_requested"):  # asked for as we claimed it: it ends here, stopped, with its text
            self.streams.stop(gen.session_id, gen.message_id)
        log.info("continuing message_id=%s from %d characters (%s, continuation %d)", doc["_id"],
                 gen.content_length, reason, gen.continuations)
        return "continued"

    async def _prompt(self, reply, pipeline):
        """What a generation of `reply` needs: its session, its question (text, images, sender), its numbers.
        None if the session or the question is gone (a reset): then it ends, as nothing can go on."""
        try:
            session = await self.store.get_session(reply["session_id"])
        except NotFound:
            return None
        question = await self.store.find_message(reply.get("reply_to")) if reply.get("reply_to") else None
        if question is None:
            return None
        text, images = await self.sending.prompt_of(question, pipeline)
        return {"message_id": reply["_id"], "session": session, "seq": reply["seq"], "reply_to": question["_id"],
                "prompt": text, "images": images, "sender": question.get("sender"), "stream": True,
                "prompt_seq": question["seq"]}
