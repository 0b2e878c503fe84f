"""The WebSocket endpoint: open -> register a Connection, on_message -> ClientProtocol, on_close -> unregister."""
import json
import logging
import time
import uuid

from pymongo.errors import PyMongoError
from tornado import websocket

from services import frames
from services.chat import check_session_type
from services.errors import BadRequest, ParleyError, Unavailable
from services.hub import Connection, ConnectionClosed
from services.protocol import ClientProtocol

log = logging.getLogger(__name__)

STREAM_MODES = ("cumulative", "delta")
# Close codes for errors at connect time (docs/protocol.md).
CLOSE_FOR_STATUS = {400: 4400, 403: 4403, 404: 4404, 503: 1011}


class ChatSocket(websocket.WebSocketHandler):
    def initialize(self, services):
        self.services = services
        self.conn = None
        self.protocol = None

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
        self.conn = Connection(uuid.uuid4().hex, identity=identity, pipeline=pipeline,
                               session_type=session["type"], stream_mode=stream_mode, write=self._write,
                               close=self.close, remote_ip=self.request.remote_ip)
        self.services.hub.register(self.conn)
        self.services.hub.join(self.conn, session["_id"])
        self.protocol = ClientProtocol(self.conn, chat, self.services.resumer)
        self.conn.send({"type": "connected", "connection_id": self.conn.id, "pipeline_uuid": pipeline,
                        "session_type": session["type"], "session_id": session["_id"],
                        "stream_mode": stream_mode, "user_id": identity.user_id, "protocol": "parley/1",
                        "timestamp": frames.timestamp()})

    def on_message(self, message):
        if self.protocol is not None:
            self.conn.last_active = time.time()
            self.protocol.receive(message)

    def on_close(self):
        if self.protocol is not None:
            self.protocol.shutdown()
        if self.conn is not None:
            self.services.chat.disconnect(self.conn)

    def _write(self, frame):
        try:
            self.write_message(json.dumps(frame, ensure_ascii=False))
        except websocket.WebSocketClosedError:
            raise ConnectionClosed() from None

    def _refuse(self, err):
        """A fatal error at connect: say why in an error frame, then close with a documented code."""
        try:
            self.write_message(json.dumps(frames.error(err), ensure_ascii=False))
        except websocket.WebSocketClosedError:
            return
        self.close(CLOSE_FOR_STATUS.get(err.http_status, 1011), err.code)


default_handlers = [
    (r"/api/v1/pipelines/(?P<pipeline>[^/]+)/ws/connect", ChatSocket),
]
