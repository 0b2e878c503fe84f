"""Cluster mode: the replies of a session take turns across instances, in the order their messages are numbered.

On one instance a reply waits for the one accepted before it (services/replies/streams.py). With --cluster two
instances may accept replies of one session at once: the turn is claimed in the store (`claim_turn`), after
every earlier number of the session is stored, and released by the reply's end (`release_turn`); a final on
the bus wakes the waiting ones. The `session_busy` limit counts the session's live replies on every instance.
"""
import asyncio
import contextlib
import logging
import time

from services.wire.codes import Code
from services.wire.errors import Busy

log = logging.getLogger(__name__)

TURN_RECHECK = 1.0  # seconds: a waiting reply claims its turn again when woken by a final, or after this
HOLE_GRACE = 1.0    # seconds a reply waits for earlier sends of its session whose numbers are reserved, not stored
HOLE_POLL = 0.05
HOLE_ROUND_TRIPS = 10  # ... or this many of the store's round trips, when they are slow


class Turns:
    def __init__(self, store, metrics, *, max_queued):
        self.store = store
        self.metrics = metrics
        self.max_queued = max_queued
        self.hole_grace = HOLE_GRACE

    async def check_capacity(self, session_id, pipeline_id):
        """The `session_busy` limit over the session's live replies on every instance."""
        if await self.store.count_live_replies(session_id) > self.max_queued:
            self.metrics.session_busy(pipeline_id)
            raise Busy("this session already has replies waiting; try again when one finishes",
                       code=Code.SESSION_BUSY)

    async def wait(self, gen):
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
            gen.heed_stop()
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
            gen.heed_stop()
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
    def wake(gens):
        """A reply of their session ended (its final, from any instance): they claim the turn again."""
        for gen in gens:
            gen.turn_free.set()

    async def release(self, gen):
        """Conditional on holding it; the next reply still waits until this one is not live."""
        if gen.has_turn:
            await self.store.release_turn(gen.session_id, gen.message_id)
