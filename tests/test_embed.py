"""Chat on any website (issue 24): anonymous widget visitors, as LangBot's widget talks to Parley.

A visitor has no credentials, only the random `session_id` its widget keeps (and, with a human check, a visitor
token). Each test drives the public surface: the WebSocket and REST routes LangBot's widget calls, from a page
origin the bot allows, against the real store.
"""
import asyncio
import base64
import dataclasses
import json
import secrets

import pytest
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=30)
SHOP = "https://shop.example"           # the page origin the test bot `widget` (pipeline `vision`) allows
LANGBOT_KEYS = {"id", "role", "content", "message_chain", "timestamp", "is_final", "connection_id"}
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


@pytest.fixture
def config(config):
    return dataclasses.replace(config, visitor_messages_per_minute=8, visitor_connections=3,
                               visitor_connections_per_address=4, visitor_sessions_per_address=4,
                               max_visitor_sessions=50, max_message_size=256 * 1024)


def new_key():
    return secrets.token_urlsafe(16)  # what a widget keeps: random, 22 characters


class Visitor:
    """What LangBot's widget does (src/langbot/templates/embed/widget.js): a WebSocket with its session id, an
    `authenticate` frame with its token ("" without a human check), history, reset and feedback over REST."""

    def __init__(self, base_url, http, bot="widget", key=None, token="", origin=SHOP):
        self.base, self.http, self.bot, self.key, self.token, self.origin = base_url, http, bot, key, token, origin
        self.ws = None
        self.frames = []
        self.raw = []  # every frame and body as text: nothing may name the pipeline

    async def connect(self, expect="connected"):
        url = (self.base.replace("http", "ws", 1) + f"/api/v1/embed/{self.bot}/ws/connect?session_type=person"
               + (f"&session_id={self.key}" if self.key else ""))
        self.ws = await websocket_connect(httpclient.HTTPRequest(url, headers={"Origin": self.origin}))
        await self.ws.write_message(json.dumps({"type": "authenticate", "token": self.token}))
        first = await self.recv()
        if expect:
            assert first["type"] == expect, first
        return first

    async def recv(self, timeout=10.0):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            return None
        self.raw.append(raw)
        frame = json.loads(raw)
        self.frames.append(frame)
        if frame["type"] in ("response", "user_message"):
            assert set(frame["data"]) == LANGBOT_KEYS, frame
        return frame

    async def say(self, text, chain=None):
        """Send; return the responses through the final one (skipping the echo)."""
        await self.ws.write_message(json.dumps({"type": "message", "stream": True,
                                                "message": chain or [{"type": "Plain", "text": text}]}))
        responses = []
        while not (responses and responses[-1]["data"]["is_final"]):
            frame = await self.recv()
            assert frame is not None, "the connection closed"
            assert frame["type"] != "error", f"LangBot's widget shows an error frame as a lost connection: {frame}"
            if frame["type"] == "response":
                responses.append(frame)
        return responses

    async def rest(self, method, path, body=None, headers=None, **query):
        headers = {"Origin": self.origin, **(headers or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.key and "session_id" not in query:
            query["session_id"] = self.key
        qs = "&".join(f"{k}={v}" for k, v in query.items() if v is not None)
        if body is not None:
            body, headers["Content-Type"] = json.dumps(body), "application/json"
        elif method == "POST":
            body = ""
        r = await self.http.fetch(f"{self.base}/api/v1/embed/{self.bot}{path}" + (f"?{qs}" if qs else ""),
                                  method=method, body=body, headers=headers, raise_error=False)
        self.raw.append(r.body.decode())
        return r.code, json.loads(r.body), r.headers

    async def history(self):
        code, body, _ = await self.rest("GET", "/messages/person")
        assert code == 200 and body["code"] == 0, body
        return body["data"]["messages"]

    def close(self):
        if self.ws is not None:
            self.ws.close()


@pytest.fixture
def visitor(io_loop, base_url, http_client):
    made = []

    def make(**kw):
        v = Visitor(base_url, http_client, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


async def test_a_visitor_chats_reloads_resets_and_rates(visitor, services):
    v = visitor(key=new_key())
    connected = await v.connect()
    assert set(connected) == {"type", "connection_id", "bot_uuid", "session_type", "timestamp"}
    assert connected["bot_uuid"] == "widget" and connected["session_type"] == "person"
    responses = await v.say("hello from a shop page")
    assert responses[-1]["data"]["content"].startswith('You said "hello from a shop page"')
    reply_id = responses[-1]["data"]["id"]
    # a reload: a new socket and the history, by the same session id
    v.close()
    again = visitor(key=v.key)
    await again.connect()
    history = await again.history()
    assert [(m["role"], m["id"]) for m in history] == [("user", 1), ("assistant", reply_id)]
    assert all(set(m) == LANGBOT_KEYS for m in history) and history[1]["is_final"]
    # thumbs up, then down: kept with the reply, counted
    for rating, kind in ((1, "like"), (2, "dislike")):
        code, body, _ = await again.rest("POST", "/feedback", {"message_id": reply_id, "feedback_type": rating})
        assert code == 200 and body["data"]["stored"] is True, body
    stored = await services.store.messages.find_one({"seq": reply_id, "role": "assistant"})
    assert stored["feedback"]["rating"] == "dislike"
    code, body, _ = await again.rest("POST", "/feedback", {"message_id": reply_id, "feedback_type": 3})
    assert "feedback" not in await services.store.messages.find_one({"seq": reply_id, "role": "assistant"})
    metrics = services.metrics.registry
    assert metrics.get_sample_value("parley_embed_feedback_total",
                                    {"pipeline": "vision", "rating": "dislike", "stored": "true"}) == 1
    # LangBot's widget sends no session id with a rating: counted, not stored
    code, body, _ = await again.rest("POST", "/feedback", {"message_id": reply_id, "feedback_type": 1},
                                     session_id=None)
    assert code == 200 and body["data"]["stored"] is False
    assert metrics.get_sample_value("parley_embed_feedback_total",
                                    {"pipeline": "vision", "rating": "like", "stored": "false"}) == 1
    # reset: the history is empty, the conversation goes on
    code, body, _ = await again.rest("POST", "/reset/person")
    assert code == 200 and body["data"]["message"] == "Session reset successfully" and body["data"]["deleted"] == 2
    assert await again.history() == []
    responses = await again.say("after the reset")
    assert responses[-1]["data"]["id"] > reply_id  # numbers are never reused
    # nothing a visitor got names the pipeline
    for text in v.raw + again.raw:
        assert '"vision"' not in text and "pipeline" not in text, text


async def test_a_second_visitor_sees_nothing_of_the_first(visitor):
    first, second = visitor(key=new_key()), visitor(key=new_key())
    await first.connect()
    await second.connect()
    await first.say("my secret order number is 42")
    await second.ws.write_message(json.dumps({"type": "ping"}))
    assert (await second.recv())["type"] == "pong"  # nothing of the first's conversation reached it
    assert await second.history() == []
    assert len(await first.history()) == 2
    # a visitor's frames reach no other session: joining or resuming are not visitor frames
    await second.ws.write_message(json.dumps({"type": "session.join", "session_id": "anything"}))
    refused = await second.recv()
    assert refused["type"] == "error" and refused["code"] == "unknown_type"


async def test_a_visitor_reaches_no_other_route(visitor, fetch, base_url, http_client):
    v = visitor(key=new_key())
    await v.connect()
    await v.say("hi")
    # the visitor's key opens nothing else; a visitor token is no API credential
    code, body, _ = await v.rest("POST", "/turnstile/verify", {"token": "x"})
    token = body["data"]["token"]
    for path, method, body in [("/api/v1/pipelines/vision/sessions", "GET", None),
                               ("/api/v1/pipelines/vision/ws/messages/person", "GET", None),
                               ("/api/v1/broadcast", "POST", {"message": "x"}),
                               ("/api/v1/pipelines/vision/ws/connections", "GET", None),
                               (f"/api/v1/files/images", "POST", None)]:
        code, answer = await fetch(path, method, body=body, token=token)
        assert (code, answer["code"]) == (401, "unauthorized"), (path, answer)
    ws = await websocket_connect(httpclient.HTTPRequest(
        base_url.replace("http", "ws", 1) + "/api/v1/pipelines/vision/ws/connect",
        headers={"Authorization": f"Bearer {token}"}))
    frame = json.loads(await ws.read_message())
    assert frame["type"] == "error" and frame["code"] == "unauthorized"
    ws.close()
    # a pipeline's own id is not a bot; another bot's token is not this one's
    stranger = visitor(bot="vision", key=new_key())
    frame = await stranger.connect(expect=None)
    assert (frame["type"], frame["code"]) == ("error", "bot_not_found")
    assert (await stranger.recv()) is None and stranger.ws.close_code == 4404


async def test_only_the_bots_page_origins_may_use_it(visitor, base_url, http_client):
    evil = visitor(key=new_key(), origin="https://evil.example")
    with pytest.raises(httpclient.HTTPClientError) as refused:
        await evil.connect()
    assert refused.value.code == 403
    # CORS: the shop's page may read the answers and send JSON; another page may not
    ok = await http_client.fetch(f"{base_url}/api/v1/embed/widget/feedback", method="OPTIONS", headers={
        "Origin": SHOP, "Access-Control-Request-Method": "POST"}, raise_error=False)
    assert ok.code == 204 and ok.headers["Access-Control-Allow-Origin"] == SHOP
    bad = await http_client.fetch(f"{base_url}/api/v1/embed/widget/feedback", method="OPTIONS", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, raise_error=False)
    assert bad.code == 403 and "Access-Control-Allow-Origin" not in bad.headers
    shop = visitor(key=new_key())
    code, _, headers = await shop.rest("GET", "/messages/person")
    assert code == 200 and headers["Access-Control-Allow-Origin"] == SHOP
    code, body, headers = await evil.rest("POST", "/reset/person", headers={"Sec-Fetch-Site": "cross-site"})
    assert (code, body["code"]) == (403, "cross_origin") and "Access-Control-Allow-Origin" not in headers


async def test_limits_refuse_with_a_reply_saying_why(visitor, services):
    v = visitor(key=new_key())
    await v.connect()
    await v.say("one")
    await v.say("two")  # a burst of two (8 a minute)
    await v.ws.write_message(json.dumps({"type": "message", "message": [{"type": "Plain", "text": "three"}]}))
    refusal = await v.recv()
    assert refusal["type"] == "response" and refusal["data"]["is_final"] and refusal["data"]["id"] < 0
    assert "rate_limited" in refusal["data"]["content"]
    # tabs of one visitor: 3
    tabs = [visitor(key=v.key) for _ in range(3)]
    for tab in tabs[:2]:
        await tab.connect()
    refused = await tabs[2].connect(expect="response")
    assert "capacity" in refused["data"]["content"] and "tabs" in refused["data"]["content"]
    assert (await tabs[2].recv()) is None and tabs[2].ws.close_code == 1013
    # connections per address: 4 (v and its two tabs are 3)
    other = visitor(key=new_key())
    await other.connect()
    crowd = visitor(key=new_key())
    refused = await crowd.connect(expect="response")
    assert "capacity" in refused["data"]["content"] and "your network" in refused["data"]["content"]
    for x in (v, other, *tabs):
        x.close()
    await settle(lambda: not services.visitors.by_address)
    # new conversations per address: 4 an hour (v's and other's were two)
    for _ in range(2):
        await visitor(key=new_key()).connect()
    late = visitor(key=new_key())
    refused = await late.connect(expect="response")
    assert "rate_limited" in refused["data"]["content"] and "new chats" in refused["data"]["content"]
    assert (await late.recv()) is None and late.ws.close_code == 1013
    assert not any(f["type"] == "error" for x in (v, *tabs, crowd, late) for f in x.frames)
    refused_total = services.metrics.registry.get_sample_value
    assert refused_total("parley_visitors_refused_total", {"limit": "messages"}) == 1
    assert refused_total("parley_visitors_refused_total", {"limit": "connections"}) == 2
    assert refused_total("parley_visitors_refused_total", {"limit": "sessions"}) == 1


async def test_stored_conversations_are_capped_and_expire(visitor, services):
    visitors = services.visitors
    visitors.max_sessions = 2
    a, b = visitor(key=new_key()), visitor(key=new_key())
    await a.connect()
    await a.say("keep me")
    await b.connect()
    full = visitor(key=new_key())
    refused = await full.connect(expect="response")
    assert "cannot take new conversations" in refused["data"]["content"]
    a.close()
    b.close()
    # unused for --visitor-session-ttl: forgotten with its messages and files
    code, body, _ = await a.rest("GET", "/messages/person")
    assert len(body["data"]["messages"]) == 2
    future = (await services.store.sessions.find_one({"visitor": "widget"}))["updated_ms"] + \
        int(visitors.session_ttl * 1000) + 1000
    assert await visitors.sweep(now_ms=future) == 2
    assert await services.store.count_visitor_sessions() == 0
    assert await services.store.messages.count_documents({}) == 0
    assert await a.history() == []
    again = visitor(key=new_key())
    await again.connect()  # room again


async def test_an_image_from_the_widget_is_stored_and_shown_by_a_signed_link(visitor, http_client):
    v = visitor(key=new_key())
    await v.connect()
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    await v.say("", chain=[{"type": "Plain", "text": "look"}, {"type": "Image", "base64": data_url}])
    history = await v.history()
    image = history[0]["message_chain"][1]
    assert image["type"] == "Image" and "base64" not in image and image["path"]
    assert image["url"].startswith(v.base + "/api/v1/files/image/" + image["path"] + "?exp=")
    r = await http_client.fetch(image["url"])  # an <img> on the shop's page: no credentials
    assert r.body == PNG and r.headers["Content-Type"] == "image/png"


async def test_the_logo_is_served_for_langbots_widget(http_client, base_url):
    r = await http_client.fetch(f"{base_url}/api/v1/embed/logo")
    assert r.headers["Content-Type"] == "image/svg+xml" and b"<svg" in r.body
    r = await http_client.fetch(f"{base_url}/api/v1/embed/logo?bot=nope", raise_error=False)
    assert r.code == 404


# A human check (Turnstile): a fake siteverify that passes the token "human".

class SiteVerify(web.RequestHandler):
    def post(self):
        self.application.settings["seen"].append(dict((k, v[0].decode()) for k, v in self.request.arguments.items()))
        self.finish({"success": self.get_body_argument("response") == "human"})


@pytest.fixture
def checked(io_loop, services, monkeypatch):
    """The bot `widget` with a human check whose secret is in TURNSTILE_SECRET."""
    seen = []
    sock, port = bind_unused_port()
    server = HTTPServer(web.Application([(r"/siteverify", SiteVerify)], seen=seen))
    server.add_sockets([sock])
    monkeypatch.setenv("TURNSTILE_SECRET", "the-secret")
    pipeline = services.pipelines.get("vision")
    embed = dataclasses.replace(pipeline.embed, turnstile_site_key="site-key", turnstile_secret_env="TURNSTILE_SECRET",
                                turnstile_verify_url=f"http://127.0.0.1:{port}/siteverify")
    monkeypatch.setattr(services.pipelines, "_by_bot", {"widget": dataclasses.replace(pipeline, embed=embed)})
    yield seen
    server.stop()


async def test_with_a_human_check_a_visitor_needs_a_token(visitor, checked):
    v = visitor(key=new_key())
    frame = await v.connect(expect=None)
    assert (frame["type"], frame["code"]) == ("error", "human_check_required")
    assert (await v.recv()) is None and v.ws.close_code == 4401
    code, body, _ = await v.rest("GET", "/messages/person")
    assert (code, body["code"]) == (401, "human_check_required")
    code, body, _ = await v.rest("POST", "/turnstile/verify", {"token": "robot"})
    assert (code, body["code"]) == (403, "human_check_failed")
    code, body, _ = await v.rest("POST", "/turnstile/verify", {"token": "human"})
    assert code == 200
    assert checked[-1]["secret"] == "the-secret" and checked[-1]["response"] == "human"
    passed = visitor(key=v.key, token=body["data"]["token"])
    await passed.connect()
    await passed.say("I am human")
    assert len(await passed.history()) == 2
    forged = visitor(key=v.key, token=body["data"]["token"][:-2] + "xx")
    frame = await forged.connect(expect=None)
    assert frame["code"] == "unauthorized"
