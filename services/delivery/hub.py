"""The connection map: who is connected and which sessions each connection views (this instance only).

Plain dicts owned by the IOLoop (no locks: everything here runs on the loop and never awaits).
"""
import logging
import time

from services.wire.codes import Close
from services.wire.outbox import ConnectionClosed, Outbox
from services.wire.schema import LANGBOT_STRUCTS

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 1024 * 1024


class Connection:
    """One WebSocket, as the services see it. `write(text)` sends one text frame and returns a Future resolved
    when it is flushed (raises ConnectionClosed when the socket is gone); `close(code, reason)` ends the socket;
    `ping()` sends a WebSocket ping (False when the socket is gone), answered by `pong()`
    (services/delivery/keepalive.py).
    """
    # thousands of idle ones are held at once: no per-instance __dict__
    __slots__ = ("id", "dialect", "identity", "pipeline", "session_type", "stream_mode", "remote_ip", "sessions",
                 "primary_session", "readers", "finals_sent", "created_at", "last_active", "closed", "close",
                 "outbox", "ping", "pinged_at")

    def __init__(self, conn_id, *, identity, pipeline, session_type, stream_mode, write, close, remote_ip="",
                 outbox_limit=OUTBOX_LIMIT, on_sent=None, dialect="parley", ping=None):
        self.id = conn_id
        self.dialect = dialect              # "langbot" (plain) or "parley" (opted in): services/wire/frames.py
        self.identity = identity
        self.pipeline = pipeline
        self.session_type = session_type
        self.stream_mode = stream_mode      # "cumulative" (LangBot-compatible) or "delta"
        self.remote_ip = remote_ip
        self.sessions = ()                  # viewed session ids, in join order (a few: a set is 216 bytes)
        self.primary_session = None         # the session a frame without session_id addresses
        self.readers = {}                   # message_id -> replylog.Reader: how much of each reply was sent here
        self.finals_sent = {}               # message ids whose final the live stream sent here (the latest few)
        self.created_at = time.time()
        self.last_active = self.created_at
        self.closed = False
        self.close = close
        self.ping = ping
        self.pinged_at = None               # loop time of the WebSocket ping still unanswered (keepalive.py)
        self.outbox = Outbox(write, limit=outbox_limit, on_overflow=self._too_slow, on_sent=on_sent)

    @property
    def user_id(self):
        return self.identity.user_id

    def pong(self):
        self.pinged_at = None

    def send(self, frame, text=None, nbytes=None):
        """Queue one frame for this client. Never raises and never waits: a closed socket just drops it.
        `text` (and its UTF-8 length `nbytes`): the frame already encoded, shared with other connections."""
        if self.closed:
            return False
        if self.dialect == "langbot" and type(frame) not in LANGBOT_STRUCTS:
            return False  # extension frames go only to connections that asked for them
        try:
            self.outbox.put(frame, text, nbytes)
            return True
        except ConnectionClosed:
            self.closed = True
            return False

    def send_pages(self, message_id, pages):
        """Queue an iterator of frames sent one by one as the client reads them (a huge catch-up)."""
        if self.closed:
            return False
        try:
            self.outbox.put_pages(message_id, pages)
            return True
        except ConnectionClosed:
            self.closed = True
            return False

    def _too_slow(self):
        log.warning("closing a slow consumer conn_id=%s user=%s: %d characters waiting", self.id, self.user_id,
                    self.outbox.waiting_size)
        self.close(Close.SLOW_CONSUMER, Close.SLOW_CONSUMER.reason)


class Hub:
    """The local registry of connections: by id, user, session and pipeline. Nothing else: what a connection
    is sent is decided by services/delivery/fanout.py, which is also the only code that joins and leaves sessions."""

    def __init__(self):
        self.connections = {}   # conn_id -> Connection
        self.by_session = {}    # session_id -> {conn_id: Connection}
        self.by_user = {}       # user_id -> {conn_id: Connection}
        self.by_pipeline = {}   # pipeline id -> {conn_id: Connection}
        self.session_types = {}  # viewed session id -> "person" | "group"
        self.session_users = {}  # viewed session id -> {user_id: how many of the user's connections view it}
        self.pending = 0        # sockets open but not registered yet (authenticating): they count as connections

    def register(self, conn):
        self.connections[conn.id] = conn
        self.by_user.setdefault(conn.user_id, {})[conn.id] = conn
        self.by_pipeline.setdefault(conn.pipeline, {})[conn.id] = conn
        log.debug("connection registered conn_id=%s user=%s", conn.id, conn.user_id)

    def unregister(self, conn):
        """Forget a connection (services/delivery/fanout.py leaves its sessions first). False if it was not
        registered."""
        if self.connections.pop(conn.id, None) is None:
            return False
        _discard(self.by_user, conn.user_id, conn.id)
        _discard(self.by_pipeline, conn.pipeline, conn.id)
        conn.closed = True
        log.debug("connection unregistered conn_id=%s", conn.id)
        return True

    def join(self, conn, session_id, session_type="person"):
        """Add a viewer. Returns True when this made the user newly online in the session."""
        if session_id in conn.sessions:
            return False
        users = self.session_users.setdefault(session_id, {})
        user_id = conn.user_id
        first_of_user = user_id not in users
        users[user_id] = users.get(user_id, 0) + 1
        conn.sessions += (session_id,)
        self.by_session.setdefault(session_id, {})[conn.id] = conn
        self.session_types.setdefault(session_id, session_type)
        if conn.primary_session is None:
            conn.primary_session = session_id
        return first_of_user

    def leave(self, conn, session_id):
        """Remove a viewer. Returns True when the user has no connection left viewing the session."""
        if session_id not in conn.sessions:
            return False
        conn.sessions = tuple(s for s in conn.sessions if s != session_id)
        _discard(self.by_session, session_id, conn.id)
        if conn.primary_session == session_id:
            conn.primary_session = next(iter(conn.sessions), None)
        if session_id not in self.by_session:
            self.session_types.pop(session_id, None)
        users, user_id = self.session_users[session_id], conn.user_id
        if users[user_id] > 1:
            users[user_id] -= 1
            return False
        del users[user_id]
        if not users:
            del self.session_users[session_id]
        return True

    def session_type(self, session_id):
        return self.session_types.get(session_id)

    def online(self, session_id):
        """The users with at least one connection viewing the session."""
        return set(self.session_users.get(session_id, ()))

    def viewers(self, session_id):
        return list(self.by_session.get(session_id, {}).values())

    def of_user(self, user_id):
        return list(self.by_user.get(user_id, {}).values())

    def of_pipeline(self, pipeline=None):
        """Every connection of a pipeline (None: of all pipelines)."""
        return list((self.by_pipeline.get(pipeline, {}) if pipeline else self.connections).values())

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
