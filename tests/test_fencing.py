"""Fenced ownership and finals that only follow durable writes (one instance; the cluster tests do it across)."""
import asyncio

import pytest

from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=30)


async def test_an_owner_whose_reply_was_ended_elsewhere_cannot_overwrite_it(connect, services, stored_message):
    c = await connect("slow", stream_mode="delta")
    reply_id = (await c.say("about to be taken away"))["data"]["reply_message_id"]
    for _ in range(5):
        await c.recv_type("response")
    # what another instance's reaper does when it believes this instance is gone (a compare-and-set on the epoch
    # it read: a checkpoint renewing the lease meanwhile does not change it)
    doc = await stored_message(reply_id)
    reaped = await services.store.interrupt_abandoned(reply_id, epoch=doc["epoch"])
    assert reaped is not None and reaped["status"] == "interrupted"
    frames = await c.until_final(reply_id)
    final = frames[-1]["data"]
    stored = await stored_message(reply_id)
    assert final["status"] == stored["status"] == "interrupted"
    assert final["content"] == stored["content"] == reaped["content"]
    assert sum(f["data"]["is_final"] for f in frames) == 1
    value = services.metrics.registry.get_sample_value("parley_fenced_writes_refused_total")
    assert value == 1
    await settle(lambda: reply_id not in services.streams.generations)
    assert (await stored_message(reply_id))["status"] == "interrupted"


async def test_checkpoints_append_only_the_new_text(connect, services, monkeypatch):
    writes = []
    real = services.store.checkpoint

    async def recording(message_id, **kw):
        writes.append((kw["offset"], kw["text"]))
        return await real(message_id, **kw)

    monkeypatch.setattr(services.store, "checkpoint", recording)
    c = await connect("slow", stream_mode="delta")
    reply_id = (await c.say("append, do not rewrite"))["data"]["reply_message_id"]
    for _ in range(60):
        await c.recv_type("response")
    await c.send({"type": "stop"})
    final = (await c.until_final(reply_id))[-1]["data"]
    assert len(writes) >= 2
    position = 0
    for offset, text in writes:  # each write starts where the previous one ended
        assert offset == position
        position += len(text)
    assert final["content"].startswith("".join(t for _, t in writes))


async def test_the_final_frame_waits_until_the_end_is_durable(connect, services, stored_message, monkeypatch):
    real = services.store.finish
    attempts = []

    async def flaky(message_id, **kw):
        attempts.append(kw["status"])
        if len(attempts) <= 2:
            raise ConnectionError("store briefly unreachable")
        return await real(message_id, **kw)

    monkeypatch.setattr(services.store, "finish", flaky)
    c = await connect("default", stream_mode="delta")
    reply_id = (await c.say("persist me first"))["data"]["reply_message_id"]
    frames = await c.until_final(reply_id)
    assert len(attempts) == 3
    stored = await stored_message(reply_id)
    assert frames[-1]["data"]["status"] == stored["status"] == "completed"
    assert frames[-1]["data"]["content"] == stored["content"]
    assert sum(f["data"]["is_final"] for f in frames) == 1
    with pytest.raises(asyncio.TimeoutError):
        await c.recv_type("response", timeout=0.3)


async def test_the_end_does_not_wait_for_a_checkpoint_in_flight_nor_take_its_refusal_for_a_fence(connect, services,
                                                                                             stored_message, monkeypatch):
    real_checkpoint, real_finish = services.store.checkpoint, services.store.finish
    ended = asyncio.Event()
    held = []

    async def late(message_id, **kw):  # this checkpoint reaches the store only after the terminal write
        held.append(message_id)
        await ended.wait()
        return await real_checkpoint(message_id, **kw)

    async def finish(message_id, **kw):
        try:
            return await real_finish(message_id, **kw)
        finally:
            ended.set()

    monkeypatch.setattr(services.store, "checkpoint", late)
    monkeypatch.setattr(services.store, "finish", finish)
    c = await connect("slow", stream_mode="delta")
    reply_id = (await c.say("stop me mid-checkpoint"))["data"]["reply_message_id"]
    await settle(lambda: held)
    gen = services.streams.generations[reply_id]
    await c.send({"type": "stop"})
    final = (await c.until_final(reply_id))[-1]["data"]
    await asyncio.wait_for(gen.done.wait(), 10)  # set once the late checkpoint has had its answer
    assert gen.checkpoint_task is None
    stored = await stored_message(reply_id)
    assert final["status"] == stored["status"] == "stopped" and final["content"] == stored["content"]
    assert not services.metrics.registry.get_sample_value("parley_fenced_writes_refused_total")
