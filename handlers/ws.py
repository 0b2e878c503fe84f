"""The WebSocket endpoint: authenticate -> register a Connection, on_message -> ClientProtocol, on_close -> unregister.

Nothing is registered before authentication succeeds: a client without credentials in the handshake has
--auth-timeout seconds (10) to send `{"type": "authenticate", "token": ...}` as its first frame. Such a socket
counts against --max-connections from the moment it opens. Pings and token expiry (`reconnect`, then 4401) are
services/delivery/keepalive.py's, one timer for every socket.

Only Tornado's public API: the `ping_interval` and `max_message_size` properties (Tornado's own pinger off, its
size limit a hard cap above ours), `ping`/`on_pong`, `close_code` (how the peer closed). What that API cannot
tell (docs/protocol.md "Close codes"): a peer's close frame without a status code from a lost connection (both
`close_code` None: counted `lost`), and why Tornado failed a connection itself (a text frame that is not UTF-8,
a frame over the hard cap: it drops the TCP connection, and the handler only sees it end).

Both sockets live here (~420 lines): EmbedSocket, a widget visitor's, overrides a few steps of ChatSocket's
(who may connect, its first frame, the frames it may send, how it is refused), so the handshake's checks and
their order are written once.
"""
import asyncio
import json
import logging
import time
import uuid
from urllib.parse import urlparse

from pymongo.errors import PyMongoError
from tornado import web, websocket

from handlers.base import error_reason
from services.access import guards
from services.access.auth import bearer_or_query_token, request_credential
from services.access.forwarded import client_address
from services.access.limits import check_capacity
from services.conversations.sessions import check_session_type
from services.delivery.hub import Connection, ConnectionClosed
from services.operations import logs
from services.wire import frames, schema
from services.wire.codes import CLOSE_FOR_CODE, CLOSE_FOR_STATUS, PING_TIMEOUT, Close, Code, for_http_status
from services.wire.errors import BadRequest, Capacity, ParleyError, RateLimited, Unauthorized, Unavailable
from services.wire.protocol import ClientProtocol
from services.wire.schema import AuthenticateFrame, decode_frame

log = logging.getLogger(__name__)

