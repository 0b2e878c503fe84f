"""Writes under bursts: group commit (services/storage/batching.py, services/storage/store.py) and admission of sends,
against the real store (nx-27017, or PARLEY_TEST_MONGO_URL)."""
import asyncio

import pytest
import server
from pymongo.errors import DuplicateKeyError

from services.storage.batching import GroupCommit
from services.storage.store import new_id, utcnow
from tests.conftest import TEST_TOKEN, settle

pytestmark = pytest.mark.gen_test(timeout=120)

BURST = 300


@pytest.fixture
def config(mongo_url, db_name):
    return server.Config(mongo_url=mongo_url, db_name=db_name, checkpoint_interval=0.05, max_queued=3,
                         auth="token", token=TEST_TOKEN, auth_timeout=5, rate_limit=100_000,
                         rate_burst=100_000, max_connections_per_user=BURST + 10,
                         store_timeout=1.0, send_concurrency=16)  # old code: store_unavailable at this timeout


def batches(services, operation):
    """(bulk writes, writes in them) of one store operation, from /metrics' parley_store_batch_size."""
    get = services.metrics.registry.get_sample_value
    return (get("parley_store_batch_size_count", {"operation": operation}) or 0,
            get("parley_store_batch_size_sum", {"operation": operation}) or 0)


async def open_sessions(services, connect, count, pipeline="default"):
    clients = []
    for _ in range(count):
        doc = await services.store.create_session(pipeline=pipeline, session_type="person", owner="local")
        clients.append(await connect(pipeline, session_id=doc["_id"]))
    return clients


async def test_a_burst_of_sends_over_websockets_all_get_acks_and_finals(connect, services, stored_message):
    clients = await open_sessions(services, connect, BURST)
    text = [{"type": "Plain", "text": "burst"}]
    await asyncio.gather(*(c.send({"type": "message", "message": text}) for c in clients))

    async def answer(c):
        ack = await c.recv_type("ack", "error", timeout=60)
        assert ack["type"] == "ack", ack  # never store_unavailable (nor overloaded: the queue holds them)
        final = (await c.until_final(ack["data"]["reply_message_id"], timeout=60))[-1]["data"]
        return ack["data"]["reply_message_id"], final

    for reply_id, final in await asyncio.gather(*(answer(c) for c in clients)):
        assert final["status"] == "completed", final
        stored = await stored_message(reply_id)
        assert stored["status"] == "completed" and stored["content"] == final["content"]
    assert batches(services, "insert_messages")[1] == BURST  # every send's messages went through group commit
    assert batches(services, "finish")[1] == BURST


async def test_writes_issued_together_share_one_bulk_write_and_each_gets_its_own_answer(services):
    store, sid = services.store, (await services.store.create_session(
        pipeline="default", session_type="person", owner="local"))["_id"]
    now = utcnow()

    def send(seq, client_msg_id=None):
        user = {"_id": new_id(), "session_id": sid, "seq": seq, "role": "user", "content": "hi",
                "status": "completed", "created_at": now}
        if client_msg_id:
            user["client_msg_id"] = client_msg_id
        reply = {"_id": new_id(), "session_id": sid, "seq": seq + 1, "role": "assistant", "content": "",
                 "thinking": "", "status": "streaming", "epoch": 1, "length": 0, "thinking_length": 0,
                 "text_parts": [], "thinking_parts": [], "reply_to": user["_id"], "created_at": now}
        return [user, reply]

    sends = [send(1), send(3, "tab"), send(5, "tab"), send(7)]  # the third repeats the second's client_msg_id
    before = batches(services, "insert_messages")
    results = await asyncio.gather(*(store.insert_messages(docs) for docs in sends), return_exceptions=True)
    assert batches(services, "insert_messages") == (before[0] + 1, before[1] + 4)  # one bulk for the four
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], DuplicateKeyError)
    stored = {d["seq"] for d in await store.list_messages(sid)}
    assert stored == {1, 2, 3, 4, 7, 8}  # the losing send left neither its message nor its reply

    replies = [sends[i][1]["_id"] for i in (0, 1, 3)]
    await store.messages.update_one({"_id": replies[1]}, {"$set": {"stop_requested": True}})
    checkpoints = [store.checkpoint(replies[0], epoch=1, offset=0, text="abc", thinking_offset=0, thinking="",
                                    lease_until=1e12),
                   store.checkpoint(replies[1], epoch=1, offset=0, text="de", thinking_offset=0, thinking="t",
                                    lease_until=1e12),
                   store.checkpoint(replies[2], epoch=2, offset=0, text="x", thinking_offset=0, thinking="",
                                    lease_until=1e12)]  # not its epoch: refused (fenced)
    first, second, fenced = await asyncio.gather(*checkpoints)
    assert batches(services, "checkpoint") == (1, 3)
    assert first["length"] == 3 and not first.get("stop_requested")
    assert second["length"] == 2 and second["thinking_length"] == 1 and second.get("stop_requested")
    assert fenced is None
    assert (await store.get_message(replies[0]))["content"] == "abc"
    assert (await store.get_message(replies[2]))["length"] == 0

    # all matched: the stop flag is still read back, in the same batch as a landing one
    again = await asyncio.gather(
        store.checkpoint(replies[0], epoch=1, offset=3, text="f", thinking_offset=0, thinking="", lease_until=1e12),
        store.checkpoint(replies[1], epoch=1, offset=2, text="g", thinking_offset=1, thinking="", lease_until=1e12))
    assert [d["length"] for d in again] == [4, 3] and [bool(d.get("stop_requested")) for d in again] == [False, True]

    ends = await asyncio.gather(*(store.finish(mid, epoch=epoch, status="completed", content="done", thinking="")
                                  for mid, epoch in ((replies[0], 1), (replies[1], 1), (replies[2], 2))))
    assert ends == [True, True, False]  # the third is not ours (epoch 1 in the store)
    assert (await store.get_message(replies[0]))["content"] == "done"
    assert (await store.get_message(replies[2]))["status"] == "streaming"
    # a terminal write repeated after it landed (its answer lost) is recognized as landed, not as fenced
    assert await store.finish(replies[0], epoch=1, status="completed", content="done", thinking="")


