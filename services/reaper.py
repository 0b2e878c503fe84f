"""Nothing stays `streaming` after the instance generating it is gone (DESIGN.md invariant 5).

A live message carries its `instance`, an `epoch` (the fencing token of its owner's claim) and `lease_until`. The
owner renews the lease at every checkpoint and, here, every lease/2 for all its live replies (queued ones and
ones waiting for a first token write no checkpoints). Any instance ends a live message that is not its own when
- its instance is gone (services/liveness.py: no heartbeat for --liveness-timeout, or stopped): at once, with a
  compare-and-set on the epoch it saw, so a finish since wins;
- its lease expired (an instance that never heartbeats, or the store's view when liveness cannot tell);
- it is this instance's own from before a restart (same --instance-id, not generating here): at start-up.
It is marked `interrupted` (`error.code` `instance_lost`) — raising its epoch, so an owner that was only paused
finds every later write refused — and its viewers get the stored final, through the bus.
"""
import asyncio
import contextlib
import logging
import time
from datetime import datetime

from services import events, frames
from services.bus import stop_task

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, store, bus, streams, *, lease_seconds, liveness=None):
        self.store = store
        self.bus = bus
        self.streams = streams
        self.liveness = liveness
        self.interval = lease_seconds / 2
        self.task = None
        self._now = asyncio.Event()   # sweep at once (an instance was found gone)

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="reaper")

    def wake(self):
        self._now.set()

    async def stop(self):
        if self.task is not None:
            await stop_task(self.task)
            self.task = None

    async def _loop(self):
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._now.wait()
            self._now.clear()
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be briefly away: try again next round
                log.warning("lease sweep failed: %s", exc)

    async def sweep(self, *, starting=False):
        """Renew our leases, then end every live message that is not ours whose instance is gone or whose lease
        expired (`starting`: also our own from before a restart). Returns the ids."""
        ours = list(self.streams.generations)
        await self.store.renew_leases(ours, lease_until=self.streams.lease_until())
        now = time.time()
        reaped = []
        live = await self.store.live_leases(exclude=ours)
        if self.liveness is not None and any(not self.liveness.alive(i) for _, _, i, _ in live if i):
            await self.liveness.refresh()  # a gone instance may be back (restarted): its new replies are not ours
        for message_id, lease_until, instance, epoch in live:
            if message_id in self.streams.generations:
                continue  # accepted here while we were awaiting
            gone = (self.liveness is not None and instance and not self.liveness.alive(instance)) or (
                starting and instance == self.streams.instance_id)
            if gone:
                doc = await self.store.interrupt_abandoned(message_id, epoch=epoch)
            elif expired(lease_until, now):
                doc = await self.store.interrupt_abandoned(message_id, lease_until=lease_until)
            else:
                continue
            if doc is None:  # finished or renewed meanwhile
                continue
            reaped.append(message_id)
            self.bus.publish(events.reply_final(frames.snapshot(doc)))
        if reaped:
            log.warning("interrupted %d abandoned replies (instance gone or lease expired): %s", len(reaped),
                        reaped)
        return reaped


def expired(lease_until, now):
    """Leases are epoch seconds. None (never leased) or anything unreadable counts as expired."""
    if isinstance(lease_until, datetime):
        lease_until = lease_until.timestamp()
    if isinstance(lease_until, (int, float)) and not isinstance(lease_until, bool):
        return lease_until <= now
    return True
