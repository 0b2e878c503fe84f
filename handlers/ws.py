"""The WebSocket endpoint: authenticate -> register a Connection, on_message -> ClientProtocol, on_close -> unregister.

Nothing is registered before authentication succeeds: a client without credentials in the handshake has
--auth-timeout seconds (10) to send `{"type": "authenticate", "token": ...}` as its first frame. Such a socket
counts against --max-connections from the moment it opens. A socket whose token expires (JWT `exp`) gets
`reconnect` and close 4401, so its client refreshes the token and resumes.

Only Tornado's public API tells us why a socket ended: our own ping timer (ping/on_pong) finds dead peers,
`close_code` says how the peer closed. ParleyProtocol (see there) adds close 1007 and notices the peer's close frame.
"""
import asyncio
import json
import logging
import time
import uuid
from urllib.parse import urlparse

from pymongo.errors import PyMongoError
from tornado import web, websocket

from services import frames, guards, logs
from services.chat import check_session_type
from services.forwarded import client_address
from services.errors import BadRequest, Capacity, ParleyError, Unauthorized, Unavailable
from services.hub import Connection, ConnectionClosed
from services.limits import CLOSE_CAPACITY, check_capacity
from services.outbox import CLOSE_SLOW_CONSUMER
from services.protocol import ClientProtocol
from services.schema import AuthenticateFrame, decode_frame

log = logging.getLogger(__name__)

STREAM_MODES = ("cumulative", "delta")
# Close codes for errors at connect time (docs/protocol.md).
CLOSE_FOR_STATUS = {400: 4400, 401: 4401, 403: 4403, 404: 4404, 503: 1011}
CLOSE_FOR_CODE = {"capacity": CLOSE_CAPACITY}
# Server-initiated close code -> parley_ws_disconnects_total{reason}. 1000 is the client's own `disconnect`.
DISCONNECT_FOR_CODE = {1001: "shutdown", 1012: "shutdown", 1008: "auth", 4401: "auth", 4403: "auth", 1009: "oversize",
                       CLOSE_CAPACITY: "capacity", 1011: "unavailable", 4400: "invalid", 4404: "invalid",
                       CLOSE_SLOW_CONSUMER: "slow", 1007: "invalid"}
CLOSE_PING_TIMEOUT = 1011  # the peer never sees it (it stopped answering); the metric says ping_timeout
CLOSE_INVALID_UTF8 = 1007
HARD_CAP_FACTOR = 4  # frames up to 4x --max-message-size are read whole and refused with a clean 1009


class ParleyProtocol(websocket.WebSocketProtocol13):
    """Tornado's RFC 6455 protocol with two additions, both pinned by tests so a Tornado upgrade that changes
    them fails loudly:
    - Tornado (6.6) drops a connection whose text frame is not UTF-8 without a close frame; RFC 6455 8.1 says
      close with 1007. There is no public hook for it, so the (long-stable) message dispatch is overridden.
    - `close()` (public) is where every close passes: the peer's close frame being answered
      (`client_terminated`; a client's close without a code and a lost connection both leave `close_code`
      None), and Tornado's own 1009 for an oversize frame (after which it aborts, so no code reaches on_close).
    """

    def close(self, code=None, reason=None):
        if not self.server_terminated:
            self.handler.closing(code, reason, by_peer=self.client_terminated)
        super().close(code, reason)

    def _handle_message(self, opcode, data):
        if opcode == 0x1:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.handler.invalid_utf8()
                return None
        return super()._handle_message(opcode, data)


