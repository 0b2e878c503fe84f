"""Turns across instances, in one process on the real store: two StreamManagers in cluster mode are two instances."""
import asyncio
import time

import pytest

from services.delivery.bus import LocalBus
from services.replies.streams import StreamManager
from services.storage.store import new_id, utcnow
from services.wire import events
from tests.conftest import provider_factory

pytestmark = pytest.mark.gen_test(timeout=60)


async def stored_send(store, session, seq, text):
    """What services/conversations/sending.py send() stores once its numbers are reserved: the message and its queued
    reply."""
    now = utcnow()
    base = {"session_id": session["_id"], "pipeline": session["pipeline"], "created_at": now, "updated_at": now}
    user = {"_id": new_id(), "seq": seq, "role": "user", "content": text, "status": "completed", "sender": "u",
            **base}
    reply = {"_id": new_id(), "seq": seq + 1, "role": "assistant", "content": "", "thinking": "",
             "status": "queued", "epoch": 0, "length": 0, "thinking_length": 0, "reply_to": user["_id"],
             "instance": "x", "lease_until": time.time() + 60, **base}
    await store.insert_messages([user, reply])
    return user, reply


def two_instances(services, grace=30):
    instances = [StreamManager(services.store, LocalBus(name), services.streams.pipelines, instance_id=name,
                               cluster=True, provider_factory=provider_factory, lease_seconds=30)
                 for name in ("a", "b")]
    for streams in instances:
        streams.turns.hole_grace = grace  # longer than anything this test waits: the order may not depend on the machine
    return instances


async def assert_acceptance_order(store, session, a, b, first):
    """`first` was reserved by a send on A whose insert has not landed; a later send on B is stored at once and
    its reply looks for its turn: it must not take it ahead of A's reply (acceptance order)."""
    user_b, reply_b = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "from b")
    gen_b = b.accept(message_id=reply_b["_id"], session=session, seq=reply_b["seq"], reply_to=user_b["_id"],
                     prompt="from b", sender="u", stream=True)
    await asyncio.sleep(0.3)  # (long enough for B's reply to take the turn if it would)
    user_a, reply_a = await stored_send(store, session, first, "from a")
    gen_a = a.accept(message_id=reply_a["_id"], session=session, seq=reply_a["seq"], reply_to=user_a["_id"],
                     prompt="from a", sender="u", stream=True)
    await asyncio.wait_for(asyncio.gather(gen_a.done.wait(), gen_b.done.wait()), 40)
    done_a, done_b = [await store.get_message(r["_id"]) for r in (reply_a, reply_b)]
    assert (done_a["status"], done_b["status"]) == ("completed", "completed")
    assert done_a["finished_at"] <= done_b["started_at"], "a later send's reply ran first"


async def test_a_reply_waits_for_an_earlier_send_whose_insert_has_not_landed(services):
    """A send on A reserves numbers 1-2; before its insert lands, a send on B (3-4) is stored and its reply looks
    for its turn: it must not take it ahead of A's reply (acceptance order), so it waits for number 1-2."""
    store = services.store
    a, b = two_instances(services)
    session = await store.create_session(pipeline="default", session_type="group", owner="u")
    first = await store.next_seqs(session["_id"], 2)   # A's send: numbers reserved, insert still on its way
    await assert_acceptance_order(store, session, a, b, first)
    for streams in (a, b):
        await streams.shutdown()


async def test_after_a_reset_a_reply_waits_only_for_numbers_reserved_since(services, caplog):
    """A reset deletes the session's messages: the first reply after it must not wait for their numbers (it
    would wait the whole grace). A send reserved after the reset whose insert has not landed still keeps its
    place ahead of a later one."""
    store = services.store
    a, b = two_instances(services)
    session = await store.create_session(pipeline="default", session_type="group", owner="u")
    user, reply = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "before")
    assert await store.delete_session_messages(session["_id"]) == 2
    caplog.set_level("INFO", logger="services.cluster.turns")  # its "waited" line
    user, reply = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "first after")
    gen = a.accept(message_id=reply["_id"], session=session, seq=reply["seq"], reply_to=user["_id"],
                   prompt="first after", sender="u", stream=True)
    await asyncio.wait_for(gen.done.wait(), 40)
    assert gen.status == "completed"
    assert not [r for r in caplog.records if "waited" in r.getMessage()], "it waited for deleted numbers"

    first = await store.next_seqs(session["_id"], 2)   # A's send: reserved, insert still on its way
    await assert_acceptance_order(store, session, a, b, first)
    for streams in (a, b):
        await streams.shutdown()


@pytest.mark.parametrize("during", ["missing_before", "claim_turn", "recent_messages"])
async def test_a_stop_arriving_as_a_store_call_completes_is_not_lost(services, during):
    """Python 3.11's asyncio.wait_for (the driver awaits every operation through it) returns the result of an
    operation that completed as the task was cancelled, and the cancellation is gone. A stop that arrives just
    then must still stop the reply: it ends `stopped`, with no text."""
    store = services.store
    a, _ = two_instances(services)
    session = await store.create_session(pipeline="default", session_type="group", owner="u")
    user, reply = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "stop me")
    real = getattr(store, during)

    async def completing_as_stopped(*args, **kwargs):
        operation = asyncio.ensure_future(real(*args, **kwargs))
        # the other instance's stop event arrives in the same loop step as the operation's result
        operation.add_done_callback(lambda _: a.bus.receive(events.Stop(session_id=session["_id"], origin="b")))
        return await asyncio.wait_for(operation, 30)

    setattr(store, during, completing_as_stopped)
    try:
        gen = a.accept(message_id=reply["_id"], session=session, seq=reply["seq"], reply_to=user["_id"],
                       prompt="stop me", sender="u", stream=True)
        await asyncio.wait_for(gen.done.wait(), 40)
    finally:
        delattr(store, during)
    done = await store.get_message(reply["_id"])
    assert (gen.status, done["status"], done["content"]) == ("stopped", "stopped", "")
    await a.shutdown()


@pytest.mark.parametrize("holder", ["deleted", "completed"])
async def test_a_turn_nobody_will_release_is_freed_for_the_next_reply(services, holder):
    """The reply holding a session's turn is gone (a reset deleted it) or has ended, and its instance died before
    releasing the turn: nobody ever will, and the session's next reply must still run."""
    store = services.store
    a, _ = two_instances(services)
    session = await store.create_session(pipeline="default", session_type="group", owner="u")
    user, reply = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "before the crash")
    if holder == "deleted":
        await store.delete_session_messages(session["_id"])
    else:
        await store.messages.update_one({"_id": reply["_id"]}, {"$set": {"status": "completed", "content": "done"}})
    await store.sessions.update_one({"_id": session["_id"]}, {"$set": {"generating": reply["_id"]}})
    user, reply = await stored_send(store, session, await store.next_seqs(session["_id"], 2), "after it")
    gen = a.accept(message_id=reply["_id"], session=session, seq=reply["seq"], reply_to=user["_id"],
                   prompt="after it", sender="u", stream=True)
    await asyncio.wait_for(gen.done.wait(), 20)
    assert (await store.get_message(reply["_id"]))["status"] == "completed"
    assert (await store.get_session(session["_id"])).get("generating") is None  # released when it ended
