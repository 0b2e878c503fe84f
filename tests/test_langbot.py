"""A LangBot web-chat client, written from LangBot's protocol (not from Parley's client code), against Parley.

What that client needs: `connected` = {type, connection_id, pipeline_uuid, session_type, timestamp};
`response`/`user_message` = {type, session_type, data} with LangBot's seven-field message object, dropped
unless the top-level `session_type` is its own; any `error` frame is a lost connection; frame types it does not
know are noise. A plain connection must therefore get only LangBot's frames and fields.
"""
import asyncio
import json

import pytest
from tornado import httpclient
from tornado.websocket import websocket_connect

from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.gen_test(timeout=30)

LANGBOT_FRAMES = {"connected", "response", "user_message", "pong", "broadcast", "error"}
MESSAGE_KEYS = {"id", "role", "content", "message_chain", "timestamp", "is_final", "connection_id"}


class LangBotClient:
    """What LangBot's WebSocketClient does: open, keep frames of its session type, show messages by id."""

    def __init__(self, ws, session_type):
        self.ws = ws
        self.session_type = session_type
        self.frames = []        # every frame received, in order
        self.connected = None

    async def recv(self, timeout=10.0):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        assert raw is not None, "the server closed the connection"
        frame = json.loads(raw)
        self.frames.append(frame)
        assert frame["type"] in LANGBOT_FRAMES, f"a LangBot client does not know {frame['type']!r}: {frame}"
        assert frame["type"] != "error", f"a LangBot client shows an error frame as a lost connection: {frame}"
        if frame["type"] in ("response", "user_message"):
            assert set(frame) == {"type", "session_type", "data"}, frame
            assert frame["session_type"] == self.session_type, frame  # else the client drops it
            assert set(frame["data"]) == MESSAGE_KEYS, frame
        return frame

    async def send(self, frame):
        await self.ws.write_message(json.dumps(frame))

    async def say(self, chain, stream=True):
        """Send a chain; return (the user_message echo, the responses through the final one)."""
        await self.send({"type": "message", "message": chain, "stream": stream})
        echo, responses = None, []
        while not (responses and responses[-1]["data"]["is_final"]):
            frame = await self.recv()
            if frame["type"] == "user_message":
                echo = frame
            elif frame["type"] == "response":
                responses.append(frame)
        return echo, responses


@pytest.fixture
def langbot(io_loop, base_url):
    clients = []

    async def open_client(pipeline="default", session_type="person", *, path=None, authenticate=False, headers=None,
                          anonymous=False, **query):
        query = {"session_type": session_type, **query}
        path = path or f"/api/v1/pipelines/{pipeline}/ws/connect"
        url = base_url.replace("http", "ws", 1) + path + "?" + "&".join(f"{k}={v}" for k, v in query.items())
        headers = dict(headers or {})
        if not (authenticate or anonymous):
            headers["Authorization"] = f"Bearer {TEST_TOKEN}"
        ws = await websocket_connect(httpclient.HTTPRequest(url, headers=headers))
        client = LangBotClient(ws, session_type)
        clients.append(client)
        if authenticate:  # LangBot's client authenticates with a first frame
            await client.send({"type": "authenticate", "token": TEST_TOKEN, "workspace_uuid": "w-1"})
        client.connected = await client.recv()
        return client

    yield open_client
    for c in clients:
        c.ws.close()


def plain(text):
    return [{"type": "Plain", "text": text}]


async def test_connected_is_exactly_langbots(langbot):
    c = await langbot(authenticate=True)
    assert set(c.connected) == {"type", "connection_id", "pipeline_uuid", "session_type", "timestamp"}
    assert c.connected["type"] == "connected" and c.connected["pipeline_uuid"] == "default"
    assert c.connected["session_type"] == "person" and c.connected["connection_id"]
    assert c.ws.selected_subprotocol is None


