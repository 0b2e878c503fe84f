"""The cluster bus: events cross instances through MongoDB itself (--cluster). Nothing but the shared store.

Every instance inserts the events other instances need into the `events` collection (TTL-indexed: a day of
history at most) and reads everyone's inserts through one change stream, skipping its own. After a dropped
stream it reopens it from its resume token. A reopen cannot prove that nothing was missed (MongoDB refuses a
token that fell off the oplog; nx-27017 accepts any token and may return nothing, or skip what it pruned), so
every reopen also tells this instance's subscribers to re-read from the store what they follow (a `catch_up`
event: services/delivery/replylog.py re-reads the followed replies and asks their owners for their whole text,
services/delivery/ordering.py the sessions' message numbers); offsets make this exact. And a reopened stream must return
a probe this instance writes within PROBE_WAIT, or it is reopened from the present.

Reply deltas are most of the traffic, and most of it is useless to other instances (sticky clients view their
replies where they are generated). So deltas cross only for sessions another instance has announced interest in
(it has a viewer of them: a group member elsewhere, a client that moved), merged to at most one event per reply
per BATCH_INTERVAL (the first after a quiet interval goes at once). An instance announces the sessions its
clients view (`interest` events: at once when the set grows, and every INTEREST_REFRESH seconds; an owner
forgets an interest not refreshed for INTEREST_TTL). The owner answers an announcement with a `sync`: one delta
per live reply of those sessions, from offset 0, so the newcomer has the whole text. Received deltas go to the
replies' logs as they come: offsets and epochs make them exact there (a repeat is trimmed, a gap asks the owner
for a sync: `want`).
"""
import asyncio
import logging
import time
import uuid
from collections import deque

import msgspec
from pymongo.errors import OperationFailure, PyMongoError

from services.delivery.bus import Bus, stop_task
from services.wire import events

log = logging.getLogger(__name__)

EVENTS_TTL = 24 * 3600     # seconds an event document lives (a resume token older than this cannot resume)
BATCH_INTERVAL = 0.025     # seconds: at most one reply.delta event per reply per interval crosses
INTEREST_REFRESH = 3.0     # seconds between re-announcements of the sessions viewed here
INTEREST_TTL = 10.0        # an owner keeps sending deltas this long after the last announcement
INTEREST_CHECK = 0.05      # seconds between looks for newly viewed sessions (announced at once)
POLL = 0.02                # seconds between polls of an idle change stream
# ... while a reply is live anywhere (a stop or its deltas may come): nx-27017 answers a getMore at once, never
# waiting for data (MongoDB waits, so there the poll is only the gap between two getMores). An empty poll costs
# ~0.2 ms of the store's CPU and ~0.2 ms of ours: only a cluster with a live reply pays the faster rate.
POLL_LIVE = 0.005
LIVE_FORGET = 900.0        # seconds: a reply whose final never came (its instance died) stops counting as live
WRITE_BATCH = 500          # events per insert
MAX_WAITING = 50_000       # events queued while the store is away; beyond this the oldest deltas are dropped
HISTORY_LOST = (260, 280, 286)  # MongoDB: the resume token is no longer in the oplog
PROBE_WAIT = 5.0           # seconds a reopened stream has to return our probe once written, or it is reopened
CATCH_UP = 2.0             # seconds between checks of the viewed sessions' stored message numbers (lost events)


