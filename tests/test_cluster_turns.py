"""Turns across instances, in one process on the real store: two StreamManagers in cluster mode are two instances."""
import asyncio
import time

import pytest

from services.bus import LocalBus
from services.store import new_id, utcnow
from services.streams import StreamManager
from tests.conftest import provider_factory

pytestmark = pytest.mark.gen_test(timeout=60)


async def stored_send(store, session, seq, text):
    """What services/chat.py send() stores once its numbers are reserved: the message and its queued reply."""
    now = utcnow()
    base = {"session_id": session["_id"], "pipeline": session["pipeline"], "created_at": now, "updated_at": now}
    user = {"_id": new_id(), "seq": seq, "role": "user", "content": text, "status": "completed", "sender": "u",
            **base}
    reply = {"_id": new_id(), "seq": seq + 1, "role": "assistant", "content": "", "thinking": "",
             "status": "queued", "epoch": 0, "length": 0, "thinking_length": 0, "reply_to": user["_id"],
             "instance": "x", "lease_until": time.time() + 60, **base}
    await store.insert_messages([user, reply])
    return user, reply


async def test_a_reply_waits_for_an_earlier_send_whose_insert_has_not_landed(services):
    """A send on A reserves numbers 1-2; before its insert lands, a send on B (3-4) is stored and its reply looks
    for its turn: it must not take it ahead of A's reply (acceptance order), so it waits for number 1-2."""
    store = services.store
    instances = [StreamManager(store, LocalBus(name), services.streams.pipelines, instance_id=name, cluster=True,
                               provider_factory=provider_factory, lease_seconds=30) for name in ("a", "b")]
    for streams in instances:
        streams.hole_grace = 30  # longer than anything this test waits: the order may not depend on the machine
    a, b = instances
    session = await store.create_session(pipeline="default", session_type="group", owner="u")
    first = await store.next_seqs(session["_id"], 2)   # A's send: numbers reserved, insert still on its way
    second = await store.next_seqs(session["_id"], 2)  # B's send, stored at once
    user_b, reply_b = await stored_send(store, session, second, "from b")
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
    for streams in instances:
        await streams.shutdown()