async def test_person_chat_streams_cumulatively_with_only_langbot_frames(langbot):
    c = await langbot()
    echo, responses = await c.say(plain("hello there"))
    assert echo["data"]["role"] == "user" and echo["data"]["is_final"] is True
    assert echo["data"]["content"] == "hello there" and echo["data"]["message_chain"] == plain("hello there")
    assert echo["data"]["connection_id"] == c.connected["connection_id"]
    assert len(responses) > 1, "a streamed reply comes in several frames"
    ids = {r["data"]["id"] for r in responses}
    assert ids == {echo["data"]["id"] + 1}
    texts = [r["data"]["content"] for r in responses]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), "cumulative"
    final = responses[-1]["data"]
    assert final["role"] == "assistant" and final["content"].startswith('You said "hello there"')
    assert final["message_chain"] == plain(final["content"]) and final["connection_id"] == ""
    assert [r["data"]["is_final"] for r in responses].count(True) == 1
    # nothing else follows: a ping is answered by the very next frame
    await c.send({"type": "ping"})
    assert (await c.recv())["type"] == "pong"


async def test_stream_false_sends_one_final_response(langbot):
    c = await langbot()
    echo, responses = await c.say(plain("no streaming"), stream=False)
    assert echo is not None
    assert len(responses) == 1 and responses[0]["data"]["is_final"] is True
    assert responses[0]["data"]["content"].startswith('You said "no streaming"')


async def test_group_chat_frames_carry_group(langbot):
    c = await langbot(session_type="group")
    assert c.connected["session_type"] == "group"
    echo, responses = await c.say(plain("hi group"))
    assert echo["session_type"] == "group" and responses[-1]["session_type"] == "group"


async def test_a_refused_message_is_shown_as_a_reply_not_an_error(langbot, fetch):
    c = await langbot()
    await c.send({"type": "message", "message": plain("   ")})
    frame = await c.recv()  # recv() fails on any error frame
    assert frame["type"] == "response" and frame["data"]["is_final"] is True
    assert frame["data"]["role"] == "assistant" and frame["data"]["id"] < 0
    assert "message text is empty" in frame["data"]["content"] and "invalid_message" in frame["data"]["content"]
    # the connection is fine, and the refusal was not stored
    echo, responses = await c.say(plain("and now a real one"))
    assert responses[-1]["data"]["is_final"]
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person")
    assert code == 200
    assert [m["content"] for m in body["data"]["messages"]][0] == "and now a real one"
    assert all("not accepted" not in m["content"] for m in body["data"]["messages"])


async def test_stop_ends_the_reply_with_its_partial_text_and_no_ack(langbot):
    c = await langbot("slow")
    await c.send({"type": "message", "message": plain("go on")})
    while True:
        frame = await c.recv()
        if frame["type"] == "response":
            break
    await c.send({"type": "stop"})
    while not frame["data"]["is_final"]:
        frame = await c.recv()
        assert frame["type"] == "response"
    assert frame["data"]["content"]  # the partial answer
    await c.send({"type": "ping"})
    assert (await c.recv())["type"] == "pong"  # no stop_ack came in between


