"""The embed widget's routes, as LangBot's widget calls them, for anonymous visitors (services/access/visitors.py):
history, reset, feedback, the human check, the logo and Parley's own widget script. The WebSocket is
handlers/ws.py EmbedSocket. None of them takes the API's credentials, and a visitor's identity opens no other
route. Pages on the bot's `origins` may call them from the browser (CORS, and cross-origin writes)."""
import json
import os
import secrets

from handlers.base import BaseHandler, api
from parley import resource
from services.access.auth import bearer_or_query_token
from services.access.forwarded import public_origin
from services.conversations.sessions import check_session_type
from services.wire import frames, schema
from services.wire.codes import Code
from services.wire.errors import Forbidden, ParleyError

B = r"/api/v1/embed/(?P<bot>[^/]+)"
STATIC_DIR = str(resource("static"))
DEFAULT_LOGO = os.path.join(STATIC_DIR, "favicon.svg")
LOGO_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"RIFF": "image/webp"}
RATINGS = {1: "like", 2: "dislike", 3: "cancel"}


class EmbedHandler(BaseHandler):
    public = True  # visitors: services/access/visitors.py, not the API's credentials

    def prepare(self):
        self.pipeline = self.embed = None
        bot = self.path_kwargs.get("bot")
        if bot is not None:
            self.pipeline, self.embed = self.services.visitors.bot(bot)
            self._cors_headers()  # initialize() set them before the bot (and its origins) was known
        super().prepare()

    def _cors_origin(self):
        origin = self.request.headers.get("Origin")
        embed = getattr(self, "embed", None)
        if origin and embed is not None and self.services.visitors.origin_allowed(embed, origin):
            return origin
        return super()._cors_origin()

    def _cors_headers(self):
        if getattr(self, "embed", None) is None:
            return super()._cors_headers()
        self.set_header("Vary", "Origin")
        if origin := self._cors_origin():
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", "X-Request-Id")

    def check_trusted_origin(self, origin):
        """Tornado asks before prepare(): the bot is looked up here (an unknown one answers 404 in prepare)."""
        try:
            _, embed = self.services.visitors.bot(self.path_kwargs.get("bot"))
        except ParleyError:
            return True
        return self.services.visitors.origin_allowed(embed, origin) or super().check_trusted_origin(origin)

    def visitor(self):
        key = self.get_query_argument("session_id", None)
        return self.services.visitors.identify(self.path_kwargs["bot"], bearer_or_query_token(self.request), key)

    async def conversation(self, session_type):
        """The visitor's conversation of this type, or None: reading never creates one."""
        return await self.services.sessions.embed_session(self.visitor(), self.pipeline.id,
                                                          check_session_type(session_type), "widget", create=False)


class EmbedHistoryHandler(EmbedHandler):
    """GET …/messages/<session_type>: the visitor's conversation in LangBot's message shape, oldest first. A
    stored image gets a signed link (an <img> in the site's page cannot send credentials)."""

    @api("a widget visitor's conversation, LangBot's message shape (`?session_id=`, or a visitor token)")
    async def get(self, bot, session_type):
        session = await self.conversation(session_type)
        if session is None:
            return self.ok({"messages": [], "next_cursor": None})
        docs, next_cursor = await self.services.history.history_page(
            None, session, limit=self.int_arg("limit", 200, low=1, high=1000),
            cursor=self.get_query_argument("cursor", None))
        base = public_origin(self.request, self.services.config.trusted_proxies)
        messages = []
        for doc in docs:
            data = frames.message_data(doc)
            message = {k: data[k] for k in frames.LANGBOT_FIELDS}
            message["message_chain"] = [self._linked(c, base) for c in message["message_chain"]]
            messages.append(message)
        self.ok({"messages": messages, "next_cursor": next_cursor})

    def _linked(self, component, base):
        if component.get("type") == "Image" and component.get("path"):
            return {**component, "url": self.services.files.link({"_id": component["path"], "kind": "image"}, base)}
        return component


class EmbedResetHandler(EmbedHandler):
    @api("forget a widget visitor's conversation")
    async def post(self, bot, session_type):
        session = await self.conversation(session_type)
        deleted = 0
        if session is not None:
            deleted = (await self.services.history.reset(None, session))["deleted"]
        self.ok({"message": "Session reset successfully", "deleted": deleted})


