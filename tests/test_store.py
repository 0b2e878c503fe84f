"""The store against the real MongoDB-wire server: atomic numbering, timestamps that stay dates, recency order."""
import asyncio
from datetime import datetime

import pytest

pytestmark = pytest.mark.gen_test(timeout=20)


async def test_seq_numbers_are_unique_and_contiguous_under_concurrency(services):
    store = services.store
    session = await store.create_session(pipeline="default", session_type="person", owner="u")
    firsts = await asyncio.gather(*(store.next_seqs(session["_id"], 2) for _ in range(40)))
    assert sorted(firsts) == list(range(1, 81, 2))


async def test_timestamps_written_by_updates_read_back_as_dates(connect, services):
    c = await connect("slow")
    ack = await c.say("stamp me")
    await c.recv_type("response")
    await c.send({"type": "stop"})
    await c.until_final(ack["data"]["reply_message_id"])
    reply = await services.store.get_message(ack["data"]["reply_message_id"])
    for _ in range(500):  # the durable stop (stop_requested_at) is written in the background: may trail the final
        if "stop_requested_at" in reply:
            break
        await asyncio.sleep(0.01)
        reply = await services.store.get_message(ack["data"]["reply_message_id"])
    session = await services.store.get_session(ack["data"]["session_id"])
    for value in (reply["started_at"], reply["updated_at"], reply["finished_at"], reply["stop_requested_at"],
                  session["updated_at"]):
        assert isinstance(value, datetime) and value.tzinfo is not None, value
    assert reply["created_at"] <= reply["started_at"] <= reply["finished_at"]


async def test_sessions_are_listed_most_recently_active_first(connect, fetch):
    ids = []
    for title in ("a", "b", "c"):
        code, body = await fetch("/api/v1/pipelines/default/sessions", "POST", body={"title": title})
        ids.append(body["data"]["session_id"])
    c = await connect(session_id=ids[0])  # the oldest session becomes the most recent
    ack = await c.say("bump")
    await c.until_final(ack["data"]["reply_message_id"])
    code, body = await fetch("/api/v1/pipelines/default/sessions")
    listed = [s["session_id"] for s in body["data"]["sessions"] if s["session_id"] in ids]
    assert listed == [ids[0], ids[2], ids[1]]
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{ids[0]}")
    assert code == 200 and body["data"]["last_seq"] == 2


async def test_sessions_stored_before_updated_ms_existed_are_listed_after_an_upgrade(services, fetch):
    """A session document written by an older Parley (no `updated_ms`) is still listed, in its place, once the
    store's start-up (create_indexes) has run."""
    store = services.store
    old = await store.create_session(pipeline="default", session_type="person", owner="local", title="old")
    await store.sessions.update_one({"_id": old["_id"]}, {"$unset": {"updated_ms": ""}})
    new = await store.create_session(pipeline="default", session_type="person", owner="local", title="new")
    await store.db.migrations.delete_many({})  # a store written by an older Parley has no migration marker
    await store.create_indexes()
    ids = []
    cursor = None
    for _ in range(10):  # pages of one: the range query must find the upgraded session too
        code, body = await fetch("/api/v1/pipelines/default/sessions?limit=1" + (f"&cursor={cursor}" if cursor else ""))
        assert code == 200, body
        ids += [s["session_id"] for s in body["data"]["sessions"]]
        cursor = body["data"].get("next_cursor")
        if not cursor:
            break
    assert ids.index(new["_id"]) < ids.index(old["_id"])


async def test_the_updated_ms_migration_runs_once_per_store(services):
    """Its query is a collection scan on MongoDB: after the first start-up it is not run again."""
    store = services.store
    assert await store.db.migrations.find_one({"_id": "sessions.updated_ms"})  # start-up ran it
    late = await store.create_session(pipeline="default", session_type="person", owner="local")
    await store.sessions.update_one({"_id": late["_id"]}, {"$unset": {"updated_ms": ""}})
    await store.create_indexes()  # the next start-up
    assert "updated_ms" not in await store.get_session(late["_id"])
