"""Anonymous visitors of the sites that embed a pipeline's chat (docs/security.md, "Widget visitors").

A visitor is whoever holds a conversation key: the random `session_id` a widget keeps in the browser (LangBot's
widget: sessionStorage, Parley's: localStorage) and sends with every request, or, for a client that sends none,
the random id inside a visitor token. The key never leaves the visitor's browser and this server: a visitor's
user id is an HMAC of it, so logs and lists never show it. With a human check configured (Turnstile) a request
also needs a visitor token, which `POST /api/v1/embed/<bot>/turnstile/verify` issues once the check passed. A
visitor's identity reaches only its bot's embed routes: it is never a token the rest of the API accepts.

Limits (per instance; behind nginx's ip_hash an address stays on one): messages per visitor and per address,
connections per visitor and per address, new conversations per address, and a cap on stored visitor
conversations, which expire after --visitor-session-ttl of disuse (`sweep`). Refusals reach a widget as a reply
with the reason, never as an `error` frame (LangBot's widget takes any for a lost connection).
"""
import asyncio
import json
import logging
import re
import secrets
import time
import urllib.parse

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from services.access.auth import Identity
from services.access.limits import RateLimiter
from services.wire.codes import Code
from services.wire.errors import BadRequest, Capacity, NotFound, RateLimited, Unauthorized, Unavailable

log = logging.getLogger(__name__)

PURPOSE = "visitor"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # a widget's session id: at least 96 bits if random
VERIFY_TIMEOUT = 10.0
COUNT_EVERY = 10.0   # seconds a count of stored visitor sessions is trusted (new ones are added to it)
SWEEP_BATCH = 200


