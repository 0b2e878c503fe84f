"""REST: the LangBot-compatible /ws/* routes and Parley's native sessions API.

Each method declares itself with @api (summary, body, status, admin): with `default_handlers` below, that is the
one declaration GET /openapi.json is generated from.
"""
from datetime import datetime, timezone

import msgspec

from handlers.base import BaseHandler, api
from services.access.auth import COOKIE, bearer_or_query_token
from services.conversations.sessions import check_session_type
from services.storage import paging
from services.wire import frames, schema
from services.wire.codes import Code
from services.wire.errors import BadRequest
from services.wire.schema import check_id

P = r"/api/v1/pipelines/(?P<pipeline>[^/]+)"
S = P + r"/sessions/(?P<session_id>[^/]+)"


def session_data(doc):
    return {"session_id": doc["_id"], "pipeline": doc["pipeline"], "session_type": doc["type"],
            "owner": doc["owner"], "members": doc.get("members", []), "title": doc.get("title", ""),
            "last_seq": doc.get("next_seq", 0), "created_at": frames.timestamp(doc["created_at"]),
            "updated_at": frames.timestamp(doc["updated_at"])}


def limits(config):
    """What a client needs to size what it sends (the web app shrinks images to fit)."""
    return {"max_message_size": config.max_message_size, "max_body_size": config.max_body_size,
            "max_image_size": config.max_image_size}


class RootHandler(BaseHandler):
    """What a person opening the printed URL sees: the server, its pipelines and where to connect.
    A browser asking for HTML gets the web app on the same URL instead (handlers/web.py)."""

    @api("the server, its pipelines and where to connect")
    def get(self):
        self.ok({"name": "Parley", "protocol": "parley/1", "user_id": self.identity.user_id,
                 "websocket": "/api/v1/pipelines/<pipeline>/ws/connect?session_type=person",
                 "pipelines": [p.public() for p in self.services.pipelines],
                 "limits": limits(self.services.config), "docs": "docs/protocol.md"})


class OpenAPIHandler(BaseHandler):
    """The REST API as OpenAPI 3.1, generated from the routes below and their @api declarations (the WebSocket:
    docs/asyncapi.yaml)."""
    document = None

    @api("this API as OpenAPI 3.1")
    def get(self):
        if OpenAPIHandler.document is None:
            OpenAPIHandler.document = msgspec.json.encode(schema.openapi(rest_routes()))
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(OpenAPIHandler.document)


class AuthCookieHandler(BaseHandler):
    """The web app's sign-in (Jupyter's pattern): POST with a Bearer credential sets an HttpOnly, SameSite=Strict
    cookie holding it, so every tab of this browser is signed in; DELETE (Sign out) clears it. The cookie is
    verified like a Bearer credential on every request; Tornado's cross-origin write protection and the
    WebSocket origin check keep other sites from using it."""
    public = True  # DELETE needs none: signing out always works (POST identifies the caller itself)

    @api("sign this browser in: an HttpOnly cookie holding the Bearer credential")
    def post(self):
        identity = self.identity = self.services.auth.identify(self.request)
        expires = None if identity.expires_at is None else datetime.fromtimestamp(identity.expires_at, timezone.utc)
        credential = bearer_or_query_token(self.request)
        if credential:  # (none: --auth none, or signed in by this cookie already)
            self.set_cookie(COOKIE, credential, path="/", expires=expires, httponly=True, samesite="Strict",
                            secure=self.request.protocol == "https")
        self.ok({"user_id": identity.user_id, "is_admin": identity.is_admin,
                 "expires_at": expires and frames.timestamp(expires)})

    @api("sign this browser out: clear the cookie")
    def delete(self):
        self.clear_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                          secure=self.request.protocol == "https")
        self.ok({"signed_out": True})


class PipelinesHandler(BaseHandler):
    @api("the pipelines")
    def get(self):
        self.ok({"pipelines": [p.public() for p in self.services.pipelines]})


# LangBot-compatible: the implicit per-user session of a pipeline and session type.

class LegacyHistoryHandler(BaseHandler):
    @api("LangBot: history of the implicit session")
    async def get(self, pipeline, session_type):
        session = await self.services.sessions.default_session(self.identity, pipeline,
                                                               check_session_type(session_type))
        limit = self.int_arg("limit", 200, low=1, high=1000)
        docs, next_cursor = await self.services.history.history_page(self.identity, session, limit=limit,
                                                                     cursor=self.get_query_argument("cursor", None))
        self.ok({"session_id": session["_id"], "messages": [frames.message_data(d) for d in docs],
                 "next_cursor": next_cursor})


