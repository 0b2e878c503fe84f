"""Instance liveness: which instances of a cluster are alive, known in seconds, from the store.

Every instance writes a heartbeat to the `instances` collection every BEAT of --liveness-timeout (a counter it
increments). Every instance reads them all at the same pace and keeps, by its own clock, when each counter last
moved: an instance whose counter has not moved for --liveness-timeout is gone (killed, hung, cut off from the
store), whatever the clocks of the two machines say. One that stopped cleanly says so (`stopped`) and is gone at
once. A reply's lease stays the fence (services/cluster/reaper.py ends a gone instance's replies with a compare-and-set
that raises their epoch, so an instance that was only paused finds every later write refused); liveness only
makes the failover fast: the reaper need not wait for each reply's lease.
"""
import asyncio
import logging
import time
import uuid

from services.delivery.bus import stop_task

log = logging.getLogger(__name__)

BEAT = 1 / 3  # of the timeout: a heartbeat (and a look at everyone's) three times per timeout


class Liveness:
    def __init__(self, store, instance_id, *, timeout=1.5, on_change=None):
        self.store = store
        self.instance_id = instance_id
        self.timeout = timeout
        self.on_change = on_change      # () -> None: an instance was found gone (the reaper sweeps at once)
        self.beat = 0
        self.incarnation = uuid.uuid4().hex[:8]  # a restart under the same id is a new counter, never the old one
        self.seen = {}                  # instance id -> (its counter, our monotonic time it last moved)
        self.gone = set()               # instances found gone (until they beat again)
        self.started = time.monotonic()
        self.task = None

    async def start(self):
        await self._beat()
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="liveness")

    async def stop(self):
        """A clean exit: the others need not wait for the timeout (its replies were ended already)."""
        if self.task is not None:
            await stop_task(self.task)
            self.task = None
        try:
            await self.store.instance_stopped(self.instance_id)
        except Exception as exc:  # the store is away: the others find out by the timeout
            log.warning("could not record this instance's stop: %s", exc)

    def alive(self, instance_id):
        """False only for an instance known to be gone (never seen: not known, so not gone)."""
        return instance_id not in self.gone

    async def refresh(self):
        """Look at everyone's heartbeat now (before acting on a verdict: a gone instance may be back, restarted)."""
        self._judge(await self.store.instance_beats())

    async def _loop(self):
        while True:
            await asyncio.sleep(self.timeout * BEAT)
            try:
                await self._beat()
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: nobody is judged on what we could not read
                log.warning("liveness: %s", exc)

    async def _beat(self):
        self.beat += 1
        await self.store.heartbeat(self.instance_id, f"{self.incarnation}:{self.beat}")

    def _judge(self, beats):
        """`beats`: {instance id: (counter, stopped)}. Gone: stopped, or its counter still for the timeout."""
        now = time.monotonic()
        newly = []
        for instance_id, (beat, stopped) in beats.items():
            if instance_id == self.instance_id:
                continue
            last = self.seen.get(instance_id)
            if last is None or last[0] != beat:
                # first seen, or it moved: alive (one first seen now has the timeout from now)
                self.seen[instance_id] = (beat, now)
                if stopped or last is None:
                    pass
                elif instance_id in self.gone:
                    self.gone.discard(instance_id)
                    log.info("instance %s is back", instance_id)
            if instance_id in self.gone:
                continue
            if stopped or now - self.seen[instance_id][1] >= self.timeout:
                self.gone.add(instance_id)
                newly.append(instance_id)
        if newly:
            log.warning("instances gone: %s (no heartbeat for %.1f s, or stopped)", newly, self.timeout)
            if self.on_change is not None:
                self.on_change()