class ChatSocket(websocket.WebSocketHandler):
    embed = False  # EmbedSocket: `session_id` is the widget's own browser-session id, not a Parley session

    def initialize(self, services):
        self.services = services
        self.conn = None
        self.protocol = None
        self.awaiting_auth = None  # the timer while we wait for an `authenticate` frame
        self.closed_by = None  # who ended this socket and why (see _close); None: the connection was lost
        self.pending = False  # counted in hub.pending (open, not registered yet)
        self.timers = []  # the token expiry, cancelled on close
        self.pinger = None
        self.pong_check = None
        self.ping_sent_at = None  # loop time of the ping still unanswered

    def prepare(self):
        self.request.remote_ip = client_address(self.request, self.services.config.trusted_proxies)
        self.set_header("X-Parley-Instance", self.services.instance_id)  # sent with the 101 handshake answer
        rid = logs.request_id(self.request.headers.get("X-Request-Id"))
        self.set_header("X-Request-Id", rid)
        logs.bind(request_id=rid)  # on every line of this socket's life, with its conn_id once registered
        if self.services.draining:  # behind nginx, the handshake is retried on another instance
            self.set_status(503)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"code": "draining", "message": "this server is restarting; connect again"}))
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
        self.finish(json.dumps({"code": "invalid_request" if status_code < 500 else "internal_error",
                                "message": self._reason}))

    def get_websocket_protocol(self):
        if self.request.headers.get("Sec-WebSocket-Version") != "13":
            return None  # Tornado answers 426 with the version it speaks
        # Tornado's own pinger stays off (ours is _ping below). Its size limit is a hard cap above ours: Tornado
        # aborts at the frame header with the payload unread, so the peer may get a reset and lose the 1009;
        # on_message reads the whole frame first and closes cleanly (1009) up to the cap.
        params = websocket._WebSocketParams(
            ping_interval=None, ping_timeout=None, max_message_size=HARD_CAP_FACTOR * self.max_message_size,
            compression_options=self.get_compression_options())
        return ParleyProtocol(self, False, params)

    def closing(self, code, reason, *, by_peer):
        """ParleyProtocol.close: a close the handler did not start (it records its own in _close)."""
        if self.closed_by is None:
            if by_peer:
                self.closed_by = "client_request"
            elif code == 1009:
                self._closing(code, reason)

    def invalid_utf8(self):
        self._close(CLOSE_INVALID_UTF8, "invalid_utf8")

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
            raise BadRequest(f"{name} is not valid UTF-8", code="invalid_param") from None

    async def open(self, pipeline):
        # Frames often go out back to back (ack then the first token, stop_ack then the final): without this the
        # second waits for the peer's delayed ACK (~40 ms).
        self.set_nodelay(True)
        try:
            self.services.pipelines.get(pipeline)
            self.params = {"pipeline": pipeline,
                           "session_type": check_session_type(self._query("session_type", "person")),
                           "stream_mode": self._query("stream_mode", "cumulative"),
                           "session_id": self._query("session_id", None), "client_session": None}
            if self.embed:
                self.params["client_session"] = self.params.pop("session_id") or "default"
                self.params["session_id"] = None
            if self.params["stream_mode"] not in STREAM_MODES:
                raise BadRequest("stream_mode must be cumulative or delta", code="invalid_param")
            self.params["dialect"] = self._dialect()
            if self.params["dialect"] == frames.LANGBOT:
                self.params["stream_mode"] = "cumulative"  # LangBot streams the whole text so far
            config = self.services.config
            check_capacity(self.services.hub, None, max_total=config.max_connections,
                           max_per_user=config.max_connections_per_user)
            self._hold_pending(True)
            self._start_pinger()
            auth = self.services.auth
            if auth.requires_credentials and not self._has_credentials():
                self.awaiting_auth = asyncio.get_running_loop().call_later(
                    self.services.config.auth_timeout, self._auth_timed_out)
                return
            identity = auth.identify(self.request)
        except ParleyError as err:
            return self._refuse(err)
        await self._start(identity)

    async def on_message(self, message):
        limit = self.services.config.max_message_size
        if len(message) > limit // 4 and len(message.encode("utf-8", "surrogatepass") if isinstance(message, str)
                                            else message) > limit:
            return self._close(1009, "message_too_big")
        if self.protocol is not None:
            self.conn.last_active = time.time()
            # never awaits: ping and stop are heard during a reply
            self.services.metrics.frame_received(self.protocol.receive(message))
        elif self.awaiting_auth is not None:
            await self._authenticate(message)

    def on_close(self):
        self._cancel_auth_timer()
        self._hold_pending(False)
        for timer in self.timers:
            timer.cancel()
        if self.pinger is not None:
            self.pinger.cancel()
            if self.pong_check is not None:
                self.pong_check.cancel()
        if self.protocol is not None:
            self.protocol.shutdown()
        if self.conn is not None:
            self.services.chat.disconnect(self.conn)  # unregisters; may stop replies (--on-last-viewer-gone)
            ended_by = {None: "lost", "client_request": "client"}.get(self.closed_by, "server")
            self.services.metrics.connection_closed(self.conn, ended_by)

    async def _authenticate(self, message):
        self._cancel_auth_timer()
        try:
            frame = decode_frame(message)
            if not isinstance(frame, AuthenticateFrame):
                raise Unauthorized("authenticate first: {\"type\": \"authenticate\", \"token\": ...}")
            identity = self.services.auth.verify(frame.token)
        except ParleyError as err:
            return self._refuse(err if isinstance(err, Unauthorized) else Unauthorized(err.message))
        await self._start(identity)

    async def _start(self, identity):
        p = self.params
        chat = self.services.chat
        try:
            if p["client_session"] is not None:
                session = await chat.embed_session(identity, p["pipeline"], p["session_type"], p["client_session"],
                                                   viewed_ok=True)
            elif p["session_id"] is None:  # another tab of a viewed session: no store round trip (chat._viewed)
                session = await chat.default_session(identity, p["pipeline"], p["session_type"], viewed_ok=True)
            else:
                session = await chat.session(identity, p["pipeline"], p["session_id"])
        except PyMongoError as exc:
            log.error("store error on connect: %s", exc)
            return self._refuse(Unavailable("the message store is unavailable, try again"))
        except ParleyError as err:
            return self._refuse(err)
        if self.ws_connection is None:  # the client left while we looked the session up
            return
        config = self.services.config
        self._hold_pending(False)
        try:
            check_capacity(self.services.hub, identity, max_total=config.max_connections,
                           max_per_user=config.max_connections_per_user)
        except Capacity as err:
            return self._refuse(err)
        if identity.expires_at is not None:
            self.timers.append(asyncio.get_running_loop().call_later(
                max(0.0, identity.expires_at - time.time()), self._token_expired))
        self.conn = Connection(uuid.uuid4().hex, identity=identity, pipeline=p["pipeline"],
                               session_type=session["type"], stream_mode=p["stream_mode"], write=self._write,
                               close=self._close, remote_ip=self.request.remote_ip,
                               outbox_limit=config.outbox_limit, on_sent=self.services.metrics.frame_sent,
                               dialect=p["dialect"])
        self.params = None  # the handshake's, done with (thousands of idle sockets keep their handler)
        # This task reads every frame of the socket, and the inbox worker starts from it: both log with these.
        logs.bind(pipeline=p["pipeline"], session_id=session["_id"], conn_id=self.conn.id)
        self.services.hub.register(self.conn)
        self.services.metrics.connection_opened(self.conn)
        self.protocol = ClientProtocol(self.conn, chat, self.services.resumer)
        self.conn.send(frames.connected(self.conn, session,
                                        live_replies=self.services.streams.live(session["_id"])))
        self.services.fanout.join(self.conn, session["_id"], session["type"], session.get("next_seq"))  # after `connected`: presence follows

    def _has_credentials(self):
        return "Authorization" in self.request.headers or "token" in self.request.query_arguments

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
        if code == 1000:
            self.closed_by = "client_request"  # the client's `disconnect` frame
        else:
            self.closed_by = DISCONNECT_FOR_CODE.get(code, "other")
            self.services.metrics.disconnected(self.closed_by)

    def _hold_pending(self, held):
        """Count this socket in hub.pending from open() until it is registered or closed."""
        if held != self.pending:
            self.pending = held
            self.services.hub.pending += 1 if held else -1

    def _token_expired(self):
        """The client refreshes its token and reconnects (then `resume`s): say so before closing."""
        if self.conn is not None:
            self.conn.send({"type": "reconnect", "reason": "token_expired", "timestamp": frames.timestamp()})
        self._close(4401, "token_expired")

    def _start_pinger(self):
        interval = self.services.config.ping_interval
        if interval and interval > 0:  # a timer handle re-armed each time: a PeriodicCallback costs ~0.3 KB more
            self.pinger = asyncio.get_running_loop().call_later(interval, self._ping)

    def _ping(self):
        """WebSocket-level ping (public API); a peer that has not answered within --ping-timeout is dead."""
        config = self.services.config
        loop = asyncio.get_running_loop()
        self.pinger = loop.call_later(config.ping_interval, self._ping)
        if self.ping_sent_at is not None:
            return  # the timeout check of the ping in flight decides
        try:
            self.ping()
        except websocket.WebSocketClosedError:
            return
        self.ping_sent_at = loop.time()
        self.pong_check = loop.call_later(config.ping_timeout or config.ping_interval, self._check_pong)

    def on_pong(self, data):
        self.ping_sent_at = None

    def _check_pong(self):
        if self.ping_sent_at is not None and self.ws_connection is not None:
            self.closed_by = "ping_timeout"
            self.services.metrics.disconnected("ping_timeout")
            self.close(CLOSE_PING_TIMEOUT, "ping_timeout")

    def _refuse(self, err):
        """A fatal error at connect: say why in an error frame, then close with a documented code."""
        self.services.metrics.disconnected(
            {401: "auth", 403: "auth", 503: "unavailable"}.get(err.http_status, "invalid"))
        self.closed_by = "refused"
        try:
            self.write_message(json.dumps(frames.error(err), ensure_ascii=False))
        except websocket.WebSocketClosedError:
            return
        self.close(CLOSE_FOR_CODE.get(err.code) or CLOSE_FOR_STATUS.get(err.http_status, 1011), err.code)


class EmbedSocket(ChatSocket):
    """LangBot's embed widget: /api/v1/embed/<bot>/ws/connect?session_type=…&session_id=<browser session>.
    `bot` names a pipeline (its `embed` field, or its id); each browser session is its own Parley session."""
    embed = True

    async def open(self, bot):
        try:
            pipeline = self.services.pipelines.for_embed(bot).id
        except ParleyError as err:
            return self._refuse(err)
        await super().open(pipeline)


default_handlers = [
    (r"/api/v1/pipelines/(?P<pipeline>[^/]+)/ws/connect", ChatSocket),
    (r"/api/v1/embed/(?P<bot>[^/]+)/ws/connect", EmbedSocket),
]
