"""The MongoDB bus (services/cluster/mongo_bus.py) between two instances in one process, on the real store."""
import asyncio
import types

import pytest
from pymongo import AsyncMongoClient, MongoClient

from services.cluster import mongo_bus

from services.cluster.mongo_bus import MongoBus
from services.storage.store import Store, bus_db_name
from services.wire import events
from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=30)


class Instance:
    """A bus with what an instance would give it: viewed sessions and live replies."""

    def __init__(self, name, db):
        self.viewed = set()
        self.live = {}
        self.got = []
        self.users = {}  # session id -> users viewing it here (group sessions)
        self.bus = MongoBus(name, Store(db.client, db.name), viewed_sessions=lambda: self.viewed,
                            live_replies=lambda s: [g for g in self.live.values() if g.session_id == s],
                            online=lambda s: self.users.get(s, ()))
        self.bus.subscribe(lambda event: self.got.append(events.to_builtins(event)))  # as it crossed

    def of(self, kind):
        return [e for e in self.got if e["type"] == kind]


def gen(message_id="m1", session_id="s1"):
    return types.SimpleNamespace(message_id=message_id, session_id=session_id, seq=2, reply_to="u1",
                                 status="streaming", content="", thinking="", epoch=1, started_epoch=0.0, bases=[])


def delta(g, text):
    event = events.reply_delta(g, len(g.content), text, 0, "")
    g.content += text
    return event


@pytest.fixture
def pair(io_loop, mongo_url, db_name):
    client = io_loop.run_sync(lambda: _client(mongo_url))
    a, b = Instance("a", client[db_name]), Instance("b", client[db_name])
    io_loop.run_sync(a.bus.start)
    io_loop.run_sync(b.bus.start)
    yield a, b
    io_loop.run_sync(a.bus.close)
    io_loop.run_sync(b.bus.close)
    io_loop.run_sync(client.close)
    with MongoClient(mongo_url) as sync:
        sync.drop_database(db_name)
        sync.drop_database(bus_db_name(db_name))


async def _client(url):
    return AsyncMongoClient(url, tz_aware=True)


async def test_an_event_reaches_the_other_instance_once_and_never_comes_back(pair):
    a, b = pair
    a.bus.publish(events.decode({"type": "broadcast", "pipeline": None, "message": "hello"}))
    await settle(lambda: b.of("broadcast"), timeout=10)
    await asyncio.sleep(0.3)
    assert [e["message"] for e in b.of("broadcast")] == ["hello"]
    assert [e["message"] for e in a.of("broadcast")] == ["hello"]  # local delivery only, not its own echo
    assert b.of("broadcast")[0]["origin"] == "a"


async def test_deltas_cross_only_when_viewed_elsewhere_batched_and_whole(pair):
    a, b = pair
    g = a.live["m1"] = gen()
    for i in range(5):
        a.bus.publish(delta(g, f"unseen{i} "))
    await asyncio.sleep(0.4)
    assert b.of("reply.delta") == []  # nobody on b views s1: nothing crossed
    b.viewed.add("s1")  # a client on b starts viewing: b announces, a syncs the whole text so far
    await settle(lambda: b.of("reply.delta"), timeout=10)
    for i in range(200):
        a.bus.publish(delta(g, f"w{i} "))
        if i % 20 == 0:
            await asyncio.sleep(0.02)
    a.bus.publish(events.decode({"type": "reply.final", "session_id": "s1", "message_id": "m1", "seq": 2, "reply_to": "u1",
                   "status": "completed", "content": g.content, "thinking": "", "error": None, "usage": None}))
    await settle(lambda: b.of("reply.final"), timeout=10)
    deltas = b.of("reply.delta")
    position = 0
    for e in deltas:  # contiguous: each starts where the previous ended
        assert e["offset"] == position
        position += len(e["text"])
    assert "".join(e["text"] for e in deltas) == g.content == b.of("reply.final")[0]["content"]
    assert len(deltas) < 40, len(deltas)  # batched: far fewer events than the 205 deltas published


