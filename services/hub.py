"""The connection map: who is connected, which sessions each connection views, and fan-out to them.

Plain dicts owned by the IOLoop (no locks: everything here runs on the loop and never awaits).
"""
import logging
import time

from services.outbox import CLOSE_SLOW_CONSUMER, ConnectionClosed, Outbox

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 1024 * 1024


class Connection:
    """One WebSocket, as the services see it. `write(text)` sends one text frame and returns a Future resolved
    when it is flushed (raises ConnectionClosed when the socket is gone); `close(code, reason)` ends the socket.
    """

    def __init__(self, conn_id, *, identity, pipeline, session_type, stream_mode, write, close, remote_ip="",
                 outbox_limit=OUTBOX_LIMIT, on_sent=None):
        self.id = conn_id
        self.identity = identity
        self.pipeline = pipeline
        self.session_type = session_type
        self.stream_mode = stream_mode      # "cumulative" (LangBot-compatible) or "delta"
        self.remote_ip = remote_ip
        self.sessions = set()               # viewed session ids
        self.primary_session = None         # the session a frame without session_id addresses
        self.cursors = {}                   # message_id -> Cursor: how much of each live reply was sent here
        self.created_at = time.time()
        self.last_active = self.created_at
        self.closed = False
        self.close = close
        self.outbox = Outbox(write, limit=outbox_limit, on_overflow=self._too_slow, on_sent=on_sent)

    @property
    def user_id(self):
        return self.identity.user_id

    def send(self, frame):
        """Queue one frame for this client. Never raises and never waits: a closed socket just drops it."""
        if self.closed:
            return False
        try:
            self.outbox.put(frame)
            return True
        except ConnectionClosed:
            self.closed = True
            return False

    def _too_slow(self):
        log.warning("closing a slow consumer conn_id=%s user=%s: %d characters waiting", self.id, self.user_id,
                    self.outbox.waiting_size)
        self.close(CLOSE_SLOW_CONSUMER, "slow_consumer")


class Cursor:
    """Where a connection is in one reply: the next answer and thinking offsets it will be sent."""
    __slots__ = ("session_id", "offset", "thinking_offset")

    def __init__(self, session_id, offset=0, thinking_offset=0):
        self.session_id = session_id
        self.offset = offset
        self.thinking_offset = thinking_offset


class Hub:
    def __init__(self):
        self.connections = {}   # conn_id -> Connection
        self.by_session = {}    # session_id -> {conn_id: Connection}
        self.by_user = {}       # user_id -> {conn_id: Connection}
        self.by_pipeline = {}   # pipeline id -> {conn_id: Connection}
        self.group_sessions = set()  # viewed sessions of type group: their viewers get presence frames
        self.pending = 0        # sockets open but not registered yet (authenticating): they count as connections

    def register(self, conn):
        self.connections[conn.id] = conn
        self.by_user.setdefault(conn.user_id, {})[conn.id] = conn
        self.by_pipeline.setdefault(conn.pipeline, {})[conn.id] = conn
        log.debug("connection registered conn_id=%s user=%s", conn.id, conn.user_id)

    def unregister(self, conn):
        if self.connections.pop(conn.id, None) is None:
            return
        for session_id in list(conn.sessions):
            self.leave(conn, session_id)
        _discard(self.by_user, conn.user_id, conn.id)
        _discard(self.by_pipeline, conn.pipeline, conn.id)
        conn.closed = True
        log.debug("connection unregistered conn_id=%s", conn.id)

    def join(self, conn, session_id, session_type="person"):
        if session_id in conn.sessions:
            return
        first_of_user = conn.user_id not in self.online(session_id)
        conn.sessions.add(session_id)
        self.by_session.setdefault(session_id, {})[conn.id] = conn
        if conn.primary_session is None:
            conn.primary_session = session_id
        if session_type == "group":
            self.group_sessions.add(session_id)
        if first_of_user:
            self._presence(session_id, "join", conn.user_id)

    def leave(self, conn, session_id):
        if session_id not in conn.sessions:
            return
        conn.sessions.discard(session_id)
        for message_id in [m for m, c in conn.cursors.items() if c.session_id == session_id]:
            del conn.cursors[message_id]
        _discard(self.by_session, session_id, conn.id)
        if conn.primary_session == session_id:
            conn.primary_session = next(iter(conn.sessions), None)
        if conn.user_id not in self.online(session_id):
            self._presence(session_id, "leave", conn.user_id)
        if session_id not in self.by_session:
            self.group_sessions.discard(session_id)

    def online(self, session_id):
        """The users with at least one connection viewing the session."""
        return {c.user_id for c in self.by_session.get(session_id, {}).values()}

    def presence_frame(self, session_id, event="snapshot", user_id=None):
        data = {"session_id": session_id, "event": event, "online": sorted(self.online(session_id))}
        if user_id is not None:
            data["user_id"] = user_id
        return {"type": "presence", "data": data}

    def _presence(self, session_id, event, user_id):
        # user-level: a second tab of someone already online is not news
        if session_id in self.group_sessions:
            frame = self.presence_frame(session_id, event, user_id)
            self.publish(session_id, lambda conn: frame)

    def push(self, user_id, frame):
        """Send a frame to every connection of a user; returns how many got it."""
        return sum(conn.send(frame) for conn in list(self.by_user.get(user_id, {}).values()))

    def broadcast(self, frame, pipeline=None):
        conns = self.by_pipeline.get(pipeline, {}) if pipeline else self.connections
        return sum(conn.send(frame) for conn in list(conns.values()))

    def viewers(self, session_id):
        return list(self.by_session.get(session_id, {}).values())

    def publish(self, session_id, render):
        """Send `render(conn)` to every viewer of a session; `render` may return None to skip one."""
        sent = 0
        for conn in self.viewers(session_id):
            frame = render(conn)
            if frame is not None and conn.send(frame):
                sent += 1
        return sent

    def stats(self, pipeline=None):
        """LangBot's connection stats, plus per-user counts and the oldest and idlest connection."""
        conns = [c for c in self.connections.values() if pipeline is None or c.pipeline == pipeline]
        by_pipeline, by_type, by_user = {}, {}, {}
        for c in conns:
            by_pipeline[c.pipeline] = by_pipeline.get(c.pipeline, 0) + 1
            by_type[c.session_type] = by_type.get(c.session_type, 0) + 1
            by_user[c.user_id] = by_user.get(c.user_id, 0) + 1
        now = time.time()
        return conns, {"total_connections": len(conns), "pipelines": len(by_pipeline),
                       "connections_by_pipeline": by_pipeline, "connections_by_session_type": by_type,
                       "connections_by_user": by_user, "users": len(by_user),
                       "oldest_connection_seconds": round(max((now - c.created_at for c in conns), default=0), 3),
                       "max_idle_seconds": round(max((now - c.last_active for c in conns), default=0), 3)}


def _discard(index, key, conn_id):
    bucket = index.get(key)
    if bucket is not None:
        bucket.pop(conn_id, None)
        if not bucket:
            del index[key]
