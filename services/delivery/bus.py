"""The event bus: everything viewers must see is an event (services/wire/events.py: its types are the Structs there),
and every event reaches them through one path.

`publish` never awaits: it stamps `origin` and `at` (unless set), delivers the event to this instance's
subscribers (services/delivery/fanout.py and the owner of stop callbacks) at once, in publication order (an event
published by a subscriber is delivered after the current one, not in the middle of it), then hands it to
`_publish` for the other instances.

A cluster backend subclasses Bus (the shape of python-socketio's pubsub manager) and overrides:
    _publish(event)  synchronous, must not block: queue the event for other instances (a writer task started
                     in `start()` drains the queue); it may drop types other instances need not see.
    _listen()        an async iterator of events written by any instance; `start()` runs it in a task and
                     delivers each whose origin is not this instance (a backend may skip them itself).
    start()/close()  call super() to run/stop the listener.
LocalBus is the single box: local delivery only, nothing written anywhere.
"""
import asyncio
import logging
import time
from collections import deque

log = logging.getLogger(__name__)


async def stop_task(task, *, attempts=50, wait=0.2):
    """Cancel a task and wait for it to end. Python 3.11's asyncio.wait_for (inside the MongoDB driver) can swallow
    a cancellation that arrives just as its operation completes, and a listener that lost it would run on (seen as
    a SIGTERM that never exits): so ask again until it is done, a bounded number of times."""
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait([task], timeout=wait)
    else:
        log.error("task %s did not stop", task.get_name())
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())


class Bus:
    def __init__(self, instance_id, *, metrics=None):
        self.instance_id = instance_id
        self.metrics = metrics
        self.handlers = []
        self._pending = deque()
        self._delivering = False
        self._listener = None

    def subscribe(self, handler):
        """`handler(event)` is called for every event, local or remote; it must not await or change the event
        (every subscriber gets the same one)."""
        self.handlers.append(handler)

    def publish(self, event):
        if event.origin is None:
            event.origin = self.instance_id
        if not event.at:
            event.at = time.time()
        self._deliver(event)
        self._publish(event)

    def receive(self, event):
        """An event from another instance (a backend's listener calls this)."""
        if event.origin == self.instance_id:
            return
        if self.metrics is not None:
            self.metrics.bus_event_received(event.type, time.time() - (event.at or time.time()))
        self._deliver(event)

    def _deliver(self, event):
        self._pending.append(event)
        if self._delivering:
            return  # published by a subscriber: delivered right after the current event
        self._delivering = True
        try:
            while self._pending:
                current = self._pending.popleft()
                for handler in self.handlers:
                    try:
                        handler(current)
                    except Exception:  # one bad subscriber must not keep an event from the others
                        log.exception("bus subscriber failed on a %s event", current.type)
        finally:
            self._delivering = False

    def want(self, session_id):
        """Ask the owners of a session's live replies for their whole text (a reply followed here lost some).
        The single box has no other owners."""

    def online_elsewhere(self, session_id, besides=None):
        """The users viewing a session on other instances (presence), those of instance `besides` left out.
        The single box has none."""
        return set()

    # the backend hooks

    def _publish(self, event):
        """Send to other instances. The single box has none."""

    def _listen(self):
        """An async iterator of events from other instances, or None when there are none to listen to."""
        return None

    async def start(self):
        events = self._listen()
        if events is not None:
            self._listener = asyncio.get_running_loop().create_task(self._listen_loop(events), name="bus-listen")

    async def close(self):
        if self._listener is not None:
            await stop_task(self._listener)
            self._listener = None

    async def _listen_loop(self, events):
        async for event in events:
            try:
                self.receive(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not deliver a bus event")


class LocalBus(Bus):
    """One box: events go to this instance's subscribers only."""