async def test_a_dropped_stream_resumes_from_its_token_and_misses_nothing(pair):
    a, b = pair
    a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": "before", "data": None}))
    await settle(lambda: b.of("push"), timeout=10)
    await super(MongoBus, b.bus).close()  # the listener dies; its resume token stays
    for i in range(3):
        a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": f"while away {i}", "data": None}))
    await asyncio.sleep(0.5)
    assert len(b.of("push")) == 1
    await super(MongoBus, b.bus).start()
    await settle(lambda: len(b.of("push")) == 4, timeout=10)
    assert [e["message"] for e in b.of("push")] == ["before", "while away 0", "while away 1", "while away 2"]


async def test_a_reopened_stream_asks_the_fan_out_to_check_every_viewed_session_from_the_store(pair):
    """Events may have been lost across a reopen: the bus tells its own subscribers at once (`catch_up` with
    `resync`), so user messages whose events are gone are filled from the store; it never crosses instances."""
    a, b = pair
    a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": "before", "data": None}))
    await settle(lambda: b.of("push"), timeout=10)
    assert not [e for e in b.of("catch_up") if e["resync"]]
    await super(MongoBus, b.bus).close()
    await super(MongoBus, b.bus).start()
    await settle(lambda: [e for e in b.of("catch_up") if e["resync"]], timeout=10)
    a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": "after", "data": None}))
    await settle(lambda: len(b.of("push")) == 2, timeout=10)
    assert not [e for e in a.of("catch_up") if e["resync"]] and a.of("catch_up") == [
        e for e in a.of("catch_up") if e["origin"] == "a"]


@pytest.mark.gen_test(timeout=90)
async def test_a_reopened_stream_that_returns_nothing_is_opened_again_from_now(pair):
    """nx-27017 takes a resume token it cannot honour and then returns nothing (MongoDB would refuse it): a
    reopened stream must bring back this instance's own probe, or it is opened again from the present."""
    a, b = pair
    a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": "before", "data": None}))
    await settle(lambda: b.of("push"), timeout=10)
    await super(MongoBus, b.bus).close()
    b.bus.resume_token = {"_data": "nx:999999999"}  # a position this store has never reached
    await super(MongoBus, b.bus).start()
    for i in range(120):  # what is published before the stream is opened again may be lost; later events not
        a.bus.publish(events.decode({"type": "push", "user_id": "u", "message": f"after {i}", "data": None}))
        if len(b.of("push")) > 1:
            break
        await asyncio.sleep(0.5)
    assert len(b.of("push")) > 1, "the stream stayed silent"
    assert b.of("probe") == [] and a.of("probe") == []  # probes are the bus's own business


async def test_the_users_of_an_instance_that_is_gone_leave_when_its_announcements_stop(pair, monkeypatch):
    monkeypatch.setattr(mongo_bus, "INTEREST_REFRESH", 0.2)
    monkeypatch.setattr(mongo_bus, "INTEREST_TTL", 1.5)
    a, b = pair
    a.viewed.add("g1")
    a.users["g1"] = {"alice"}
    b.viewed.add("g1")
    await settle(lambda: b.bus.online_elsewhere("g1") == {"alice"}, timeout=10)
    await asyncio.sleep(2.5)  # a keeps announcing: alice stays, nobody is told she left
    assert b.bus.online_elsewhere("g1") == {"alice"} and not b.of("presence")
    await a.bus.close()  # a is gone without a word (killed): its announcements stop
    await settle(lambda: b.of("presence"), timeout=10)
    assert [(e["event"], e["user_id"], e["origin"]) for e in b.of("presence")] == [("leave", "alice", "a")]
    assert b.bus.online_elsewhere("g1") == set()
    await a.bus.start()  # (the fixture closes it)
