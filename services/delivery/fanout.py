"""The fan-out: one bus event -> frames for the local connections that should get it.

Whether an event was born here or on another instance, it reaches clients through `handle()`: first the
session's order (services/delivery/ordering.py), then a renderer. A reply's events go to its log and the viewers'
readers of it (services/delivery/replylog.py: live delivery, resume, followed replies and re-reads in one place); the
rest are rendered here. This is the only code that joins or leaves sessions (so readers and presence stay
consistent with the registry).

Each distinct frame is rendered and JSON-encoded once, and the same text is written to every connection that
gets those bytes. Frames carry the event's timestamp, never a per-connection one. LangBot's
`data.connection_id` is the sender's on `user_message` and "" on `response` (as LangBot's server sends them), so
no frame has a per-connection field. Extension frames (anything outside schema.LangBotServerFrame) go only to
connections that opted in to the Parley dialect.
"""
import logging

from services.delivery.ordering import Ordering
from services.delivery.replylog import ReplyLogs
from services.wire import events, frames
from services.wire.outbox import encode
from services.wire.schema import LANGBOT_STRUCTS

log = logging.getLogger(__name__)


class FanOut:
    def __init__(self, hub, bus, metrics=None, store=None):
        self.hub = hub
        self.bus = bus
        self.metrics = metrics
        self.encodes = 0    # distinct frames encoded, and frames written with them (for bench/ and tests)
        self.writes = 0
        # every reply's frames: its log and each viewer's reader of it (services/delivery/replylog.py)
        self.replies = ReplyLogs(hub, self._send, instance_id=bus.instance_id, session_type=self._session_type,
                                 store=store, want=bus.want, metrics=metrics)
        replies = self.replies
        self.handlers = {events.UserMessage: self._user_message, events.ReplyStarted: replies.started,
                         events.ReplyDelta: replies.delta, events.ReplyFinal: replies.final,
                         events.ReplyStored: replies.stored, events.Reset: self._reset,
                         events.Members: self._members, events.Presence: self._presence,
                         events.Broadcast: self._broadcast, events.Push: self._push,
                         events.Reconnect: self._reconnect, events.CatchUp: self._catch_up}
        # a session's messages reach its viewers here in the store's order (services/delivery/ordering.py)
        self.order = Ordering(self._dispatch, store, self._session_type)
        bus.subscribe(self.handle)

    def handle(self, event):
        self.order.handle(event)

    def _dispatch(self, event):
        handler = self.handlers.get(type(event))
        if handler is not None:
            handler(event)

    # sending: one encoding per distinct frame

    def _send(self, frame, conns):
        """Write one frame to many connections, encoded once. Returns how many took it."""
        if frame is not None and type(frame) not in LANGBOT_STRUCTS:
            conns = [c for c in conns if c.dialect != frames.LANGBOT]
        if frame is None or not conns:
            return 0
        self.encodes += 1
        if self.metrics is not None:
            self.metrics.frame_encoded()
        sent = 0
        text = encode(frame)
        nbytes = len(text)
        for conn in conns:
            sent += conn.send(frame, text, nbytes)
        self.writes += sent
        return sent

    def _per_dialect(self, render, conns):
        """Render once per dialect present among `conns` (render(dialect) -> frame) and send each its own."""
        by_dialect = {}
        for conn in conns:
            by_dialect.setdefault(conn.dialect, []).append(conn)
        return sum(self._send(render(dialect), group) for dialect, group in by_dialect.items())

    def _session_type(self, session_id):
        return self.hub.session_type(session_id) or "person"

    # events

    def _user_message(self, event):
        session_type = event.session_type or self._session_type(event.session_id)
        self._per_dialect(lambda dialect: frames.user_message(event.message, dialect, session_type,
                                                              event.connection_id),
                          self.hub.viewers(event.session_id))

    def _catch_up(self, event):
        """Events may have been lost (a cluster bus: periodically, and at once after its stream reopened)."""
        self.order.catch_up(event.resync)
        self.replies.check(reread_all=event.resync)

    def _reset(self, event):
        self.replies.reset(event.session_id)  # its replies are deleted: their logs end with nothing more
        self._send(frames.session_reset(event), self.hub.viewers(event.session_id))

    def _members(self, event):
        session_id, removed = event.session_id, set(event.removed)
        gone = [c for c in self.hub.viewers(session_id) if c.user_id in removed and not c.identity.is_admin]
        for conn in gone:
            self.leave(conn, session_id)
        self._send(frames.session_left(session_id, event.reason), gone)
        # everyone still viewing it learns the new member list (the web app's members panel follows it)
        self._send(frames.session_members(event), self.hub.viewers(session_id))

    def _presence(self, event):
        session_id, user_id, origin = event.session_id, event.user_id, event.origin
        # A user is online once across instances: their tab's join or leave on one instance is news only when
        # no tab of theirs views the session anywhere else (here, or on a third instance).
        if user_id in self.bus.online_elsewhere(session_id, besides=origin) or (
                origin != self.bus.instance_id and user_id in self.hub.online(session_id)):
            return
        self._send(self.presence_frame(session_id, event.event, user_id, at=event.at),
                   self.hub.viewers(session_id))

    def _broadcast(self, event):
        self._send(frames.broadcast(event.message, event.at), self.hub.of_pipeline(event.pipeline))

    def _push(self, event):
        self._send(frames.push(event.message, event.data, event.at), self.hub.of_user(event.user_id))

    def _reconnect(self, event):
        if event.origin != self.bus.instance_id:
            return  # this instance is draining: other instances' clients stay
        self._send(frames.reconnect(event.reason, event.at, event.retry_after),
                   self.hub.of_pipeline())

    # who views what

    def join(self, conn, session_id, session_type="person", next_seq=None):
        """`next_seq`: the session's message counter as read from the store for this join (its `next_seq`):
        messages numbered after it reach the viewers here in order."""
        self.order.track(session_id, next_seq)
        if self.hub.join(conn, session_id, session_type) and self.hub.session_type(session_id) == "group":
            self.bus.publish(events.Presence(session_id=session_id, event="join", user_id=conn.user_id))

    def leave(self, conn, session_id):
        self.replies.leave(conn, session_id)
        group = self.hub.session_type(session_id) == "group"
        # user-level: a second tab of someone already online (or still online) is not news
        if self.hub.leave(conn, session_id) and group:
            self.bus.publish(events.Presence(session_id=session_id, event="leave", user_id=conn.user_id))
        if not self.hub.by_session.get(session_id):
            self.order.forget(session_id)

    def unregister(self, conn):
        for session_id in list(conn.sessions):
            self.leave(conn, session_id)
        conn.readers.clear()
        self.hub.unregister(conn)

    def presence_frame(self, session_id, event="snapshot", user_id=None, at=None):
        online = self.hub.online(session_id) | self.bus.online_elsewhere(session_id)  # every instance's
        return frames.presence(session_id, event, online, user_id)
