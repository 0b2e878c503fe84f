"""Nothing stays `streaming` after the instance generating it is gone (DESIGN.md invariant 5): it goes on here,
or it ends.

A live message carries its `instance`, an `epoch` (the fencing token of its owner's claim) and `lease_until`. The
owner renews the lease at every checkpoint and, here, every lease/2 for all its live replies (queued ones and
ones waiting for a first token write no checkpoints). Any instance takes up a live message that is not its own
when
- its instance is gone (services/cluster/liveness.py: no heartbeat for --liveness-timeout, or stopped), at once;
- a draining instance handed it over (its lease given up, a `handover` event wakes the sweep);
- its lease expired (an instance that never heartbeats, or the store's view when liveness cannot tell);
- it is this instance's own from before a restart (same --instance-id, not generating here): at start-up.
What becomes of it — continued here, run here (queued), or ended `stopped`/`interrupted` — is services/
failover.py's; every change is a compare-and-set that raises its epoch, so an owner that was only paused finds
every later write refused, and exactly one instance wins it.
"""
import asyncio
import contextlib
import logging
import time
from datetime import datetime

from services.delivery.bus import stop_task

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self, store, bus, streams, failover, *, lease_seconds, liveness=None):
        self.store = store
        self.bus = bus
        self.streams = streams
        self.failover = failover
        self.liveness = liveness
        self.interval = lease_seconds / 2
        self.task = None
        self._now = asyncio.Event()   # sweep at once (an instance was found gone, or handed replies over)
        streams.on_handover = self.wake

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
        """Renew our leases, then take up every live message that is not ours whose instance is gone, that was
        handed over, or whose lease expired (`starting`: also our own from before a restart). Returns the ids
        taken up, with what became of each."""
        ours = list(self.streams.generations)
        await self.store.renew_leases(ours, lease_until=self.streams.lease_until())
        now = time.time()
        taken = {}
        live = await self.store.live_leases(exclude=ours)
        if self.liveness is not None and any(not self.liveness.alive(d.get("instance")) for d in live
                                            if d.get("instance")):
            await self.liveness.refresh()  # a gone instance may be back (restarted): its new replies are not ours
        for doc in live:
            if doc["_id"] in self.streams.generations:
                continue  # accepted here while we were awaiting
            instance = doc.get("instance")
            gone = (self.liveness is not None and instance and not self.liveness.alive(instance)) or (
                starting and instance == self.streams.instance_id) or doc.get("handover")
            if not gone and not expired(doc.get("lease_until"), now):
                continue
            try:
                outcome = await self.failover.recover(doc, lease_expired=not gone)
            except Exception:  # one reply that cannot be taken up must not keep the others waiting
                log.exception("could not take up message_id=%s", doc["_id"])
                continue
            if outcome is not None:
                taken[doc["_id"]] = outcome
        if taken:
            log.warning("took up %d replies of instances gone, stopped or draining: %s", len(taken), taken)
        return taken


def expired(lease_until, now):
    """Leases are epoch seconds. None (never leased) or anything unreadable counts as expired."""
    if isinstance(lease_until, datetime):
        lease_until = lease_until.timestamp()
    if isinstance(lease_until, (int, float)) and not isinstance(lease_until, bool):
        return lease_until <= now
    return True
