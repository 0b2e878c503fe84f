"""The WebSocket endpoint: open -> register a Connection, on_message -> ClientProtocol, on_close -> unregister."""
import json
import logging
import time
import uuid

from pymongo.errors import PyMongoError
from tornado import websocket

from services import frames, logs
from services.chat import check_session_type
from services.errors import BadRequest, ParleyError, Unavailable
from services.hub import Connection, ConnectionClosed
from services.protocol import ClientProtocol

log = logging.getLogger(__name__)

STREAM_MODES = ("cumulative", "delta")
# Close codes for errors at connect time (docs/protocol.md).
CLOSE_FOR_STATUS = {400: 4400, 403: 4403, 404: 4404, 503: 1011}
# Server-initiated close code -> parley_ws_disconnects_total{reason}. 1000 is the client's own `disconnect`.
DISCONNECT_FOR_CODE = {1001: "shutdown", 1008: "auth", 4401: "auth", 4403: "auth", 1009: "oversize",
                       1013: "capacity", 1011: "unavailable", 4400: "invalid", 4404: "invalid"}


class ChatSocket(websocket.WebSocketHandler):
    def initialize(self, services):
        self.services = services
        self.conn = None
        self.protocol = None
        self.closed_by = None  # who ended this socket and why (see _close); None: the connection was lost

    def check_origin(self, origin):
        return True  # issue "Connections and security" adds the allow-list

    async def open(self, pipeline):
        try:
            session_type = check_session_type(self.get_query_argument("session_type", "person"))
            stream_mode = self.get_query_argument("stream_mode", "cumulative")
            if stream_mode not in STREAM_MODES:
                raise BadRequest("stream_mode must be cumulative or delta", code="invalid_param")
            identity = self.services.auth.identify(self.request)
            chat = self.services.chat
            session_id = self.get_query_argument("session_id", None)
            if session_id is None:
                session = await chat.default_session(identity, pipeline, session_type)
            else:
                session = await chat.session(identity, pipeline, session_id)
        except PyMongoError as exc:
            log.error("store error on connect: %s", exc)
            return self._refuse(Unavailable("the message store is unavailable, try again"))
        except ParleyError as err:
            return self._refuse(err)
        if self.ws_connection is None:  # the client left while we looked the session up
            return
        self._watch_tornado_close()
        self.conn = Connection(uuid.uuid4().hex, identity=identity, pipeline=pipeline,
                               session_type=session["type"], stream_mode=stream_mode, write=self._write,
                               close=self._close, remote_ip=self.request.remote_ip)
        # This task reads every frame of the socket, and the inbox worker starts from it: both log with these.
        logs.bind(pipeline=pipeline, session_id=session["_id"], conn_id=self.conn.id)
        self.services.hub.register(self.conn)
        self.services.metrics.connection_opened(self.conn)
        self.services.hub.join(self.conn, session["_id"])
        self.protocol = ClientProtocol(self.conn, chat)
        self.conn.send({"type": "connected", "connection_id": self.conn.id, "pipeline_uuid": pipeline,
                        "session_type": session["type"], "session_id": session["_id"],
                        "stream_mode": stream_mode, "user_id": identity.user_id, "protocol": "parley/1",
                        "timestamp": frames.timestamp()})

    def on_message(self, message):
        if self.protocol is not None:
            self.conn.last_active = time.time()
            self.services.metrics.frame_received(self.protocol.receive(message))

    def on_close(self):
        if self.protocol is not None:
            self.protocol.shutdown()
        if self.conn is not None:
            self.services.hub.unregister(self.conn)
            ended_by = {None: "lost", "client_request": "client"}.get(self.closed_by, "server")
            self.services.metrics.connection_closed(self.conn, ended_by)

    def _write(self, frame):
        text = json.dumps(frame, ensure_ascii=False)
        try:
            self.write_message(text)
        except websocket.WebSocketClosedError:
            raise ConnectionClosed() from None
        self.services.metrics.frame_sent(frame.get("type"), len(text) if text.isascii() else len(text.encode()))

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

    def _watch_tornado_close(self):
        """Tornado closes a socket itself on a ping timeout or an oversize frame, without telling the handler
        why; its protocol's close() is the one place that knows, so count the reason there."""
        protocol = self.ws_connection
        tornado_close = protocol.close

        def close(code=None, reason=None):
            if self.closed_by is None:
                if protocol.client_terminated and code != 1009:  # answering the client's close frame
                    self.closed_by = "client_request"
                elif reason == "ping timed out":
                    self.closed_by = "ping_timeout"
                    self.services.metrics.disconnected("ping_timeout")
                elif code == 1009 and not protocol.client_terminated:
                    self._closing(code, reason)
            tornado_close(code, reason)

        protocol.close = close

    def _refuse(self, err):
        """A fatal error at connect: say why in an error frame, then close with a documented code."""
        self.services.metrics.disconnected(
            {401: "auth", 403: "auth", 503: "unavailable"}.get(err.http_status, "invalid"))
        try:
            self.write_message(json.dumps(frames.error(err), ensure_ascii=False))
        except websocket.WebSocketClosedError:
            return
        self.close(CLOSE_FOR_STATUS.get(err.http_status, 1011), err.code)


default_handlers = [
    (r"/api/v1/pipelines/(?P<pipeline>[^/]+)/ws/connect", ChatSocket),
]