STREAM_MODES = ("cumulative", "delta")
# What the 101 answer carried (Tornado's, then ours), emptied once it is sent: see _forget_handshake.
RESPONSE_HEADERS = ("Server", "Content-Type", "Date", "Upgrade", "Connection", "Sec-WebSocket-Accept",
                    "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "X-Parley-Instance", "X-Request-Id")
# Server-initiated close code -> parley_ws_disconnects_total{reason} (a ping timeout's 1011 says ping_timeout)
DISCONNECT_FOR_CODE = {c: c.disconnect for c in Close if c.disconnect}
HARD_CAP_FACTOR = 4  # frames up to 4x --max-message-size are read whole and refused with a clean 1009


class ChatSocket(websocket.WebSocketHandler):

    def initialize(self, services):
        self.services = services
        self.conn = None
        self.protocol = None
        self.awaiting_auth = None  # the timer while we wait for an `authenticate` frame
        self.closed_by = None  # why the server ended this socket (see _close); None: the peer ended it
        self.pending = False  # counted in hub.pending (open, not registered yet)

    def prepare(self):
        self.request.remote_ip = client_address(self.request, self.services.config.trusted_proxies)
        self.set_header("X-Parley-Instance", self.services.instance_id)  # sent with the 101 handshake answer
        rid = logs.request_id(self.request.headers.get("X-Request-Id"))
        self.set_header("X-Request-Id", rid)
        logs.bind(request_id=rid)  # on every line of this socket's life, with its conn_id once registered
        if self.services.draining:  # behind nginx, the handshake is retried on another instance
            err = ParleyError("this server is restarting; connect again", code=Code.DRAINING)
            self.set_status(err.http_status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(err.to_dict()))
            return
        try:
            guards.check_host(self.request, self.services.config)  # DNS rebinding, before the upgrade
        except ParleyError as err:
            self.set_status(err.http_status)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps(err.to_dict()))

    def write_error(self, status_code, **kwargs):
        """A refused handshake (bad upgrade headers, origin) answers JSON like every other route."""
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"code": for_http_status(status_code), "message": error_reason(status_code, kwargs)}))

    @property
    def ping_interval(self):
        return 0  # Tornado's pinger (a task per socket, its timeout untold) stays off: services/delivery/keepalive.py

    @property
    def max_message_size(self):
        """Tornado's limit is a hard cap above ours: it closes at the frame header with the payload unread (the
        peer may get a reset and lose the 1009); on_message reads the whole frame first and closes cleanly."""
        return HARD_CAP_FACTOR * self.services.config.max_message_size

    def select_subprotocol(self, subprotocols):
        """Opt in to Parley's dialect. A browser fails the handshake when the server does not select a
        subprotocol it offered, so select ours whenever it is offered; anything else stays plain LangBot."""
        return frames.SUBPROTOCOL if frames.SUBPROTOCOL in subprotocols else None

    def _dialect(self):
        opted_in = (self.selected_subprotocol == frames.SUBPROTOCOL
                    or self._query("protocol", None) == frames.SUBPROTOCOL)
        return frames.PARLEY if opted_in else frames.LANGBOT

    def check_origin(self, origin):
        """Cross-site WebSocket hijacking guard: same host, or an origin on --allowed-origins."""
        allowed = self.services.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        return urlparse(origin).netloc.lower() == self.request.host.lower()

    def _query(self, name, default):
        try:
            return self.get_query_argument(name, default)
        except web.HTTPError:  # not UTF-8 (a percent-encoded lone surrogate, say)
            raise BadRequest(f"{name} is not valid UTF-8", code=Code.INVALID_PARAM) from None

    def open(self, pipeline):
        """Not a coroutine unless it must wait for the store (see _start): Tornado keeps what open() returned
        for the socket's life."""
        # Frames often go out back to back (ack then the first token, stop_ack then the final): without this the
        # second waits for the peer's delayed ACK (~40 ms).
        self.set_nodelay(True)
        try:
            self.services.pipelines.get(pipeline)
            self.params = {"pipeline": pipeline,
                           "session_type": check_session_type(self._query("session_type", "person")),
                           "stream_mode": self._query("stream_mode", "cumulative"),
                           "session_id": self._query("session_id", None), "client_session": None}
            if self.params["stream_mode"] not in STREAM_MODES:
                raise BadRequest("stream_mode must be cumulative or delta", code=Code.INVALID_PARAM)
            self.params["dialect"] = self._dialect()
            if self.params["dialect"] == frames.LANGBOT:
                self.params["stream_mode"] = "cumulative"  # LangBot streams the whole text so far
            config = self.services.config
            check_capacity(self.services.hub, None, max_total=config.max_connections,
                           max_per_user=config.max_connections_per_user)
            self._hold_pending(True)
            auth = self.services.auth
            if auth.requires_credentials and not self._has_credentials():
                self.awaiting_auth = asyncio.get_running_loop().call_later(
                    self.services.config.auth_timeout, self._auth_timed_out)
                return
            identity = auth.identify(self.request)
        except ParleyError as err:
            return self._refuse(err)
        return self._start(identity)

    async def on_message(self, message):
        limit = self.services.config.max_message_size
        if len(message) > limit // 4 and len(message.encode("utf-8", "surrogatepass") if isinstance(message, str)
                                            else message) > limit:
            return self._close(Close.MESSAGE_TOO_BIG, Close.MESSAGE_TOO_BIG.reason)
        if self.protocol is not None:
            self.conn.last_active = time.time()
            # never awaits: ping and stop are heard during a reply
            self.services.metrics.frame_received(self.protocol.receive(message))
        elif self.awaiting_auth is not None:
            await self._authenticate(message)

    def on_pong(self, data):
        if self.conn is not None:
            self.conn.pong()

    def on_close(self):
        self._cancel_auth_timer()
        self._hold_pending(False)
        if self.protocol is not None:
            self.protocol.shutdown()
        if self.conn is not None:
            self.services.sending.disconnect(self.conn)  # unregisters; may stop replies (--on-last-viewer-gone)
            if self.closed_by is not None:
                ended_by = "client" if self.closed_by == "client_request" else "server"
            else:  # the peer's close frame carries a status code; a lost connection (or a bare close frame) none
                ended_by = "client" if self.close_code is not None else "lost"
            self.services.metrics.connection_closed(self.conn, ended_by)

    async def _authenticate(self, message):
        self._cancel_auth_timer()
        try:
            frame = decode_frame(message)
            if not isinstance(frame, AuthenticateFrame):
                raise Unauthorized("authenticate first: {\"type\": \"authenticate\", \"token\": ...}")
            identity = self._verify(frame.token)
        except ParleyError as err:
            return self._refuse(err if isinstance(err, Unauthorized) else Unauthorized(err.message))
        looking_up = self._start(identity)
        if looking_up is not None:
            await looking_up

    def _start(self, identity):
        """Register at once when a connection here views the session already (another tab, a reconnect: no
        store round trip); else return the coroutine that looks it up first."""
        p = self.params
        try:
            session = self.services.sessions.viewed_default_session(identity, p["pipeline"], p["session_type"],
                                                                    p["client_session"]) \
                if p["session_id"] is None else None
        except ParleyError as err:
            return self._refuse(err)
        if session is None:
            return self._look_up(identity)
        self._register(identity, session)

    async def _look_up(self, identity):
        p = self.params
        sessions = self.services.sessions
        try:
            if p["client_session"] is not None:
                session = await sessions.embed_session(identity, p["pipeline"], p["session_type"],
                                                       p["client_session"], viewed_ok=True, admit=self._admit_session)
            elif p["session_id"] is None:  # another tab of a viewed session: no store round trip (Sessions._viewed)
                session = await sessions.default_session(identity, p["pipeline"], p["session_type"], viewed_ok=True)
            else:
                session = await sessions.session(identity, p["pipeline"], p["session_id"])
        except PyMongoError as exc:
            log.error("store error on connect: %s", exc)
            return self._refuse(Unavailable("the message store is unavailable, try again"))
        except ParleyError as err:
            return self._refuse(err)
        if self.ws_connection is None:  # the client left while we looked the session up
            return
        self._register(identity, session)

    def _register(self, identity, session):
        p = self.params
        config = self.services.config
        self._hold_pending(False)
        try:
            self._admit(identity)
        except Capacity as err:
            return self._refuse(err)
        self.conn = Connection(uuid.uuid4().hex, identity=identity, pipeline=p["pipeline"],
                               session_type=session["type"], stream_mode=p["stream_mode"], write=self._write,
                               close=self._close, remote_ip=self.request.remote_ip,
                               outbox_limit=config.outbox_limit, on_sent=self.services.metrics.frame_sent,
                               dialect=p["dialect"], ping=self._ping)
        self.params = None  # the handshake's, done with (thousands of idle sockets keep their handler)
        # This task reads every frame of the socket, and the inbox worker starts from it: both log with these.
        logs.bind(pipeline=p["pipeline"], session_id=session["_id"], conn_id=self.conn.id)
        self.services.hub.register(self.conn)
        self.services.metrics.connection_opened(self.conn)
        self.protocol = self._protocol()
        self.conn.send(self._connected(session))
        self.services.fanout.join(self.conn, session["_id"], session["type"], session.get("next_seq"))  # after `connected`: presence follows
        self._forget_handshake()

    def _forget_handshake(self):
        """Thousands of idle sockets keep their handler, its request and its HTTP connection for hours: the
        headers (both ways) and query arguments only the handshake needed are emptied in place. Tornado's HTTP
        connection holds the same objects, so dropping our references would free nothing (measured:
        docs/performance.md). Public API only: HTTPHeaders and the argument dicts are mutable mappings."""
        request, headers = self.request, self.request.headers
        for name in list(headers):  # MutableMapping.clear() would build every combined value first: 4x slower
            del headers[name]
        request.arguments.clear()
        request.query_arguments.clear()
        for name in RESPONSE_HEADERS:
            self.clear_header(name)

    # what an embed socket (visitors) does differently

    def _verify(self, token):
        return self.services.auth.verify(token)

    def _admit(self, identity):
        config = self.services.config
        check_capacity(self.services.hub, identity, max_total=config.max_connections,
                       max_per_user=config.max_connections_per_user)

    _admit_session = None  # an embed socket's check before a new conversation is stored

    def _protocol(self):
        return ClientProtocol(self.conn, self.services)

    def _connected(self, session):
        return frames.connected(self.conn, session, live_replies=self.services.streams.live(session["_id"]))

    def _has_credentials(self):
        return "Authorization" in self.request.headers or request_credential(self.request) is not None

    def _auth_timed_out(self):
        self.awaiting_auth = None
        self._refuse(Unauthorized(f"no authenticate frame within {self.services.config.auth_timeout:g} s"))

    def _cancel_auth_timer(self):
        if self.awaiting_auth is not None:
            self.awaiting_auth.cancel()
            self.awaiting_auth = None

    def _write(self, text):
        try:
            return self.write_message(text)
        except websocket.WebSocketClosedError:
            raise ConnectionClosed() from None

    def _close(self, code=None, reason=None):
        """Connection.close: the server ends the socket; remember why, once."""
        if self.closed_by is None and self.ws_connection is not None:
            self._closing(code, reason)
        self.close(code, reason)

    def _closing(self, code, reason):
        if code == Close.NORMAL:
            self.closed_by = "client_request"  # the client's `disconnect` frame
        else:  # parley_ws_disconnects_total{reason}: the close code's (services/wire/codes.py), a ping timeout's
            self.closed_by = PING_TIMEOUT if reason == PING_TIMEOUT else DISCONNECT_FOR_CODE.get(code, "other")
            self.services.metrics.disconnected(self.closed_by)

    def _hold_pending(self, held):
        """Count this socket in hub.pending from open() until it is registered or closed."""
        if held != self.pending:
            self.pending = held
            self.services.hub.pending += 1 if held else -1

    def _ping(self):
        """Connection.ping (services/delivery/keepalive.py): a WebSocket ping, answered by on_pong."""
        try:
            self.ping()
            return True
        except websocket.WebSocketClosedError:
            return False

    def _refuse(self, err):
        """A fatal error at connect: say why in an error frame, then close with a documented code."""
        close = CLOSE_FOR_CODE.get(err.code) or CLOSE_FOR_STATUS.get(err.http_status, Close.UNAVAILABLE)
        self.services.metrics.disconnected(close.disconnect)
        self.closed_by = "refused"
        try:
            self.write_message(schema.encode(frames.error(err)))
        except websocket.WebSocketClosedError:
            return
        self.close(close, err.code)