async def test_history_and_reset_over_langbots_routes(langbot, fetch):
    c = await langbot()
    echo, responses = await c.say(plain("remember me"))
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person")
    assert code == 200 and body["code"] == 0
    messages = body["data"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    for m in messages:
        assert MESSAGE_KEYS <= set(m) and m["is_final"] is True
    assert messages[0]["message_chain"] == plain("remember me")
    assert messages[1]["content"] == responses[-1]["data"]["content"]
    code, body = await fetch("/api/v1/pipelines/default/ws/reset/person", "POST")
    assert code == 200 and body["code"] == 0
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person")
    assert body["data"]["messages"] == []


async def test_opting_in_by_query_parameter_gets_parleys_frames(connect):
    c = await connect(headers={"Sec-WebSocket-Protocol": "x-other"}, protocol="parley.v1")
    assert c.ws.selected_subprotocol is None  # x-other was not selected; the query parameter opted in
    assert c.connected["protocol"] == "parley/1" and "session_id" in c.connected
    assert (await c.say("hi"))["type"] == "ack"


async def test_the_subprotocol_is_selected_when_offered(connect):
    c = await connect()  # the test helper offers parley.v1
    assert c.ws.selected_subprotocol == "parley.v1"
    assert c.connected["dialect"] == "parley.v1"


async def test_group_message_with_at_is_text_for_the_model_and_stored_as_sent(langbot, fetch):
    c = await langbot(session_type="group")
    chain = [{"type": "At", "target": "bot", "display": "Parley"}, {"type": "Plain", "text": " hello all"},
             {"type": "AtAll"}]
    echo, responses = await c.say(chain)
    assert echo["data"]["content"] == "@Parley hello all@all"
    assert echo["data"]["message_chain"] == chain
    assert responses[-1]["data"]["content"].startswith('You said "@Parley hello all@all"')
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/group")
    assert body["data"]["messages"][0]["message_chain"] == chain


async def test_quote_is_context_and_unknown_fields_are_not_stored(langbot, fetch):
    c = await langbot()
    chain = [{"type": "Quote", "id": 1, "origin": [{"type": "Plain", "text": "earlier words"}]},
             {"type": "Plain", "text": "what about it", "font": "bold"}]
    echo, responses = await c.say(chain)
    assert echo["data"]["content"] == "> earlier words\nwhat about it"
    stored = [{"type": "Quote", "id": 1, "origin": [{"type": "Plain", "text": "earlier words"}]},
              {"type": "Plain", "text": "what about it"}]
    assert echo["data"]["message_chain"] == stored
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person")
    assert body["data"]["messages"][0]["message_chain"] == stored


@pytest.mark.parametrize("component, reason", [
    ({"type": "Image", "url": "https://example.com/cat.png"}, "does not accept images"),
    ({"type": "Voice", "url": "https://example.com/a.ogg", "length": 3}, "does not accept voice messages"),
    ({"type": "File", "name": "a.pdf", "url": "https://example.com/a.pdf"}, "does not accept files"),
])
async def test_components_a_pipeline_cannot_take_are_refused_with_the_reason(langbot, component, reason):
    c = await langbot()
    await c.send({"type": "message", "message": [{"type": "Plain", "text": "look"}, component]})
    frame = await c.recv()
    assert frame["type"] == "response" and frame["data"]["is_final"] and frame["data"]["id"] < 0
    assert reason in frame["data"]["content"] and "unsupported_component" in frame["data"]["content"]


async def test_an_image_goes_to_a_pipeline_declaring_image_input(langbot, fetch):
    c = await langbot("vision")
    chain = [{"type": "Plain", "text": "what is this"}, {"type": "Image", "url": "https://example.com/cat.png"}]
    echo, responses = await c.say(chain)
    assert echo["data"]["message_chain"] == chain and responses[-1]["data"]["is_final"]


async def test_embed_endpoint_maps_a_bot_to_a_pipeline_and_a_browser_session_to_a_session(langbot):
    """The widget's endpoint (tests/test_embed.py has the rest): anonymous, one conversation per browser session,
    shared by its tabs; `connected` names the bot, not the pipeline."""
    path = "/api/v1/embed/widget/ws/connect"
    a = await langbot(path=path, session_id="browser-one-0123456789", headers={"Origin": "https://shop.example"},
                      anonymous=True)
    assert a.connected["bot_uuid"] == "widget"
    assert set(a.connected) == {"type", "connection_id", "bot_uuid", "session_type", "timestamp"}
    same = await langbot(path=path, session_id="browser-one-0123456789", anonymous=True)
    other = await langbot(path=path, session_id="browser-two-0123456789", anonymous=True)
    echo, responses = await a.say(plain("hello widget"))
    assert responses[-1]["data"]["content"].startswith('You said "hello widget"')
    seen = await same.recv()  # the same browser session sees it (another tab)
    assert seen["type"] == "user_message" and seen["data"]["content"] == "hello widget"
    await other.send({"type": "ping"})
    assert (await other.recv())["type"] == "pong"  # nothing of browser-1's conversation reached browser-2