class LegacyResetHandler(BaseHandler):
    @api("LangBot: reset the implicit session")
    async def post(self, pipeline, session_type):
        session = await self.services.sessions.default_session(self.identity, pipeline,
                                                               check_session_type(session_type))
        result = await self.services.history.reset(self.identity, session)
        self.ok({"message": "Session reset successfully", "session_id": session["_id"], **result})


class LegacyConnectionsHandler(BaseHandler):
    @api("LangBot: connections of a pipeline", admin=True)
    def get(self, pipeline):
        self.services.pipelines.get(pipeline)
        conns, stats = self.services.hub.stats(pipeline)
        conns, next_cursor = paging.in_memory(conns, self.int_arg("limit", 1000, low=1, high=10_000),
                                              f"connections:{pipeline}", self.get_query_argument("cursor", None),
                                              key=lambda c: c.id)
        self.ok({"stats": stats, "next_cursor": next_cursor, "connections": [{
            "connection_id": c.id, "session_type": c.session_type, "session_ids": sorted(c.sessions),
            "user_id": c.user_id, "stream_mode": c.stream_mode, "remote_ip": c.remote_ip,
            "created_at": frames.timestamp_from_epoch(c.created_at),
            "last_active": frames.timestamp_from_epoch(c.last_active), "is_active": not c.closed,
        } for c in conns]})


class LegacyBroadcastHandler(BaseHandler):
    """LangBot's broadcast to every connection of a pipeline (admin only)."""

    @api("LangBot: broadcast to a pipeline's connections", body=schema.BroadcastBody, admin=True)
    def post(self, pipeline):
        self.services.pipelines.get(pipeline)
        delivered = self.services.announcements.broadcast(self.body().message, pipeline)
        self.ok({"message": "Broadcast sent successfully", "delivered": delivered})


class BroadcastHandler(BaseHandler):
    """Broadcast to every connection of every pipeline (admin only)."""

    @api("broadcast to every connection", body=schema.BroadcastBody, admin=True)
    def post(self):
        delivered = self.services.announcements.broadcast(self.body().message)
        self.ok({"message": "Broadcast sent successfully", "delivered": delivered})


class PushHandler(BaseHandler):
    """Push a message to every connection (every tab and device) of one user (admin only)."""

    @api("push to every connection of a user", body=schema.PushBody, admin=True)
    def post(self, user_id):
        body = self.body()
        delivered = self.services.announcements.push(check_id(user_id, "user_id"), body.message, body.data)
        self.ok({"user_id": user_id, "delivered": delivered})


# Native sessions API.

class SessionsHandler(BaseHandler):
    @api("the caller's sessions")
    async def get(self, pipeline):
        docs, next_cursor = await self.services.sessions.list_sessions(
            self.identity, pipeline, limit=self.int_arg("limit", 100, low=1, high=500),
            cursor=self.get_query_argument("cursor", None))
        self.ok({"sessions": [session_data(d) for d in docs], "next_cursor": next_cursor})

    @api("create a session", body=schema.SessionCreate, status=201)
    async def post(self, pipeline):
        body = self.body()
        doc = await self.services.sessions.create_session(
            self.identity, pipeline, session_type=body.session_type, title=body.title, members=body.members)
        self.ok(session_data(doc))