class EmbedSocket(ChatSocket):
    """A widget's visitor (LangBot's or Parley's): /api/v1/embed/<bot>/ws/connect?session_type=…&session_id=<the
    widget's own random id>. Anonymous (services/access/visitors.py): the API's credentials play no part; a visitor
    token comes in the handshake or, as LangBot's widget sends it, in the `authenticate` frame (`""` when there is
    none). Always LangBot's dialect, and only its frames; `connected` names the bot (`bot_uuid`), never the
    pipeline. A limit refuses with a reply saying why, then closes 1013: never an `error` frame, which LangBot's
    widget takes for a lost connection."""
    embed = True
    visitor_key = None
    bot = None

    def select_subprotocol(self, subprotocols):
        return None  # LangBot's dialect only

    def check_origin(self, origin):
        try:
            _, embed = self.services.visitors.bot(self.path_kwargs.get("bot"))
        except ParleyError:
            return True  # open() refuses it, saying why
        return self.services.visitors.origin_allowed(embed, origin) or super().check_origin(origin)

    def open(self, bot):
        self.set_nodelay(True)
        visitors = self.services.visitors
        try:
            pipeline, embed = visitors.bot(bot)
            self.bot = embed.bot
            self.params = {"pipeline": pipeline.id, "session_id": None, "client_session": "widget",
                           "session_type": check_session_type(self._query("session_type", "person")),
                           "stream_mode": "cumulative", "dialect": frames.LANGBOT}
            self.visitor_key = self._query("session_id", None)
            config = self.services.config
            check_capacity(self.services.hub, None, max_total=config.max_connections, max_per_user=0)
            visitors.check_address(self.request.remote_ip)
            self._hold_pending(True)
            token = bearer_or_query_token(self.request)
            if not token and visitors.needs_token(embed, self.visitor_key):
                self.awaiting_auth = asyncio.get_running_loop().call_later(config.auth_timeout, self._auth_timed_out)
                return
            identity = self._verify(token)
        except ParleyError as err:
            return self._refuse(err)
        return self._start(identity)

    def on_close(self):
        if self.conn is not None:
            self.services.visitors.connection_closed(self.conn.identity, self.conn.remote_ip)
        super().on_close()

    def _verify(self, token):
        return self.services.visitors.identify(self.bot, token, self.visitor_key)

    def _admit(self, identity):
        super()._admit(identity)
        self.services.visitors.admit_connection(identity, self.request.remote_ip)

    async def _admit_session(self):
        await self.services.visitors.admit_session(self.request.remote_ip)

    def _protocol(self):
        return ClientProtocol(self.conn, self.services, kinds=VISITOR_FRAMES,
                              guard=self.services.visitors.before_send)

    def _connected(self, session):
        return frames.embed_connected(self.conn, self.bot)

    def _refuse(self, err):
        if isinstance(err, (Capacity, RateLimited)) and self.params is not None:  # a limit: say why, politely
            self.services.metrics.disconnected(Close.CAPACITY.disconnect)
            self.closed_by = "refused"
            try:
                self.write_message(schema.encode(frames.refusal(err, self.params["session_type"],
                                                                "This chat is not available right now")))
            except websocket.WebSocketClosedError:
                return
            return self.close(Close.CAPACITY, err.code)
        return super()._refuse(err)


VISITOR_FRAMES = frozenset({"message", "stop", "ping", "disconnect", "authenticate"})


default_handlers = [
    (r"/api/v1/pipelines/(?P<pipeline>[^/]+)/ws/connect", ChatSocket),
    (r"/api/v1/embed/(?P<bot>[^/]+)/ws/connect", EmbedSocket),
]
