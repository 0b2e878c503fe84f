"""Bad input never kills the socket or the process: an `error` frame or a 4xx JSON body with a stable code."""
import json

import pytest
from tornado.websocket import websocket_connect

from tests.conftest import ws_request

pytestmark = pytest.mark.gen_test(timeout=20)

BAD_FRAMES = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_frame"),
    ('"hello"', "invalid_frame"),
    ("{}", "invalid_frame"),
    ('{"type": 7}', "invalid_frame"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "message"}', "invalid_message"),
    ('{"type": "message", "message": []}', "invalid_message"),
    ('{"type": "message", "message": "hi"}', "invalid_message"),
    ('{"type": "message", "message": [{"text": "no type"}]}', "invalid_message"),
    ('{"type": "message", "message": [{"type": "Plain", "text": 5}]}', "invalid_message"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "   "}]}', "invalid_message"),
    # an image, to a pipeline whose inputs are text only
    ('{"type": "message", "message": [{"type": "Image", "url": "https://example.com/a.png"}]}',
     "unsupported_component"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "hi"}], "stream": "yes"}', "invalid_param"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "hi"}], "client_msg_id": {"$ne": 1}}',
     "invalid_param"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "hi"}], "session_id": {"$ne": null}}',
     "invalid_param"),
    ('{"type": "message", "message": [{"type": "Plain", "text": "hi"}], "session_id": "elsewhere"}',
     "session_not_found"),
    ('{"type": "stop", "message_id": {"$gt": ""}}', "invalid_param"),
]


@pytest.mark.parametrize("raw,code", BAD_FRAMES)
async def test_bad_frame_gets_error_and_socket_stays_usable(connect, services, raw, code):
    c = await connect()
    await c.send(raw)
    err = await c.recv_type("error")
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    # the same socket still works end to end
    ack = await c.say("still here?")
    assert ack["type"] == "ack"
    frames = await c.until_final(ack["data"]["reply_message_id"])
    assert frames[-1]["data"]["status"] == "completed"
    # and nothing from the bad frame was persisted: one user message and its reply
    assert await services.store.messages.count_documents({}) == 2


async def test_too_long_message_is_refused(connect):
    c = await connect()
    await c.send({"type": "message", "message": [{"type": "Plain", "text": "x" * 40_000}]})
    err = await c.recv_type("error")
    assert err["code"] == "message_too_long"


async def test_binary_frame_is_refused(connect):
    c = await connect()
    await c.ws.write_message(b"\x00\x01", binary=True)
    assert (await c.recv_type("error"))["code"] == "invalid_frame"
    await c.send({"type": "ping"})
    assert (await c.recv_type("pong"))["type"] == "pong"


@pytest.mark.parametrize("pipeline,query,code,close_code", [
    ("nope", {}, "pipeline_not_found", 4404),
    ("default", {"session_type": "crowd"}, "invalid_session_type", 4400),
    ("default", {"stream_mode": "telepathy"}, "invalid_param", 4400),
    ("default", {"session_id": "no-such-session"}, "session_not_found", 4404),
])
async def test_fatal_connect_errors_say_why_then_close(ws_url, pipeline, query, code, close_code):
    ws = await websocket_connect(ws_request(ws_url(pipeline, **query)))
    err = json.loads(await ws.read_message())
    assert err["type"] == "error" and err["code"] == code
    assert await ws.read_message() is None
    assert ws.close_code == close_code and ws.close_reason == code


async def test_a_session_of_another_pipeline_is_not_found(connect, fetch):
    code, body = await fetch("/api/v1/pipelines/slow/sessions", "POST", body={})
    other = body["data"]["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{other}/messages")
    assert code == 404 and body["code"] == "session_not_found"


@pytest.mark.parametrize("method,path,body,status,code", [
    ("GET", "/nowhere", None, 404, "not_found"),
    ("GET", "/api/v1/pipelines/nope/sessions", None, 404, "pipeline_not_found"),
    ("GET", "/api/v1/pipelines/nope/ws/messages/person", None, 404, "pipeline_not_found"),
    ("GET", "/api/v1/pipelines/default/ws/messages/crowd", None, 400, "invalid_session_type"),
    ("POST", "/api/v1/pipelines/default/ws/reset/crowd", None, 400, "invalid_session_type"),
    ("GET", "/api/v1/pipelines/default/sessions/missing", None, 404, "session_not_found"),
    ("POST", "/api/v1/pipelines/default/sessions", "{oops", 400, "invalid_json"),
    ("POST", "/api/v1/pipelines/default/sessions", "[1]", 400, "invalid_json"),
    ("POST", "/api/v1/pipelines/default/sessions", {"session_type": "crowd"}, 400, "invalid_session_type"),
    ("POST", "/api/v1/pipelines/default/sessions", {"members": "everyone"}, 400, "invalid_param"),
    ("POST", "/api/v1/pipelines/default/sessions", {"members": ["bob"]}, 400, "invalid_param"),
    ("POST", "/api/v1/pipelines/default/sessions", {"session_type": "group", "members": [{"$ne": 1}]}, 400,
     "invalid_param"),
    ("DELETE", "/api/v1/pipelines/default/sessions", None, 405, "method_not_allowed"),
])
async def test_rest_errors_are_json_with_stable_codes(fetch, method, path, body, status, code):
    got_status, got = await fetch(path, method, body=body)
    assert (got_status, got["code"]) == (status, code), got
    assert got["message"]


async def test_rest_query_parameters_are_validated(fetch):
    code, body = await fetch("/api/v1/pipelines/default/sessions", "POST", body={})
    sid = body["data"]["session_id"]
    for query in ("after_seq=-1", "after_seq=x", "limit=0", "limit=100000"):
        code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages?{query}")
        assert code == 400 and body["code"] == "invalid_param", query


async def test_rest_send_validates_like_the_socket(fetch):
    code, body = await fetch("/api/v1/pipelines/default/sessions", "POST", body={})
    sid = body["data"]["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages", "POST",
                             body={"message": [{"type": "Plain"}]})
    assert code == 400 and body["code"] == "invalid_message"
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/stop", "POST",
                             body={"message_id": ["a"]})
    assert code == 400 and body["code"] == "invalid_param"


async def test_oversized_frame_closes_with_1009_and_the_server_lives_on(connect):
    c = await connect()
    await c.send({"type": "message", "message": [{"type": "Plain", "text": "x" * 70_000}]})
    code, _ = await c.wait_closed()
    assert code == 1009
    other = await connect()
    assert (await other.say("fine"))["type"] == "ack"
