"""The OpenAI-compatible provider through the whole server: socket -> stream manager -> fake upstream over HTTP."""
import base64
import json
import logging

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

import server
from services.operations.pipelines import Pipeline, Pipelines, Timeouts
from tests.conftest import Client, ws_request
from tests.upstream import Script

pytestmark = pytest.mark.gen_test(timeout=30)


@pytest.fixture
def gateway(io_loop, config, upstream):
    """A Parley whose pipelines call the fake upstream; yields a connect(pipeline) function."""
    pipelines = Pipelines([
        Pipeline(id="gpt", provider="openai", model="m", base_url=upstream.base_url, history_messages=2,
                 inputs=("text", "image"),
                 system_prompt="Be brief.", timeouts=Timeouts(first_token=5, stall=0.5, total=20)),
    ])
    svc = io_loop.run_sync(lambda: server.open_services(config, pipelines=pipelines))
    sock, port = bind_unused_port()
    http = HTTPServer(server.make_app(svc))
    http.add_sockets([sock])
    clients = []

    async def connect(**query):
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        ws = await websocket_connect(ws_request(f"ws://127.0.0.1:{port}/api/v1/pipelines/gpt/ws/connect?{qs}"))
        c = Client(ws)
        c.connected = await c.recv()
        clients.append(c)
        return c

    connect.services = svc
    connect.port = port
    yield connect
    for c in clients:
        c.close()
    http.stop()
    io_loop.run_sync(lambda: server.close_services(svc), timeout=20)


async def test_reply_streams_thinking_then_content_and_is_persisted_as_received(gateway, upstream):
    upstream.plan("m", Script(reasoning=["Let me ", "think."], content=["Hel", "lo ", "there", "!"]))
    c = await gateway(stream_mode="delta")
    ack = await c.say("hi")
    frames = await c.until_final(ack["data"]["reply_message_id"])
    text = "".join(f["data"].get("delta", "") for f in frames[:-1])
    thinking = "".join(f["data"].get("thinking_delta", "") for f in frames[:-1])
    kinds = ["t" if "thinking_delta" in f["data"] else "c" for f in frames[:-1]]
    assert kinds == sorted(kinds, reverse=True)  # all thinking before any content
    final = frames[-1]["data"]
    assert (text, thinking) == ("Hello there!", "Let me think.")
    assert final["status"] == "completed" and final["content"] == text and final["thinking"] == thinking
    stored = await gateway.services.store.get_message(final["message_id"])
    assert (stored["content"], stored["thinking"], stored["model"]) == (text, thinking, "m")
    assert stored["usage"]["completion_tokens"] > 0


async def test_stop_closes_the_upstream_stream(gateway, upstream):
    """A stop closes the upstream request at once rather than reading the model on to its end (50 s here). How
    fast is bench's (`stop`); a wall-clock bound here failed on a loaded machine."""
    upstream.plan("m", Script(content=[f"w{i} " for i in range(10_000)], rate=200))
    c = await gateway()
    ack = await c.say("go on forever")
    await c.recv_type("response")
    await c.recv_type("response")
    await c.send({"type": "stop"})
    frames = await c.until_final(ack["data"]["reply_message_id"])
    call = upstream.calls[-1]
    assert await call.wait_disconnect(20.0) is not None, "the upstream never saw the request end"
    assert frames[-1]["data"]["status"] == "stopped"
    assert call.chunks_sent < 10_000 and not call.completed


async def test_history_window_is_sent_upstream(gateway, upstream):
    upstream.plan("m", Script(content=["ok"]))
    c = await gateway()
    for text in ("one", "two", "three"):
        ack = await c.say(text)
        await c.until_final(ack["data"]["reply_message_id"])
    sent = upstream.calls[-1].body["messages"]
    # system prompt + the 2 most recent earlier messages (window) + the new one
    assert sent[0]["role"] == "system" and "Be brief." in sent[0]["content"]
    assert [(m["role"], m["content"]) for m in sent[1:]] == [("user", "two"), ("assistant", "ok"),
                                                              ("user", "three")]


async def test_upstream_stall_ends_in_stall_timeout_and_disconnects(gateway, upstream):
    upstream.plan("m", Script(content=["a", "b", "c"], stall_after=2))
    c = await gateway()
    ack = await c.say("stall please")
    frames = await c.until_final(ack["data"]["reply_message_id"])
    final = frames[-1]["data"]
    assert final["status"] == "timeout" and final["error"]["code"] == "stall_timeout"
    assert final["content"] == "ab"
    await upstream.calls[-1].wait_disconnect(1.0)