class EmbedFeedbackHandler(EmbedHandler):
    """POST …/feedback `{"message_id", "feedback_type": 1 like | 2 dislike | 3 cancel}` (LangBot's widget): kept
    on the visitor's reply (`feedback`) and counted. LangBot's widget names no visitor here (no session_id): its
    feedback is counted only (`stored: false`)."""

    @api("a widget's rating of a reply: stored with it when the visitor is known, counted always",
         body=schema.FeedbackBody)
    async def post(self, bot):
        body = self.body()
        rating, message_id = RATINGS[body.feedback_type], body.message_id
        stored = False
        try:
            identity = self.visitor()
        except ParleyError as err:
            if err.code != "visitor_required":
                raise
            identity = None
        if identity is not None:
            session = await self.services.sessions.embed_session(identity, self.pipeline.id, body.session_type,
                                                                 "widget", create=False)
            if session is not None:
                stored = await self.services.store.set_feedback(session["_id"], message_id, rating)
        self.services.metrics.feedback(self.pipeline.id, rating, stored)
        self.ok({"feedback_id": "fb" + secrets.token_hex(6), "stored": stored})


class TurnstileVerifyHandler(EmbedHandler):
    """POST …/turnstile/verify `{"token"}`: a visitor token (`{"token"}`) once the human check passed; without a
    check configured, at once (as LangBot answers)."""

    @api("a visitor token, once the bot's human check (Turnstile) passed; at once without one",
         body=schema.HumanCheckBody)
    async def post(self, bot):
        visitors = self.services.visitors
        human = False
        if self.embed.turnstile_secret_env:
            if not await visitors.verify_human(self.embed, self.body().token, self.request.remote_ip):
                visitors.refused("human_check")
                raise Forbidden("the human check failed; try again", code=Code.HUMAN_CHECK_FAILED)
            human = True
        self.ok({"token": visitors.issue(self.embed, human=human)})


class LogoHandler(EmbedHandler):
    """GET /api/v1/embed/logo (LangBot's widget: one logo) and `?bot=<bot>`: that bot's `logo`, else Parley's."""

    @api("the widget's logo (`?bot=`: that bot's)")
    def get(self):
        bot = self.get_query_argument("bot", None)
        path = DEFAULT_LOGO
        if bot is not None:
            _, embed = self.services.visitors.bot(bot)
            path = embed.logo or DEFAULT_LOGO
        with open(path, "rb") as f:
            data = f.read()
        kind = next((t for magic, t in LOGO_TYPES.items() if data.startswith(magic)), "image/svg+xml")
        self.set_header("Content-Type", kind)
        self.set_header("Cache-Control", "public, max-age=3600")
        self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; sandbox")
        self.set_header("Cross-Origin-Resource-Policy", "cross-origin")
        self.finish(data)


class WidgetScriptHandler(EmbedHandler):
    """GET …/widget.js: Parley's widget (static/widget.js) with the bot's settings; one <script> tag on a page."""
    _script = None  # (mtime, text)

    @api("Parley's widget script for the bot: one <script> tag on a page")
    def get(self, bot):
        embed = self.embed
        config = {"bot": embed.bot, "title": embed.name or self.pipeline.name or "Chat",
                  "logo": f"/api/v1/embed/logo?bot={embed.bot}", "turnstile_site_key": embed.turnstile_site_key,
                  "images": "image" in self.pipeline.inputs}
        settings = json.dumps(config).replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        self.set_header("Content-Type", "application/javascript; charset=utf-8")
        self.set_header("Cache-Control", "public, max-age=300")
        self.set_header("Cross-Origin-Resource-Policy", "cross-origin")
        self.finish(self.script().replace("/*PARLEY_WIDGET_CONFIG*/null", settings, 1))

    @classmethod
    def script(cls):
        path = os.path.join(STATIC_DIR, "widget.js")
        mtime = os.path.getmtime(path)
        if cls._script is None or cls._script[0] != mtime:
            with open(path, encoding="utf-8") as f:
                cls._script = (mtime, f.read())
        return cls._script[1]


default_handlers = [
    (r"/api/v1/embed/logo", LogoHandler),
    (B + r"/widget\.js", WidgetScriptHandler),
    (B + r"/messages/(?P<session_type>[^/]+)", EmbedHistoryHandler),
    (B + r"/reset/(?P<session_type>[^/]+)", EmbedResetHandler),
    (B + r"/feedback", EmbedFeedbackHandler),
    (B + r"/turnstile/verify", TurnstileVerifyHandler),
]