class MongoBus(Bus):
    def __init__(self, instance_id, store, *, metrics=None, viewed_sessions=lambda: (), live_replies=lambda s: (),
                 online=lambda s: ()):
        super().__init__(instance_id, metrics=metrics)
        self.store = store
        self.viewed_sessions = viewed_sessions  # () -> session ids with a viewer on this instance
        self.live_replies = live_replies        # session id -> the Generations live here (for a sync)
        self.online = online                    # session id -> users viewing it here (group sessions: presence)
        self.remote_online = {}   # session id -> {instance: (set of users, monotonic expiry)}
        self.interest = {}        # session id -> {instance: monotonic expiry}: who views our replies elsewhere
        self.resume_token = None
        self._announced = set()
        self._last_announce = 0.0
        self._wanted = {}         # session id -> monotonic time we last asked for a sync (rate limit)
        self._outbox = deque()
        self._batches = {}        # message id -> the merged reply.delta waiting for its interval
        self._sent = {}           # message id -> loop time its latest delta event was enqueued
        self._live = {}           # message id -> monotonic time its start was seen (here or elsewhere)
        self._wake = asyncio.Event()
        self._tasks = []
        self._probe = None        # after a reopen: {"id", "written": monotonic or None}, until it comes back
        self._opened = False      # a stream was open before: the next one may have missed events
        self._last_catch_up = time.monotonic()

    async def start(self):
        await self.store.create_events_index(EVENTS_TTL)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write_loop(), name="bus-write"),
                       loop.create_task(self._interest_loop(), name="bus-interest")]
        await super().start()

    async def close(self):
        await super().close()
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        await self._flush_all()  # a stop or final published just before shutdown still goes out

    # sending

    def _publish(self, event):
        kind = type(event)
        if kind is events.ReplyDelta:
            if self._remote_interest(event.session_id):
                self._batch(event)
            return
        if (message_id := getattr(event, "message_id", None)) and message_id in self._batches:
            self._enqueue(self._batches.pop(message_id))  # its text before its final (or its handover)
        self._track(event)
        self._enqueue(event)

    def _track(self, event):
        """Which replies are live in the cluster, as far as this instance has heard: the change stream is polled
        faster while there is one."""
        kind = type(event)
        if kind is events.ReplyStarted:
            self._live[event.message_id] = time.monotonic()
        elif kind is events.ReplyFinal:
            self._live.pop(event.message_id, None)
            self._sent.pop(event.message_id, None)

    def _remote_interest(self, session_id):
        holders = self.interest.get(session_id)
        if not holders:
            return False
        now = time.monotonic()
        for instance, expiry in list(holders.items()):
            if expiry < now:
                del holders[instance]
        if not holders:
            del self.interest[session_id]
        return bool(holders)

    def _batch(self, event):
        message_id = event.message_id
        pending = self._batches.get(message_id)
        if pending is not None:  # deltas published here are contiguous: merging is appending
            pending.text += event.text
            pending.thinking += event.thinking
            return
        loop = asyncio.get_running_loop()
        due = self._sent.get(message_id, -BATCH_INTERVAL) + BATCH_INTERVAL
        if loop.time() >= due:  # the first delta after a quiet interval: at once (a paced reply's every token)
            self._sent[message_id] = loop.time()
            self._enqueue(event)
        else:  # a copy: the event itself was delivered here, and must not change
            self._batches[message_id] = msgspec.structs.replace(event)
            loop.call_at(due, self._release, message_id)

    def _release(self, message_id):
        if (pending := self._batches.pop(message_id, None)) is not None:
            self._sent[message_id] = asyncio.get_running_loop().time()
            self._enqueue(pending)

    def _enqueue(self, event):
        if len(self._outbox) >= MAX_WAITING:  # the store has been away long: shed deltas (a sync repairs them)
            self._outbox = deque(e for e in self._outbox if type(e) is not events.ReplyDelta)
        self._outbox.append(event)
        self._wake.set()

    async def _write_loop(self):
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                try:
                    await self._write_some()
                    delay = 0.05
                except asyncio.CancelledError:
                    raise
                except PyMongoError as exc:
                    log.warning("bus: could not write %d events, retrying: %s", len(self._outbox), exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)

    async def _write_some(self):
        batch = [self._outbox[i] for i in range(min(WRITE_BATCH, len(self._outbox)))]
        await self.store.insert_events(self.instance_id, [events.to_builtins(e) for e in batch])
        for _ in batch:
            self._outbox.popleft()
        if self._probe is not None and any(type(e) is events.Probe and e.id == self._probe["id"] for e in batch):
            self._probe["written"] = time.monotonic()
        if self.metrics is not None:
            for e in batch:
                self.metrics.bus_event_published(e.type)

    async def _flush_all(self):
        for message_id in list(self._batches):
            self._release(message_id)
        try:
            while self._outbox:
                await self._write_some()
        except PyMongoError as exc:
            log.warning("bus: %d events not sent at shutdown: %s", len(self._outbox), exc)

    # interest: which sessions other instances should send us deltas of

    async def _interest_loop(self):
        while True:
            await asyncio.sleep(INTEREST_CHECK)
            viewed = set(self.viewed_sessions())
            now = time.monotonic()
            if fresh := viewed - self._announced:
                self._announce(fresh, sync=True)
            if now - self._last_announce >= INTEREST_REFRESH:
                self._announce(viewed, sync=False)
            self._announced &= viewed
            if now - self._last_catch_up >= CATCH_UP:
                self._catch_up(resync=False)
                for message_id in [m for m, seen in self._live.items() if now - seen > LIVE_FORGET]:
                    del self._live[message_id]
            self._expire_presence(now)

    def _announce(self, sessions, *, sync):
        """`sync`: the owners answer with the whole text of the live replies (a newcomer needs it); a refresh
        only keeps the deltas coming."""
        self._last_announce = time.monotonic()
        if not sessions:
            return
        self._announced |= set(sessions)
        online = {s: sorted(users) for s in sessions if (users := self.online(s))}
        self._enqueue(events.Interest(sessions=sorted(sessions), sync=sync, online=online,
                                      origin=self.instance_id, at=time.time()))

    def _catch_up(self, *, resync):
        """Tell this instance's subscribers to check the stored message numbers of the sessions viewed here: a
        user message (and its reply) whose event was lost reaches the viewers from the store, at once after a
        reopen (`resync`), else within two CATCH_UP intervals (services/delivery/ordering.py)."""
        self._last_catch_up = time.monotonic()
        self._deliver(events.CatchUp(resync=resync, origin=self.instance_id, at=time.time()))

    def want(self, session_id):
        """Ask the owners of a session's live replies for their whole text (a client here resumes one)."""
        now = time.monotonic()
        if now - self._wanted.get(session_id, 0.0) < BATCH_INTERVAL:
            return
        self._wanted[session_id] = now
        self._announced.add(session_id)
        self._enqueue(events.Interest(sessions=[session_id], sync=True, origin=self.instance_id, at=time.time()))

    def online_elsewhere(self, session_id, besides=None):
        holders = self.remote_online.get(session_id)
        if not holders:
            return set()
        now, users = time.monotonic(), set()
        for instance, (names, expiry) in holders.items():
            if expiry >= now and instance != besides:  # (an expired one: _expire_presence says they left)
                users |= names
        return users

    def _expire_presence(self, now):
        """An instance that stopped announcing for INTEREST_TTL is gone (killed, cut off): its users leave with
        it. Each one online nowhere else now gets the leave their tab's close would have sent, delivered here as
        if from that instance (the fan-out tells the viewers only of users no longer online anywhere)."""
        for session_id, holders in list(self.remote_online.items()):
            for instance, (names, expiry) in list(holders.items()):
                if expiry >= now:
                    continue
                del holders[instance]
                for user_id in sorted(names):
                    self._deliver(events.Presence(session_id=session_id, event="leave", user_id=user_id,
                                                  origin=instance, at=time.time()))
            if not holders:
                del self.remote_online[session_id]

    def _on_presence(self, event):
        """Keep who is online elsewhere current between two announcements."""
        holders = self.remote_online.setdefault(event.session_id, {})
        names, _ = holders.get(event.origin, (set(), 0))
        (names.add if event.event == "join" else names.discard)(event.user_id)
        holders[event.origin] = (names, time.monotonic() + INTEREST_TTL)

    def _on_interest(self, event):
        expiry = time.monotonic() + INTEREST_TTL
        origin, online = event.origin, event.online
        if not event.sync:  # a refresh lists all of that instance's sessions: what it left is gone
            for session_id in [s for s, h in self.remote_online.items() if origin in h and s not in online]:
                del self.remote_online[session_id][origin]
        for session_id, users in online.items():
            self.remote_online.setdefault(session_id, {})[origin] = (set(users), expiry)
        for session_id in event.sessions:
            holders = self.interest.setdefault(session_id, {})
            new = origin not in holders
            holders[origin] = expiry
            if new or event.sync:
                for gen in self.live_replies(session_id):
                    self._sync(gen)

    def _sync(self, gen):
        """The whole text of a live reply so far, as one delta from offset 0 (receivers trim what they have)."""
        if gen.message_id in self._batches:
            self._enqueue(self._batches.pop(gen.message_id))
        if gen.status != "streaming" or not (gen.content or gen.thinking):
            return
        sync = events.reply_sync(gen)
        sync.origin, sync.at = self.instance_id, time.time()
        self._enqueue(sync)

    # receiving

    def receive(self, event):
        if event.origin == self.instance_id:
            return
        kind = type(event)
        if kind is events.Interest:
            if self.metrics is not None:
                self.metrics.bus_event_received(event.type, time.time() - (event.at or time.time()))
            self._on_interest(event)
            return
        if kind is events.Probe or kind in events.LOCAL:
            return  # another instance checking its own stream; what is never published
        if kind is events.ReplyStarted or kind is events.ReplyFinal:
            self._track(event)
        elif kind is events.Presence:
            self._on_presence(event)
        super().receive(event)

    def _listen(self):
        return self._changes()

    async def _changes(self):
        stream = None
        delay = 0.05
        while True:
            lost = False
            opening = stream is None
            try:
                if stream is None:
                    stream = await self.store.watch_events(self.resume_token)
                    if self._opened:
                        log.warning("bus: change stream reopened%s; resynchronizing followed replies",
                                    " from its resume token" if self.resume_token else "")
                        self._send_probe()
                        self._catch_up(resync=True)  # the fan-out re-reads what it follows (replylog.py)
                    self._opened = True
                change = await stream.try_next()
                self.resume_token = stream.resume_token or self.resume_token
                delay = 0.05
                if change is None:
                    if self._probe_lost():
                        lost = True  # the server could not resume from our token and says nothing
                        log.warning("bus: the reopened change stream returned nothing, not even this instance's "
                                    "probe: reopening it from now")
                    else:
                        await asyncio.sleep(POLL_LIVE if self._live else POLL)
                        continue
                else:
                    doc = change.get("fullDocument") or {}
                    try:
                        event = events.decode(doc.get("event"))
                    except msgspec.ValidationError as exc:  # another version's, or not an event at all
                        log.warning("bus: an event that is none of ours was skipped: %s", exc)
                        continue
                    if doc.get("origin") != self.instance_id:
                        yield event
                    elif type(event) is events.Probe and self._probe is not None and event.id == self._probe["id"]:
                        self._probe = None  # our own probe came back: the stream delivers
                    continue
            except asyncio.CancelledError:
                raise
            except OperationFailure as exc:  # refused: the token is no longer valid, or not one this server knows
                lost = exc.code in HISTORY_LOST or (opening and self.resume_token is not None)
                log.warning("bus: change stream failed (%s)%s", exc,
                            ": reopening it from now" if lost else "")
            except PyMongoError as exc:
                log.warning("bus: change stream dropped, resuming: %s", exc)
            if stream is not None:
                try:
                    await stream.close()
                except PyMongoError:
                    pass
                stream = None
            if lost:
                self.resume_token = None  # from now on: resync() fills what was missed
                self._probe = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _send_probe(self):
        self._probe = {"id": uuid.uuid4().hex, "written": None}
        self._enqueue(events.Probe(id=self._probe["id"], origin=self.instance_id, at=time.time()))

    def _probe_lost(self):
        return (self._probe is not None and self._probe["written"] is not None
                and time.monotonic() - self._probe["written"] > PROBE_WAIT)
