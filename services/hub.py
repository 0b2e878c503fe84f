"""The connection map: who is connected, which sessions each connection views, and fan-out to them.

Plain dicts owned by the IOLoop (no locks: everything here runs on the loop and never awaits).
"""
import logging
import time

log = logging.getLogger(__name__)


class Connection:
    """One WebSocket, as the services see it. `write(frame)` sends one frame (raises ConnectionClosed when the
    socket is gone); `close(code, reason)` ends the socket."""

    def __init__(self, conn_id, *, identity, pipeline, session_type, stream_mode, write, close, remote_ip=""):
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
        self._write = write
        self.close = close

    @property
    def user_id(self):
        return self.identity.user_id

    def send(self, frame):
        """Queue one frame for this client. Never raises: a closed socket just drops it."""
        if self.closed:
            return False
        try:
            self._write(frame)
            return True
        except ConnectionClosed:
            self.closed = True
            return False


class Cursor:
    """Where a connection is in one reply: the next answer and thinking offsets it will be sent."""
    __slots__ = ("session_id", "offset", "thinking_offset")

    def __init__(self, session_id, offset=0, thinking_offset=0):
        self.session_id = session_id
        self.offset = offset
        self.thinking_offset = thinking_offset


class ConnectionClosed(Exception):
    """Raised by a Connection's `write` when its socket is gone."""


class Hub:
    def __init__(self):
        self.connections = {}   # conn_id -> Connection
        self.by_session = {}    # session_id -> {conn_id: Connection}
        self.by_user = {}       # user_id -> {conn_id: Connection}
        self.by_pipeline = {}   # pipeline id -> {conn_id: Connection}

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

    def join(self, conn, session_id):
        conn.sessions.add(session_id)
        self.by_session.setdefault(session_id, {})[conn.id] = conn
        if conn.primary_session is None:
            conn.primary_session = session_id

    def leave(self, conn, session_id):
        conn.sessions.discard(session_id)
        for message_id in [m for m, c in conn.cursors.items() if c.session_id == session_id]:
            del conn.cursors[message_id]
        _discard(self.by_session, session_id, conn.id)
        if conn.primary_session == session_id:
            conn.primary_session = next(iter(conn.sessions), None)

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
        conns = [c for c in self.connections.values() if pipeline is None or c.pipeline == pipeline]
        by_pipeline, by_type = {}, {}
        for c in conns:
            by_pipeline[c.pipeline] = by_pipeline.get(c.pipeline, 0) + 1
            by_type[c.session_type] = by_type.get(c.session_type, 0) + 1
        return conns, {"total_connections": len(conns), "pipelines": len(by_pipeline),
                       "connections_by_pipeline": by_pipeline, "connections_by_session_type": by_type}


def _discard(index, key, conn_id):
    bucket = index.get(key)
    if bucket is not None:
        bucket.pop(conn_id, None)
        if not bucket:
            del index[key]