class SessionHandler(BaseHandler):
    @api("one session")
    async def get(self, pipeline, session_id):
        self.ok(session_data(await self.services.sessions.session(self.identity, pipeline, session_id)))

    @api("rename a session", body=schema.SessionRename)
    async def patch(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        self.ok(session_data(await self.services.sessions.rename(self.identity, session, self.body().title)))


class MembersHandler(BaseHandler):
    @api("a group's members, paged")
    async def get(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        members, next_cursor = paging.in_memory(session.get("members", []),
                                                self.int_arg("limit", 100, low=1, high=1000),
                                                f"members:{session['_id']}", self.get_query_argument("cursor", None))
        self.ok({"session_id": session["_id"], "members": members, "next_cursor": next_cursor})

    @api("add or remove group members (owner)", body=schema.MembersChange)
    async def post(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        body = self.body()
        doc = await self.services.sessions.change_members(self.identity, session, add=body.add, remove=body.remove)
        self.ok(session_data(doc))


class LeaveHandler(BaseHandler):
    """A member leaves a group session (and stops viewing it on every connection)."""

    @api("leave a group session (a member, not its owner)")
    async def post(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        doc = await self.services.sessions.leave_group(self.identity, session)
        self.ok({"session_id": doc["_id"], "left": True})


class MessagesHandler(BaseHandler):
    @api("history, paged by seq")
    async def get(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        after_seq = self.int_arg("after_seq", 0, low=0, high=2**53)
        limit = self.int_arg("limit", 50, low=1, high=500)
        docs, next_cursor = await self.services.history.history_page(
            self.identity, session, after_seq=after_seq, limit=limit, cursor=self.get_query_argument("cursor", None))
        next_after = docs[-1]["seq"] if docs else after_seq
        self.ok({"session_id": session["_id"], "messages": [frames.message_data(d) for d in docs],
                 "next_after_seq": next_after, "has_more": next_cursor is not None, "next_cursor": next_cursor})

    @api("send a message (Idempotency-Key header)", body=schema.MessageSend, status=202)
    async def post(self, pipeline, session_id):
        """Send as a bot would: the reply streams to the session's viewers; poll history for the result."""
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        body = self.body()
        key = self.request.headers.get("Idempotency-Key")
        if key is not None and body.client_msg_id not in (None, key):
            raise BadRequest("Idempotency-Key and client_msg_id differ", code=Code.INVALID_PARAM)
        user_doc, reply_doc, duplicate = await self.services.sending.send(
            self.identity, session, body.message, stream=body.stream, client_msg_id=body.client_msg_id or key)
        self.ok(frames.ack_data(user_doc, reply_doc, duplicate), status=200 if duplicate else None)


class RegenerateHandler(BaseHandler):
    """A new reply to the question the session's latest reply answered, replacing it (kept as a version)."""

    @api("a new reply replacing the session's latest one", body=schema.RegenerateBody, status=202)
    async def post(self, pipeline, session_id, message_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        user_doc, reply_doc = await self.services.sending.regenerate(self.identity, session, message_id,
                                                                     stream=self.body().stream)
        self.ok(frames.ack_data(user_doc, reply_doc, False))


class StopHandler(BaseHandler):
    @api("stop a reply, or every reply", body=schema.StopBody)
    async def post(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        stopped = self.services.sending.stop(self.identity, session["_id"], self.body().message_id)
        self.ok(frames.stop_ack(session["_id"], stopped).data)


class ResetHandler(BaseHandler):
    @api("stop and forget the session's messages")
    async def post(self, pipeline, session_id):
        session = await self.services.sessions.session(self.identity, pipeline, session_id)
        self.ok({"session_id": session["_id"], **await self.services.history.reset(self.identity, session)})


default_handlers = [
    (r"/", RootHandler),
    (r"/api/v1/pipelines", PipelinesHandler),
    (r"/api/v1/auth/cookie", AuthCookieHandler),
    (r"/openapi.json", OpenAPIHandler),
    (P + r"/ws/messages/(?P<session_type>[^/]+)", LegacyHistoryHandler),
    (P + r"/ws/reset/(?P<session_type>[^/]+)", LegacyResetHandler),
    (P + r"/ws/connections", LegacyConnectionsHandler),
    (P + r"/ws/broadcast", LegacyBroadcastHandler),
    (r"/api/v1/broadcast", BroadcastHandler),
    (r"/api/v1/users/(?P<user_id>[^/]+)/push", PushHandler),
    (P + r"/sessions", SessionsHandler),
    (S, SessionHandler),
    (S + r"/members", MembersHandler),
    (S + r"/leave", LeaveHandler),
    (S + r"/messages", MessagesHandler),
    (S + r"/messages/(?P<message_id>[^/]+)/regenerate", RegenerateHandler),
    (S + r"/stop", StopHandler),
    (S + r"/reset", ResetHandler),
]


def rest_routes():
    """Every REST route list whose methods declare themselves with @api (what /openapi.json documents)."""
    from handlers import embed, files
    return default_handlers + files.default_handlers + embed.default_handlers
