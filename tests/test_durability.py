"""A reply belongs to its session: it outlives its sender, stops durably, and is never sent twice."""
import asyncio
import time

import pytest

from services.storage.store import new_id, utcnow
from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=30)


async def stored_status(stored_message, message_id, wanted, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        doc = await stored_message(message_id)
        if doc["status"] == wanted or loop.time() > deadline:
            return doc
        await asyncio.sleep(0.02)


async def test_reply_goes_on_and_is_persisted_in_full_when_its_sender_disconnects(connect, services, stored_message):
    c = await connect("resumable", stream_mode="delta")
    reply_id = (await c.say("keep going"))["data"]["reply_message_id"]
    await c.recv_type("response")
    c.close()
    doc = await stored_status(stored_message, reply_id, "completed")
    assert doc["status"] == "completed"
    assert doc["content"].startswith('You said "keep going".') and len(doc["content"].split()) == 4 + 50


async def test_on_last_viewer_gone_stop_ends_the_reply_only_when_no_viewer_is_left(connect, services, stored_message):
    services.sending.on_last_viewer_gone = "stop"
    a = await connect("slow")
    b = await connect("slow", session_id=a.connected["session_id"])
    reply_id = (await a.say("two viewers"))["data"]["reply_message_id"]
    await b.recv_type("response")
    a.close()
    await settle(lambda: len(services.hub.connections) == 1)
    for _ in range(5):  # b still views it: it goes on
        assert not (await b.recv_type("response"))["data"]["is_final"]
    b.close()
    doc = await stored_status(stored_message, reply_id, "stopped")
    assert doc["status"] == "stopped" and doc["content"]
    await settle(lambda: not services.streams.generations)


async def test_a_stop_is_recorded_on_the_message(connect, services, stored_message):
    c = await connect("slow")
    reply_id = (await c.say("stop me"))["data"]["reply_message_id"]
    await c.recv_type("response")
    await c.send({"type": "stop", "message_id": reply_id})
    frames = await c.until_final(reply_id)
    assert frames[-1]["data"]["status"] == "stopped"
    await settle(lambda: not services.sending._background)
    doc = await stored_message(reply_id)
    assert doc["status"] == "stopped" and doc["stop_requested"] and doc["stop_requested_at"]


async def test_a_stop_recorded_only_in_mongodb_is_honoured_at_the_next_checkpoint(connect, services, stored_message):
    c = await connect("slow")
    reply_id = (await c.say("the signal gets lost"))["data"]["reply_message_id"]
    await c.recv_type("response")
    # as if a stop arrived elsewhere and its signal never reached this instance
    await services.store.messages.update_one({"_id": reply_id}, {"$set": {"stop_requested": True}})
    frames = await c.until_final(reply_id, timeout=5)
    final = frames[-1]["data"]
    assert final["status"] == "stopped" and 0 < len(final["content"].split()) < 3000
    doc = await stored_message(reply_id)
    assert doc["status"] == "stopped" and doc["content"] == final["content"]


async def test_a_stop_whose_cancellation_was_lost_is_fired_again_at_the_next_checkpoint(connect, services,
                                                                                      stored_message):
    c = await connect("slow")
    reply_id = (await c.say("the cancellation gets lost"))["data"]["reply_message_id"]
    await c.recv_type("response")
    # what a stop taken here leaves when the driver's asyncio.wait_for swallows its cancellation (Python 3.11):
    # the reason is set, the task streams on; no flag is written for it (its terminal write records the stop)
    gen = services.streams.generations[reply_id]
    gen.stop_reason, gen.stop_requested_at = "stopped", time.monotonic()
    frames = await c.until_final(reply_id, timeout=5)
    final = frames[-1]["data"]
    assert final["status"] == "stopped" and 0 < len(final["content"].split()) < 3000
    doc = await stored_message(reply_id)
    assert doc["status"] == "stopped" and doc["content"] == final["content"] and doc["stop_requested"]


async def test_a_queued_reply_with_a_recorded_stop_never_starts(connect, services):
    c = await connect("slow")
    first = (await c.say("first"))["data"]["reply_message_id"]
    second = (await c.say("second"))["data"]["reply_message_id"]
    await services.store.messages.update_one({"_id": second}, {"$set": {"stop_requested": True}})
    await c.send({"type": "stop", "message_id": first})
    assert (await c.until_final(first))[-1]["data"]["status"] == "stopped"
    frames = await c.until_final(second)
    assert len(frames) == 1 and frames[0]["data"]["status"] == "stopped" and frames[0]["data"]["content"] == ""


async def test_a_repeated_client_msg_id_returns_the_original_and_starts_nothing(connect, services):
    c = await connect("resumable", stream_mode="delta")
    first = await c.say("once", client_msg_id="m-1")
    assert first["data"]["duplicate"] is False
    await c.until_final(first["data"]["reply_message_id"])
    again = await c.say("once", client_msg_id="m-1")
    assert again["data"]["duplicate"] is True
    for key in ("message_id", "seq", "reply_message_id", "reply_seq"):
        assert again["data"][key] == first["data"][key]
    await c.send({"type": "ping"})
    while (frame := await c.recv())["type"] != "pong":  # no echo, no second reply
        assert frame["type"] not in ("user_message", "response", "status"), frame
    assert len(await services.store.list_messages(c.connected["session_id"])) == 2


async def test_concurrent_sends_of_one_client_msg_id_from_two_tabs_make_one_message(connect, services):
    a = await connect("resumable")
    b = await connect("resumable", session_id=a.connected["session_id"])
    frame = {"type": "message", "message": [{"type": "Plain", "text": "both tabs"}], "client_msg_id": "same"}
    await asyncio.gather(a.send(frame), b.send(frame))
    acks = [await a.recv_type("ack", "error"), await b.recv_type("ack", "error")]
    assert [x["type"] for x in acks] == ["ack", "ack"], acks
    assert acks[0]["data"]["reply_message_id"] == acks[1]["data"]["reply_message_id"]
    assert sorted(x["data"]["duplicate"] for x in acks) == [False, True]
    await a.until_final(acks[0]["data"]["reply_message_id"])
    assert len(await services.store.list_messages(a.connected["session_id"])) == 2
    # the losing insert is an expected answer, not a store fault
    get = services.metrics.registry.get_sample_value
    assert get("parley_store_operation_errors_total", {"operation": "insert_messages"}) == 0


async def test_a_repeat_of_a_send_cut_off_before_its_reply_was_stored_stores_and_streams_the_reply(connect, services):
    """A send whose instance stopped between its two inserts left its user message without a reply: the repeat
    (here from two tabs at once) stores one reply, numbered right after the question, and streams it to both."""
    a = await connect("resumable", stream_mode="delta")
    sid = a.connected["session_id"]
    await a.until_final((await a.say("first"))["data"]["reply_message_id"])
    b = await connect("resumable", stream_mode="delta", session_id=sid)
    seq = await services.store.next_seqs(sid, 2, pipeline="resumable", member=None)
    now = utcnow()
    question = {"_id": new_id(), "session_id": sid, "pipeline": "resumable", "seq": seq, "role": "user",
                "content": "cut off", "chain": [{"type": "Plain", "text": "cut off"}], "status": "completed",
                "sender": "local", "client_msg_id": "m-cut", "created_at": now, "updated_at": now}
    await services.store.messages.insert_one(question)  # the send's first insert, and no second
    frame = {"type": "message", "message": [{"type": "Plain", "text": "cut off"}], "client_msg_id": "m-cut"}
    await asyncio.gather(a.send(frame), b.send(frame))
    acks = [await a.recv_type("ack", "error"), await b.recv_type("ack", "error")]
    assert [x["type"] for x in acks] == ["ack", "ack"], acks
    assert all(x["data"]["duplicate"] and x["data"]["message_id"] == question["_id"] for x in acks)
    reply_id = acks[0]["data"]["reply_message_id"]
    assert reply_id is not None and acks[1]["data"]["reply_message_id"] == reply_id
    assert acks[0]["data"]["reply_seq"] == seq + 1
    for c in (a, b):
        final = (await c.until_final(reply_id))[-1]["data"]
        assert final["status"] == "completed" and final["content"]
    messages = await services.store.list_messages(sid)
    assert [(m["seq"], m["role"], m["status"]) for m in messages[2:]] == [
        (seq, "user", "completed"), (seq + 1, "assistant", "completed")]


async def test_rest_send_with_idempotency_key(connect, fetch, services):
    c = await connect("resumable")
    path = f"/api/v1/pipelines/resumable/sessions/{c.connected['session_id']}/messages"
    body = {"message": [{"type": "Plain", "text": "from a bot"}]}
    code, first = await fetch(path, "POST", body=body, headers={"Idempotency-Key": "bot-42"})
    assert code == 202 and first["data"]["duplicate"] is False and first["data"]["client_msg_id"] == "bot-42"
    code, again = await fetch(path, "POST", body=body, headers={"Idempotency-Key": "bot-42"})
    assert code == 200 and again["data"]["duplicate"] is True
    assert again["data"]["reply_message_id"] == first["data"]["reply_message_id"]
    code, err = await fetch(path, "POST", body={**body, "client_msg_id": "other"},
                            headers={"Idempotency-Key": "bot-42"})
    assert code == 400 and err["code"] == "invalid_param"
    await c.until_final(first["data"]["reply_message_id"])
    assert len(await services.store.list_messages(c.connected["session_id"])) == 2