async def test_group_commit_gathers_what_is_submitted_while_a_bulk_is_in_flight():
    flushed, release = [], asyncio.Event()

    async def flush(items):
        flushed.append(list(items))
        if len(flushed) == 1:
            await release.wait()
        return [ValueError(i) if i == "bad" else i.upper() for i in items]

    commit = GroupCommit(flush, max_batch=3)
    first = asyncio.ensure_future(commit.submit("a"))
    await settle(lambda: flushed)
    later = [asyncio.ensure_future(commit.submit(x)) for x in ("b", "bad", "c", "d")]
    await asyncio.sleep(0)
    release.set()
    assert await first == "A"
    results = await asyncio.gather(*later, return_exceptions=True)
    assert results[0] == "B" and isinstance(results[1], ValueError) and results[2:] == ["C", "D"]
    assert flushed == [["a"], ["b", "bad", "c"], ["d"]]  # in order, at most max_batch per bulk


async def test_a_failed_bulk_fails_every_write_in_it():
    async def flush(items):
        raise ConnectionError("store gone")

    commit = GroupCommit(flush)
    results = await asyncio.gather(commit.submit(1), commit.submit(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


@pytest.fixture
def held(services, monkeypatch):
    """The store holds every send's insert until released (as an overloaded or stuck store would)."""
    real, gate, entered = services.store.insert_messages, asyncio.Event(), []

    async def insert_messages(*args, **kw):
        entered.append(args)
        await gate.wait()
        return await real(*args, **kw)

    monkeypatch.setattr(services.store, "insert_messages", insert_messages)
    yield gate, entered
    gate.set()


async def test_sends_beyond_the_queue_get_overloaded_and_the_queued_ones_go_on(connect, services, held):
    gate, entered = held
    services.sending.admission.limit, services.sending.admission.queue = 1, 1
    first, second, third = await open_sessions(services, connect, 3)
    await first.send({"type": "message", "message": [{"type": "Plain", "text": "one"}]})
    await settle(lambda: len(entered) == 1)  # writing (held)
    await second.send({"type": "message", "message": [{"type": "Plain", "text": "two"}]})
    await settle(lambda: services.sending.admission.waiting == 1)  # waiting its turn
    refused = await third.say("three")
    assert refused["type"] == "error" and refused["code"] == "overloaded" and refused["retryable"]
    assert len(entered) == 1  # one at a time (--send-concurrency 1)
    gate.set()
    for c in (first, second):
        ack = await c.recv_type("ack", "error")
        assert ack["type"] == "ack", ack
        assert (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]["status"] == "completed"


async def test_a_queued_send_gives_up_only_when_the_store_answers_nothing(connect, services, held):
    gate, entered = held
    services.sending.admission.limit, services.sending.admission.stall = 1, 0.5
    first, second = await open_sessions(services, connect, 2)
    await first.send({"type": "message", "message": [{"type": "Plain", "text": "one"}]})
    await settle(lambda: len(entered) == 1)
    refused = await second.say("two")  # the store answered nothing for --store-timeout while it waited
    assert refused["type"] == "error" and refused["code"] == "store_unavailable", refused
    assert len(entered) == 1 and services.sending.admission.waiting == 0
    gate.set()
    ack = await first.recv_type("ack", "error")
    assert ack["type"] == "ack", ack
