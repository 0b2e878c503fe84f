"""The client side of one WebSocket: parse frames, answer the quick ones at once, run sends in order.

`receive()` never awaits and never raises, so Tornado's on_message returns at once and `ping`/`stop` are heard
while a reply streams. Sends and resumes go through a small per-connection inbox worked by one task, so a
client's messages are persisted in the order it sent them. The task starts with the first queued frame and ends
when the inbox is empty: an idle connection holds no task, queue or coroutine frame (about 5 KB each).
"""
import asyncio
import inspect
import logging

from pymongo.errors import PyMongoError

from services.wire import frames, schema
from services.wire.codes import Close, Code
from services.wire.errors import BadRequest, ParleyError, Unavailable
from services.wire.schema import check_id

log = logging.getLogger(__name__)

INBOX_SIZE = 16
MAX_VIEWED = 64  # sessions one connection may view at once (session.join)


def handler_name(kind):
    """The ClientProtocol method that handles a client frame type: `on_session_join` for `session.join`."""
    return "on_" + kind.replace(".", "_")


class ClientProtocol:
    __slots__ = ("conn", "sessions", "sending", "fanout", "resumer", "inbox", "worker", "busy", "kinds", "guard")

    def __init__(self, conn, services, *, kinds=None, guard=None):
        """`kinds`: the frame types this connection may send (None: all); `guard(conn)`: a check of each message
        before it is queued, raising the refusal (a widget visitor's limits)."""
        self.kinds = kinds
        self.guard = guard
        self.conn = conn
        self.sessions = services.sessions    # services/conversations/sessions.py
        self.sending = services.sending      # services/conversations/sending.py
        self.fanout = services.fanout
        self.resumer = services.resumer
        self.inbox = None             # frames waiting for the worker (a list, made by the first one)
        self.worker = None            # the task working the inbox, while it has frames
        self.busy = False             # the worker is in the middle of a send

    def receive(self, text):
        """Handle one frame. Returns its type, "unknown" for a type Parley does not know, or "invalid" when it is
        not a frame (for metrics)."""
        kind = None
        try:
            frame = schema.decode_frame(text)
            kind = schema.frame_type(frame)
            if self.kinds is not None and kind not in self.kinds:
                raise BadRequest(f"{kind!r} frames are not available on this connection", code=Code.UNKNOWN_TYPE)
            if kind in QUEUED:
                self._queue(frame)
            else:
                HANDLERS[kind](self, frame)
        except ParleyError as err:
            kind = kind or schema.peek_type(text)
            self._refuse(err, request_type=kind)
            if err.code == "unknown_type":
                return "unknown"
        except Exception:
            log.exception("frame handling failed conn_id=%s", self.conn.id)
            self._refuse(ParleyError("internal error"), request_type=kind)
        return kind if kind in HANDLERS else "invalid"

    def shutdown(self):
        """The socket closed: finish the send in progress (never half-persist one), drop the rest."""
        if self.worker is not None and not self.busy:
            self.worker.cancel()
        self.inbox = None
        self.conn.closed = True

    def _refuse(self, err, request_type=None, **context):
        """Tell the client a frame failed. A plain LangBot client takes any `error` frame for a lost connection,
        so a refused `message` reaches it as a final assistant reply carrying the reason (docs/langbot.md)."""
        if self.conn.dialect == frames.LANGBOT and request_type == "message":
            self.conn.send(frames.refusal(err, self.conn.session_type))
        else:
            self.conn.send(frames.error(err, request_type=request_type, **context))

    # quick frames, answered inline (an already authenticated client's `authenticate`, a LangBot habit, is
    # harmless)

    def on_ping(self, frame):
        self.conn.send(frames.pong())

    def on_authenticate(self, frame):
        pass

    def on_disconnect(self, frame):
        self.conn.close(Close.NORMAL, Close.NORMAL.reason)

    def on_stop(self, frame):
        session_id = self._session_id(frame)
        stopped = self.sending.stop(self.conn.identity, session_id, frame.message_id)
        self.conn.send(frames.stop_ack(session_id, stopped))

    def on_session_leave(self, frame):
        session_id = self._session_id(frame)
        self.fanout.leave(self.conn, session_id)
        self.conn.send(frames.session_left(session_id, "left"))

    def on_presence(self, frame):
        self.conn.send(self.fanout.presence_frame(self._session_id(frame)))

    # frames that wait their turn (they touch the store), in the order the client sent them

    def _queue(self, frame):
        if isinstance(frame, (schema.MessageFrame, schema.RegenerateFrame)):
            self._session_id(frame)  # reject a foreign session before queueing
            if self.guard is not None:
                self.guard(self.conn)
        if self.inbox is None:
            self.inbox = []
        elif len(self.inbox) >= INBOX_SIZE:
            raise ParleyError("too many messages waiting on this connection; slow down",
                              code=Code.RATE_LIMITED, retry_after=1)
        self.inbox.append(frame)
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._work(), name=f"inbox-{self.conn.id}")

    async def _work(self):
        try:
            while self.inbox and not self.conn.closed:
                frame = self.inbox.pop(0)
                self.busy = True
                kind = schema.frame_type(frame)
                context = {"request_type": kind, "client_msg_id": getattr(frame, "client_msg_id", None)}
                try:
                    await HANDLERS[kind](self, frame)
                except PyMongoError as exc:
                    log.error("store error on %s conn_id=%s: %s", kind, self.conn.id, exc)
                    self._refuse(Unavailable("the message store is unavailable, try again"), **context)
                except ParleyError as err:
                    self._refuse(err, **context)
                except Exception:
                    log.exception("%s failed conn_id=%s", kind, self.conn.id)
                    self._refuse(ParleyError("internal error"), **context)
                finally:
                    self.busy = False
        finally:  # nothing runs between the empty check and here: a frame queued later starts a new worker
            self.worker = None
            if not self.inbox:
                self.inbox = None

    async def on_message(self, frame):
        identity = self.conn.identity
        session = await self.sessions.session_to_send(identity, self.conn.pipeline, self._session_id(frame))
        user_doc, reply_doc, duplicate = await self.sending.send(
            identity, session, frame.message, stream=frame.stream, client_msg_id=frame.client_msg_id,
            connection_id=self.conn.id)
        self.conn.send(frames.ack(user_doc, reply_doc, duplicate))

    async def on_regenerate(self, frame):
        session = await self.sessions.session(self.conn.identity, self.conn.pipeline, self._session_id(frame))
        user_doc, reply_doc = await self.sending.regenerate(self.conn.identity, session, frame.message_id,
                                                            stream=frame.stream)
        self.conn.send(frames.ack(user_doc, reply_doc, False))

    async def on_session_join(self, frame):
        session = await self.sessions.session(self.conn.identity, self.conn.pipeline, frame.session_id)
        if self.conn.closed:
            return
        if session["_id"] not in self.conn.sessions and len(self.conn.sessions) >= MAX_VIEWED:
            raise BadRequest(f"a connection views at most {MAX_VIEWED} sessions; leave one first",
                             code=Code.TOO_MANY_SESSIONS)
        self.conn.send(frames.session_joined(session))
        self.fanout.join(self.conn, session["_id"], session["type"], session.get("next_seq"))

    async def on_group_leave(self, frame):
        session = await self.sessions.session(self.conn.identity, self.conn.pipeline, frame.session_id)
        viewing = session["_id"] in self.conn.sessions
        await self.sessions.leave_group(self.conn.identity, session)
        if not viewing or self.conn.identity.is_admin:  # leave_group told the viewing connections already
            self.conn.send(frames.session_left(session["_id"], "left_group"))

    async def on_resume(self, frame):
        await self.resumer.resume(self.conn, frame)

    def _session_id(self, frame):
        session_id = frame.session_id
        if session_id is None:
            if self.conn.primary_session is None:
                raise BadRequest("this connection views no session", code=Code.SESSION_NOT_FOUND)
            return self.conn.primary_session
        check_id(session_id, "session_id")
        if session_id not in self.conn.sessions:
            raise BadRequest("this connection does not view that session", code=Code.SESSION_NOT_FOUND)
        return session_id


# client frame type -> its method, for every type services/wire/schema.py declares (a missing one fails at import).
# A coroutine method waits its turn in the inbox (it touches the store); a plain one is answered inline.
HANDLERS = {kind: getattr(ClientProtocol, handler_name(kind)) for kind in schema.CLIENT_TYPES}
QUEUED = frozenset(kind for kind, method in HANDLERS.items() if inspect.iscoroutinefunction(method))
