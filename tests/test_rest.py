"""REST: sessions, history (LangBot shape and native pages), reset, send, connections, pipelines."""
import asyncio

import pytest

from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.gen_test(timeout=30)


async def chat_once(c, text):
    ack = await c.say(text)
    frames = await c.until_final(ack["data"]["reply_message_id"])
    return ack, frames[-1]["data"]


async def test_pipelines_are_listed_without_secrets(fetch):
    code, body = await fetch("/api/v1/pipelines")
    assert code == 200 and body["code"] == 0 and body["msg"] == "ok"
    ids = [p["id"] for p in body["data"]["pipelines"]]
    assert "default" in ids and "slow" in ids
    assert set(body["data"]["pipelines"][0]) == {"id", "name", "provider", "model", "inputs"}
    assert body["data"]["pipelines"][0]["inputs"] == ["text"]


async def test_create_list_and_get_sessions(fetch):
    code, body = await fetch("/api/v1/pipelines/default/sessions", "POST",
                             body={"title": "Trip plans", "session_type": "group", "members": ["ann", "bo"]})
    assert code == 201
    created = body["data"]
    assert created["title"] == "Trip plans" and created["session_type"] == "group"
    assert set(created["members"]) == {"ann", "bo", "local"} and created["owner"] == "local"
    code, body = await fetch("/api/v1/pipelines/default/sessions")
    assert code == 200 and created["session_id"] in [s["session_id"] for s in body["data"]["sessions"]]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{created['session_id']}")
    assert code == 200 and body["data"] == created
    code, body = await fetch("/api/v1/pipelines/slow/sessions")
    assert created["session_id"] not in [s["session_id"] for s in body["data"]["sessions"]]


async def test_langbot_history_and_reset(connect, fetch):
    c = await connect(session_type="group")
    _, final = await chat_once(c, "first")
    _, final2 = await chat_once(c, "second")
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/group")
    assert code == 200 and body["code"] == 0 and body["msg"] == "ok"
    messages = body["data"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["id"] for m in messages] == [1, 2, 3, 4]
    assert messages[0]["content"] == "first" and messages[3]["content"] == final2["content"]
    for m in messages:
        assert {"id", "role", "content", "message_chain", "timestamp"} <= set(m)
    assert messages[1]["is_final"] is True and messages[1]["status"] == "completed"
    # the person session of the same pipeline is a different conversation
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person")
    assert body["data"]["messages"] == []

    code, body = await fetch("/api/v1/pipelines/default/ws/reset/group", "POST")
    assert code == 200 and body["data"]["message"] == "Session reset successfully"
    assert body["data"]["deleted"] == 4
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/group")
    assert body["data"]["messages"] == []
    # the conversation goes on after a reset, with numbers never reused
    ack, _ = await chat_once(c, "after reset")
    assert ack["data"]["seq"] == 5


async def test_native_history_pages_by_seq(connect, fetch):
    c = await connect()
    for i in range(3):
        await chat_once(c, f"msg {i}")
    sid = c.connected["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages?limit=4")
    page = body["data"]
    assert [m["seq"] for m in page["messages"]] == [1, 2, 3, 4] and page["has_more"] is True
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages?after_seq="
                             f"{page['next_after_seq']}&limit=4")
    page = body["data"]
    assert [m["seq"] for m in page["messages"]] == [5, 6] and page["has_more"] is False
    assert page["messages"][0]["content"] == "msg 2"


async def test_native_reset_stops_the_running_reply_first(connect, fetch, services):
    c = await connect("slow")
    ack = await c.say("long one")
    await c.recv_type("response")
    sid = c.connected["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/slow/sessions/{sid}/reset", "POST")
    assert code == 200 and body["data"]["stopped"] == [ack["data"]["reply_message_id"]]
    assert body["data"]["deleted"] == 2
    frames = await c.until_final(ack["data"]["reply_message_id"])
    assert frames[-1]["data"]["status"] == "stopped"
    assert await services.store.messages.count_documents({"session_id": sid}) == 0


async def test_rest_send_streams_to_viewers_and_lands_in_history(connect, fetch):
    c = await connect()
    sid = c.connected["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages", "POST",
                             body={"message": [{"type": "Plain", "text": "from a bot"}]})
    assert code == 202 and body["data"]["seq"] == 1 and body["data"]["duplicate"] is False
    echo = await c.recv_type("user_message")
    assert echo["data"]["content"] == "from a bot"
    frames = await c.until_final(body["data"]["reply_message_id"])
    code, hist = await fetch(f"/api/v1/pipelines/default/sessions/{sid}/messages")
    assert hist["data"]["messages"][1]["content"] == frames[-1]["data"]["content"]


async def test_a_session_is_named_after_its_first_message_unless_titled(connect, fetch):
    P = "/api/v1/pipelines/default/sessions"
    code, untitled = await fetch(P, "POST", body={})
    code, titled = await fetch(P, "POST", body={"title": "Trip plans"})
    long_line = "Where should we go in spring " + "and why " * 10
    for session in (untitled, titled):
        sid = session["data"]["session_id"]
        c = await connect(session_id=sid)
        ack = await c.say(f"\n  {long_line}\nsecond line")
        await c.until_final(ack["data"]["reply_message_id"])
        ack = await c.say("a later message names nothing")
        await c.until_final(ack["data"]["reply_message_id"])
    for _ in range(100):  # (the naming is written beside the send, not before its answer: bounded)
        code, body = await fetch(P)
        titles = {s["session_id"]: s["title"] for s in body["data"]["sessions"]}
        if titles[untitled["data"]["session_id"]]:
            break
        await asyncio.sleep(0.05)
    assert titles[titled["data"]["session_id"]] == "Trip plans"
    assert titles[untitled["data"]["session_id"]] == long_line[:59].rstrip() + "…"


async def test_client_msg_id_makes_a_send_idempotent(connect, services):
    c = await connect()
    first = await c.say("once", client_msg_id="abc-1")
    await c.until_final(first["data"]["reply_message_id"])
    again = await c.say("once", client_msg_id="abc-1")
    assert again["data"]["duplicate"] is True
    assert again["data"]["message_id"] == first["data"]["message_id"]
    assert again["data"]["reply_message_id"] == first["data"]["reply_message_id"]
    assert await services.store.messages.count_documents({}) == 2
    assert services.streams.generations == {}


async def test_connections_in_langbot_shape(connect, fetch):
    a = await connect()
    b = await connect(session_type="group")
    await connect("slow")
    code, body = await fetch("/api/v1/pipelines/default/ws/connections")
    stats = body["data"]["stats"]
    assert stats["total_connections"] == 2
    assert stats["connections_by_session_type"] == {"person": 1, "group": 1}
    ids = {conn["connection_id"] for conn in body["data"]["connections"]}
    assert ids == {a.connected["connection_id"], b.connected["connection_id"]}
    for conn in body["data"]["connections"]:
        assert conn["is_active"] is True and conn["created_at"] and conn["last_active"]


async def test_the_printed_url_answers_with_the_server_and_its_pipelines(fetch):
    code, body = await fetch(f"/?token={TEST_TOKEN}", token=None)
    assert code == 200 and body["data"]["name"] == "Parley" and body["data"]["user_id"] == "local"
    assert "default" in [p["id"] for p in body["data"]["pipelines"]]
    code, body = await fetch("/", token=None)
    assert (code, body["code"]) == (401, "unauthorized")