async def test_upstream_errors_end_the_reply_failed_with_their_code(gateway, upstream, caplog):
    upstream.plan("m", Script(status=401))
    c = await gateway()
    ack = await c.say("who am I")
    with caplog.at_level(logging.WARNING):
        final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
    assert "scripted status 401" in caplog.text
    assert final["status"] == "failed" and final["error"]["code"] == "upstream_unauthorized"
    # viewers get the code and a generic message: the upstream's own text ("scripted status 401") is logged only
    assert final["error"]["message"] == "the model server refused our credentials"
    stored = await gateway.services.store.get_message(final["message_id"])
    assert stored["status"] == "failed" and stored["error"] == final["error"]


async def test_an_image_reaches_a_pipeline_declaring_image_input_as_an_openai_image_part(gateway, upstream):
    upstream.plan("m", Script(content=["A cat."]))
    c = await gateway()
    await c.send({"type": "message", "message": [
        {"type": "Plain", "text": "what is this?"}, {"type": "Image", "url": "https://example.com/cat.png"},
        {"type": "Image", "base64": "iVBORw0KGgo="}]})
    ack = await c.recv_type("ack")
    final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
    assert final["content"] == "A cat."
    assert upstream.calls[-1].body["messages"][-1]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]


PNG_1x1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
JPEG_HEAD = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(60)).decode()


async def test_an_inline_image_is_checked_and_labelled_by_its_bytes(gateway, upstream):
    upstream.plan("m", Script(content=["ok"]))
    c = await gateway()
    # a JPEG sent under a png label goes upstream as the JPEG it is
    await c.send({"type": "message", "message": [{"type": "Image", "base64": "data:image/png;base64," + JPEG_HEAD}]})
    ack = await c.recv_type("ack")
    await c.until_final(ack["data"]["reply_message_id"])
    assert upstream.calls[-1].body["messages"][-1]["content"] == [
        {"type": "text", "text": ""}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + JPEG_HEAD}}]
    for bad, why in [(base64.b64encode(b"<svg onload=alert(1)>").decode(), "PNG, JPEG, GIF or WebP"),
                     ("data:text/html;base64," + PNG_1x1, "data:image/"), ("not base64!", "not valid base64")]:
        await c.send({"type": "message", "message": [{"type": "Plain", "text": "see"}, {"type": "Image", "base64": bad}]})
        err = await c.recv_type("error")
        assert err["code"] == "invalid_image" and why in err["message"], err
    calls = len(upstream.calls)
    too_big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(gateway.services.config.max_image_size)).decode()
    status, body = await rest_send(gateway, [{"type": "Plain", "text": "big"}, {"type": "Image", "base64": too_big}])
    assert (status, body["code"]) == (413, "image_too_large")
    assert body["max_bytes"] == gateway.services.config.max_image_size and "--max-image-size" in body["message"]
    assert len(upstream.calls) == calls  # nothing was stored or sent on


async def test_an_image_sent_over_rest_reaches_the_model_and_the_history(gateway, upstream):
    upstream.plan("m", Script(content=["A dot."]))
    c = await gateway()
    sid = c.connected["session_id"]
    status, body = await rest_send(gateway, [{"type": "Plain", "text": "what?"},
                                             {"type": "Image", "base64": "data:image/png;base64," + PNG_1x1}], sid)
    assert status == 202, body
    final = (await c.until_final(body["data"]["reply_message_id"]))[-1]["data"]
    assert final["content"] == "A dot."
    assert upstream.calls[-1].body["messages"][-1]["content"][1] == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1x1}}
    history = await gateway.services.store.get_message(body["data"]["message_id"])
    stored = history["chain"][1]  # the message names the image; its bytes are a stored file (tests/test_files.py)
    assert set(stored) == {"type", "path"} and stored["type"] == "Image"
    file = await gateway.services.store.find_file(stored["path"])
    assert await gateway.services.store.read_file(file) == base64.b64decode(PNG_1x1)


async def rest_send(gateway, chain, session_id=None):
    """POST a message over REST to the gateway's `gpt` pipeline: (status, body)."""
    svc = gateway.services
    port = gateway.port
    if session_id is None:
        session_id = (await gateway()).connected["session_id"]
    client = AsyncHTTPClient()
    r = await client.fetch(f"http://127.0.0.1:{port}/api/v1/pipelines/gpt/sessions/{session_id}/messages",
                           method="POST", raise_error=False, body=json.dumps({"message": chain}),
                           headers={"Authorization": f"Bearer {svc.config.token}",
                                    "Content-Type": "application/json"})
    return r.code, json.loads(r.body)
