"""Leases: nothing stays `streaming` after the instance generating it is gone (DESIGN.md invariant 5).

A live message carries `lease_until`. The owner renews it at every checkpoint and, here, every lease/2 for all
its live replies (queued ones and ones waiting for a first token write no checkpoints). Any instance that
finds a live message whose lease expired marks it `interrupted` and sends its viewers the terminal frame.
"""
import asyncio
import logging
import time
from datetime import datetime

from services import events, frames
from services.bus import stop_task

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, store, bus, streams, *, lease_seconds):
        self.store = store
        self.bus = bus
        self.streams = streams
        self.interval = lease_seconds / 2
        self.task = None

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="reaper")

    async def stop(self):
        if self.task is not None:
            await stop_task(self.task)
            self.task = None

    async def _loop(self):
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be briefly away: try again next round
                log.warning("lease sweep failed: %s", exc)

    async def sweep(self):
        """Renew our leases, then interrupt every expired live message that is not ours. Returns the ids."""
        await self.store.renew_leases(list(self.streams.generations), lease_until=self.streams.lease_until())
        now = time.time()
        leases = await self.store.live_leases(exclude=list(self.streams.generations))
        reaped = []
        for message_id, lease_until in leases:
            if not expired(lease_until, now) or message_id in self.streams.generations:
                continue  # still leased, or accepted here while we were awaiting
            doc = await self.store.interrupt_abandoned(message_id, lease_until=lease_until)
            if doc is None:  # finished or renewed meanwhile
                continue
            reaped.append(message_id)
            self.bus.publish(events.reply_final(frames.snapshot(doc)))
        if reaped:
            log.warning("interrupted %d abandoned replies (lease expired): %s", len(reaped), reaped)
        return reaped


def expired(lease_until, now):
    """Leases are epoch seconds. None (never leased) or anything unreadable counts as expired."""
    if isinstance(lease_until, datetime):
        lease_until = lease_until.timestamp()
    if isinstance(lease_until, (int, float)) and not isinstance(lease_until, bool):
        return lease_until <= now
    return True
