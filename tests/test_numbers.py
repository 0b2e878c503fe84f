"""Message numbers: every message of a session gets its own, in order, and the store's counter follows them —
also when they are taken from memory (services/conversations/numbers.py) and when the stored counter was left behind."""
import asyncio
import json

import pytest
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient

from tests.conftest import TEST_TOKEN, settle
from tests.test_crash import start_instance, stop_instance, ws

pytestmark = pytest.mark.gen_test(timeout=60)


async def acks_and_finals(client, count):
    """The acks of `count` sends made at once, read with every reply's final (frames of the first reply may come
    before the last ack, and replies may end in any order)."""
    acks, finals = [], set()
    while len(acks) < count or not {a["data"]["reply_message_id"] for a in acks} <= finals:
        frame = await client.recv_type("ack", "error", "response", timeout=10)
        assert frame["type"] != "error", frame
        if frame["type"] == "ack":
            acks.append(frame)
        elif frame["data"]["is_final"]:
            finals.add(frame["data"]["message_id"])
    return acks


async def stored_numbers(fetch, session_id, pipeline="default"):
    code, body = await fetch(f"/api/v1/pipelines/{pipeline}/sessions/{session_id}/messages?limit=500")
    assert code == 200, body
    code, session = await fetch(f"/api/v1/pipelines/{pipeline}/sessions/{session_id}")
    assert code == 200, session
    return [(m["seq"], m["role"]) for m in body["data"]["messages"]], session["data"]["last_seq"]


async def test_sends_one_after_another_and_at_once_get_consecutive_numbers_and_the_counter_follows(connect, fetch):
    c = await connect("default")
    session_id = c.connected["session_id"]
    for i in range(3):
        ack = await c.say(f"one after another {i}")
        assert (ack["data"]["seq"], ack["data"]["reply_seq"]) == (2 * i + 1, 2 * i + 2)
        await c.until_final(ack["data"]["reply_message_id"])
    for i in range(4):  # at once: each waits for nothing (4: as many as may wait, --max-queued 3, + 1)
        await c.send({"type": "message", "message": [{"type": "Plain", "text": f"at once {i}"}]})
    acks = await acks_and_finals(c, 4)
    assert sorted(a["data"]["seq"] for a in acks) == [7, 9, 11, 13]
    assert all(a["data"]["reply_seq"] == a["data"]["seq"] + 1 for a in acks)
    numbers, last_seq = await stored_numbers(fetch, session_id)
    assert numbers == [(n, "user" if n % 2 else "assistant") for n in range(1, 15)]
    assert last_seq == 14


async def test_a_group_sessions_members_share_one_sequence(connect, fetch):
    code, body = await fetch("/api/v1/pipelines/default/sessions", "POST",
                             {"session_type": "group", "members": ["someone-else"]})
    assert code == 201, body
    session = body["data"]
    c = await connect("default", session_id=session["session_id"], session_type="group")
    acks = []
    for text in ("first", "second"):
        acks.append(await c.say(text))
        await c.until_final(acks[-1]["data"]["reply_message_id"])
    assert [a["data"]["seq"] for a in acks] == [1, 3]
    assert (await stored_numbers(fetch, session["session_id"]))[1] == 4


async def http_json(base, path):
    url = base.replace("ws://", "http://") + path
    response = await AsyncHTTPClient().fetch(url, headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    return json.loads(response.body)["data"]


async def test_a_counter_left_behind_its_messages_is_repaired_by_the_next_send(config, mongo_url, db_name):
    """A crash between a send's two writes (its messages, its session's counter) leaves the counter behind
    the numbers in use. The next send, on the instance started after it, still gets a fresh number."""
    svc, http, base = await start_instance(config)
    try:
        c = await ws(base, "default")
        session_id = c.connected["session_id"]
        for text in ("one", "two"):
            ack = await c.say(text)
            await c.until_final(ack["data"]["reply_message_id"])
        c.close()
    finally:
        await stop_instance(svc, http)
    with MongoClient(mongo_url) as client:  # the counter write that was lost
        client[db_name].sessions.update_one({"_id": session_id}, {"$set": {"next_seq": 2}})

    svc, http, base = await start_instance(config)
    try:
        c = await ws(base, "default")
        assert c.connected["session_id"] == session_id
        ack = await c.say("three")
        assert ack["type"] == "ack", ack
        assert (ack["data"]["seq"], ack["data"]["reply_seq"]) == (5, 6)
        final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
        assert final["status"] == "completed"
        history = await http_json(base, f"/default/sessions/{session_id}/messages")
        assert [m["seq"] for m in history["messages"]] == [1, 2, 3, 4, 5, 6]
        assert [m["content"] for m in history["messages"] if m["role"] == "user"] == ["one", "two", "three"]
        assert (await http_json(base, f"/default/sessions/{session_id}"))["last_seq"] == 6
        ack = await c.say("four")  # and the one after it goes on from there
        assert (ack["data"]["seq"], ack["data"]["reply_seq"]) == (7, 8)
        await c.until_final(ack["data"]["reply_message_id"])
        c.close()
    finally:
        await stop_instance(svc, http)
        with MongoClient(mongo_url) as client:
            client.drop_database(db_name)


async def test_sends_at_once_from_two_tabs_of_a_new_session_never_share_a_number(connect, fetch):
    tabs = [await connect("default") for _ in range(2)]
    session_id = tabs[0].connected["session_id"]
    assert tabs[1].connected["session_id"] == session_id
    for i in range(2):  # 4 at once: as many as may wait in a session here (the suite's --max-queued 3, + 1)
        await asyncio.gather(*(t.send({"type": "message", "message": [{"type": "Plain", "text": f"{i}"}]})
                               for t in tabs))
    acks = [a for t in tabs for a in await acks_and_finals(t, 2)]  # each tab's own acks, every reply's final
    assert sorted(a["data"]["seq"] for a in acks) == list(range(1, 9, 2))
    numbers, last_seq = await stored_numbers(fetch, session_id)
    assert [n for n, _ in numbers] == list(range(1, 9)) and last_seq == 8


async def test_a_session_read_while_its_counter_write_is_on_its_way_shows_the_numbers_taken(services, fetch,
                                                                                            monkeypatch):
    """The counter of numbers taken from memory is written in the background; until it lands, what is read of
    the session (its `last_seq`, where a new viewer's order starts) still accounts for them."""
    real, gate = services.store.advance_seq, asyncio.Event()

    async def held(*args, **kw):
        await gate.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(services.store, "advance_seq", held)
    code, body = await fetch("/api/v1/pipelines/default/sessions", "POST", {"session_type": "person"})
    assert code == 201, body
    session_id = body["data"]["session_id"]
    path = f"/api/v1/pipelines/default/sessions/{session_id}"
    code, body = await fetch(path + "/messages", "POST", {"message": [{"type": "Plain", "text": "hello"}]})
    assert code == 202 and (body["data"]["seq"], body["data"]["reply_seq"]) == (1, 2), body
    assert (await services.store.get_session(session_id))["next_seq"] == 0  # the write is held
    numbers, last_seq = await stored_numbers(fetch, session_id)
    assert [n for n, _ in numbers] == [1, 2] and last_seq == 2
    gate.set()
    await settle(lambda: not services.sending._background)
    assert (await services.store.get_session(session_id))["next_seq"] == 2