class Visitors:
    def __init__(self, signer, pipelines, store, config, *, metrics=None, clock=time.monotonic):
        self.signer = signer
        self.pipelines = pipelines
        self.store = store
        self.metrics = metrics
        self.token_ttl = config.visitor_token_ttl
        self.session_ttl = config.visitor_session_ttl
        self.max_sessions = config.max_visitor_sessions
        self.max_connections = config.visitor_connections
        self.max_address_connections = config.visitor_connections_per_address
        per_minute = lambda n: n / 60.0  # noqa: E731
        self.sends = RateLimiter(per_minute(config.visitor_messages_per_minute),
                                 max(1, config.visitor_messages_per_minute // 4 or 1), clock)
        self.address_sends = RateLimiter(per_minute(config.visitor_address_messages_per_minute),
                                         max(1, config.visitor_address_messages_per_minute // 4 or 1), clock)
        self.address_sessions = RateLimiter(config.visitor_sessions_per_address / 3600.0,
                                            max(1, config.visitor_sessions_per_address), clock)
        self.by_address = {}     # remote address -> visitor connections open here
        self.by_visitor = {}     # visitor user id -> connections open here
        self._count = None       # (stored visitor sessions, monotonic time read)
        self._sweeper = None

    # who

    def bot(self, bot_id):
        """(pipeline, its embed settings) for an embeddable bot id; bot_not_found for any other (a pipeline's own
        id is not a bot id: visitors never learn or use one)."""
        pipeline = self.pipelines.for_embed(bot_id)
        if pipeline is None:
            raise NotFound("no such chat", code=Code.BOT_NOT_FOUND)
        return pipeline, pipeline.embed

    def needs_token(self, embed, key):
        return bool(embed.turnstile_secret_env) or not key

    def identify(self, bot_id, token, key):
        """The visitor a request or socket speaks for. `token`: a visitor token (or "" / None); `key`: the
        widget's session id, if it sent one."""
        pipeline, embed = self.bot(bot_id)
        if key is not None and not (isinstance(key, str) and KEY_RE.match(key)):
            raise BadRequest("session_id must be 16-128 letters, digits, '-' or '_' (a random id the widget keeps)",
                             code=Code.INVALID_PARAM)
        claims = None
        if token:
            claims = self.signer.claims(PURPOSE, token)
            if claims is None or claims.get("b") != embed.bot:
                raise Unauthorized("this visitor token is not valid for this chat")
            if time.time() - claims.get("t", 0) > self.token_ttl:
                raise Unauthorized("this visitor token has expired; ask for a new one (…/turnstile/verify)")
        if embed.turnstile_secret_env and not (claims and claims.get("h")):
            raise Unauthorized("this chat asks for a human check first (POST …/turnstile/verify)",
                               code=Code.HUMAN_CHECK_REQUIRED)
        if key is None:
            if claims is None:
                raise Unauthorized("send the widget's session_id, or a visitor token",
                                   code=Code.VISITOR_REQUIRED)
            key = "v" + claims["v"]
        visitor = self.signer.sign("visitor-key", embed.bot, key)[:24]
        return Identity(user_id=f"visitor:{embed.bot}:{visitor}", visitor=embed.bot)

    def issue(self, embed, *, human):
        return self.signer.token(PURPOSE, {"b": embed.bot, "v": secrets.token_urlsafe(12), "t": int(time.time()),
                                           "h": int(human)})

    async def verify_human(self, embed, response, remote_ip):
        """Ask the human-check service (Turnstile's siteverify, or what `turnstile_verify_url` names) about the
        token the widget's challenge produced. True when it says success."""
        from services.operations.pipelines import embed_secret
        secret = embed_secret(embed)
        if not secret:
            raise Unavailable("this chat's human check is not configured (its secret is not set)",
                              code=Code.HUMAN_CHECK_UNAVAILABLE)
        if not isinstance(response, str) or not response or len(response) > 4096:
            raise BadRequest("send the challenge's token: {\"token\": \"…\"}", code=Code.INVALID_PARAM)
        body = urllib.parse.urlencode({"secret": secret, "response": response, "remoteip": remote_ip})
        try:
            answer = await AsyncHTTPClient().fetch(embed.turnstile_verify_url, method="POST", body=body,
                                                   headers={"Content-Type": "application/x-www-form-urlencoded"},
                                                   request_timeout=VERIFY_TIMEOUT)
            result = json.loads(answer.body)
        except (HTTPClientError, OSError, ValueError) as exc:
            log.warning("human check: %s did not answer: %s", embed.turnstile_verify_url, exc)
            raise Unavailable("the human check service did not answer; try again",
                              code=Code.HUMAN_CHECK_UNAVAILABLE) from None
        return isinstance(result, dict) and result.get("success") is True

    def origin_allowed(self, embed, origin):
        return "*" in embed.origins or origin in embed.origins

    # limits

    def refused(self, limit):
        if self.metrics is not None:
            self.metrics.visitor_refused(limit)

    def check_address(self, address):
        """Before a socket is looked at further: room for another from this address?"""
        if self.by_address.get(address, 0) >= self.max_address_connections:
            self.refused("connections")
            raise Capacity(f"too many chats are open from your network ({self.max_address_connections}); "
                           "close one and try again")

    def admit_connection(self, identity, address):
        if self.by_address.get(address, 0) >= self.max_address_connections:
            self.refused("connections")
            raise Capacity(f"too many chats are open from your network ({self.max_address_connections}); "
                           "close one and try again")
        if self.by_visitor.get(identity.user_id, 0) >= self.max_connections:
            self.refused("connections")
            raise Capacity(f"this chat is open in {self.max_connections} tabs already; close one and try again")
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self.by_visitor[identity.user_id] = self.by_visitor.get(identity.user_id, 0) + 1

    def connection_closed(self, identity, address):
        for table, key in ((self.by_address, address), (self.by_visitor, identity.user_id)):
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)

    def before_send(self, conn):
        """Per visitor and per address message rates; raises RateLimited (a reply with the reason)."""
        try:
            self.sends.take(conn.identity.user_id)
            self.address_sends.take(conn.remote_ip)
        except RateLimited:
            self.refused("messages")
            raise

    async def admit_session(self, address):
        """Before a visitor's new conversation is stored: per address, and up to --max-visitor-sessions."""
        try:
            self.address_sessions.take(address)
        except RateLimited as err:
            self.refused("sessions")
            raise RateLimited(f"too many new chats from your network; {err.message}",
                              retry_after=err.extra.get("retry_after")) from None
        now = time.monotonic()
        if self._count is None or now - self._count[1] > COUNT_EVERY:
            self._count = (await self.store.count_visitor_sessions(), now)
        if self._count[0] >= self.max_sessions:
            self.refused("capacity")
            raise Capacity("this chat cannot take new conversations right now; try again later")
        self._count = (self._count[0] + 1, self._count[1])

    # expiry

    def start(self):
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="visitor-sweep")

    async def stop(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None

    async def _sweep_forever(self):
        every = min(600.0, max(1.0, self.session_ttl / 10))
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next round tries again
                log.warning("visitor session sweep failed: %s", exc)

    async def sweep(self, now_ms=None):
        """Forget visitor conversations unused for --visitor-session-ttl: their messages and files too."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(self.session_ttl * 1000)
        removed = 0
        while True:
            expired = await self.store.expired_visitor_sessions(cutoff, SWEEP_BATCH)
            for doc in expired:
                await self.store.delete_visitor_session(doc)
            removed += len(expired)
            if len(expired) < SWEEP_BATCH:
                break
        if removed:
            log.info("forgot %d visitor conversations unused for %g s", removed, self.session_ttl)
            if self.metrics is not None:
                self.metrics.visitor_sessions_expired(removed)
            self._count = None
        return removed
