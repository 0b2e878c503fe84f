"""Events as data, one fan-out: every event is plain JSON data; one event is encoded once and the same bytes go to
every connection of the same stream mode; a resume crossing a final never gets that final twice."""
import asyncio
import json
import random
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.delivery.replylog import PAGE
from services.storage.store import utcnow
from services.wire import events
from tests.conftest import settle
from tests.test_resume import Received, nothing_more, send_resume

pytestmark = pytest.mark.gen_test(timeout=120)


@pytest.fixture
def recorded(services):
    """Every event published on the bus, as it survives a JSON round trip (and the original, to compare)."""
    seen = []
    services.bus.subscribe(lambda event: seen.append(
        (event, events.decode(json.loads(json.dumps(events.to_builtins(event)))))))
    return seen


async def raw_frames(client, message_id, timeout=10.0):
    """The raw text of every frame of one reply (and its user_message echo), through its final frame."""
    texts = []
    while True:
        text = await client.ws.read_message()  # noqa: the conftest client parses; here the bytes matter
        assert text is not None, "socket closed"
        frame = json.loads(text)
        data = frame.get("data") or {}
        if frame["type"] in ("response", "status") and data.get("message_id") == message_id:
            texts.append(text)
            if data.get("is_final"):
                return texts


def without_connection_id(text):
    frame = json.loads(text)
    frame["data"].pop("connection_id", None)
    return json.dumps(frame, sort_keys=True)


async def scrape(http_client, base_url):
    body = (await http_client.fetch(base_url + "/metrics")).body.decode()
    return {s.name: s.value for family in text_string_to_metric_families(body) for s in family.samples
            if not s.labels}, {(s.name, s.labels.get("type")): s.value
                               for family in text_string_to_metric_families(body) for s in family.samples}


async def test_every_event_is_plain_json_data(connect, fetch, services, recorded):
    code, body = await fetch("/api/v1/pipelines/thinker/sessions", "POST",
                             body={"session_type": "group", "members": ["bo"]})
    group = body["data"]["session_id"]
    a = await connect("thinker", session_id=group)
    b = await connect("thinker", session_id=group, stream_mode="delta")
    ack = await a.say("hello events")
    await a.until_final(ack["data"]["reply_message_id"])
    await b.until_final(ack["data"]["reply_message_id"])
    await fetch("/api/v1/broadcast", "POST", body={"message": "to all"})
    await fetch("/api/v1/users/anyone/push", "POST", body={"message": "to one", "data": {"k": [1, 2]}})
    await fetch(f"/api/v1/pipelines/thinker/sessions/{group}/members", "POST", body={"remove": ["bo"]})
    await fetch(f"/api/v1/pipelines/thinker/sessions/{group}/stop", "POST", body={})
    await fetch(f"/api/v1/pipelines/thinker/sessions/{group}/reset", "POST", body={})
    b.close()
    await settle(lambda: len(services.hub.connections) == 1, timeout=10)
    types = {event.type for event, _ in recorded}
    assert {"user_message", "reply.started", "reply.delta", "reply.final", "broadcast", "push", "members",
            "stop", "reset"} <= types, types
    for event, round_tripped in recorded:
        assert event == round_tripped, event  # nothing a JSON round trip changes: no objects, no tuples
        assert event.origin == services.instance_id and isinstance(event.at, float)
    deltas = [e for e, _ in recorded if e.type == "reply.delta"]
    final = next(e for e, _ in recorded if e.type == "reply.final")
    assert "".join(d.text for d in deltas) == final.content
    assert "".join(d.thinking for d in deltas) == final.thinking


async def test_one_event_one_encoding_the_same_bytes_for_every_viewer(connect, services, http_client, base_url):
    sender = await connect("thinker")
    session = sender.connected["session_id"]
    cumulative = [await connect("thinker", session_id=session) for _ in range(12)]
    delta = [await connect("thinker", session_id=session, stream_mode="delta") for _ in range(12)]
    before, _ = await scrape(http_client, base_url)
    ack = await sender.say("the same bytes")
    reply_id = ack["data"]["reply_message_id"]
    got_cumulative = [await raw_frames(c, reply_id) for c in cumulative]
    got_delta = [await raw_frames(c, reply_id) for c in delta]
    await raw_frames(sender, reply_id)
    after, by_type = await scrape(http_client, base_url)
    for group in (got_cumulative, got_delta):
        first = [without_connection_id(t) for t in group[0]]
        assert len(first) > 3  # status, several chunks, the final
        for texts in group[1:]:
            assert [without_connection_id(t) for t in texts] == first
    assert got_cumulative[0] != got_delta[0]
    assert got_cumulative[0][-1].replace(json.loads(got_cumulative[0][-1])["data"]["connection_id"], "") == \
        got_delta[0][-1].replace(json.loads(got_delta[0][-1])["data"]["connection_id"], "")  # one final
    encoded = after["parley_frames_encoded_total"] - before["parley_frames_encoded_total"]
    # per mode: the frames one viewer got, and the chunks its busy socket merged into them (services/wire/outbox.py)
    merged = sum(services.hub.connections[c[0].connected["connection_id"]].outbox.merged
                 for c in (cumulative, delta))
    distinct = len(got_cumulative[0]) + len(got_delta[0]) + merged + 1  # the sender's echo and ack aside
    # 25 viewers: one encoding per distinct frame (status and final shared by both modes), not one per viewer
    assert 0 < encoded <= distinct + 2, (encoded, distinct)


async def test_a_resume_crossing_the_final_never_gets_a_second_final(connect, services, stored_message):
    """A viewer resumes a reply as it ends, many times: exactly one final each time, nothing after it, and the
    text is whole. (Before the fan-out owned the cursors, about one try in ten got `final, resumed, delta,
    final`.) A tenth of the tries resume right after the final went out, which always crossed it."""
    rng = random.Random(20261129)
    sender = await connect("resumable", stream_mode="delta")
    session = sender.connected["session_id"]
    viewer = await connect("resumable", session_id=session, stream_mode="delta")
    reference = (await sender.say("how long is a reply"))["data"]["reply_message_id"]
    length = len(await sender.until_final(reference))
    await viewer.until_final(reference)
    crossed = 0
    for run in range(120):
        reply_id = (await sender.say(f"try {run}"))["data"]["reply_message_id"]
        cut = length if run % 10 == 0 else rng.randrange(max(0, length - 8), length)
        seen, sender_done = 0, False
        while seen < cut and not sender_done:
            frame = await sender.recv_type("response")
            seen += 1
            sender_done = frame["data"]["is_final"]
        got = Received(reply_id)
        resumed, early = await send_resume(viewer, got)
        crossed += early
        [entry] = resumed["data"]["replies"]
        while not got.finals:
            frame = await viewer.recv_type("response")
            if frame["data"]["message_id"] == reply_id:
                got.add(frame)
        await nothing_more(viewer, reply_id)
        assert len(got.finals) == 1
        stored = await stored_message(reply_id)
        assert got.finals[0]["content"] == stored["content"] and got.finals[0]["status"] == "completed"
        if early:
            assert entry["status"] == "completed"
        else:
            assert got.joined(got.text) == stored["content"]
            assert got.joined(got.thinking) == stored["thinking"]
        if not sender_done:
            await sender.until_final(reply_id)
    assert crossed >= 12  # at least the tries that resumed after the final was sent


async def test_a_huge_finished_reply_resumes_in_pages_then_one_final(connect, services, stored_message):
    """A reply of more than 524,288 code points (its final frame alone, text twice, is over the 1 MB outbox
    limit): a delta-mode resume gets it in frames of at most 256 KB, made as the client reads them, then the one
    final, and the connection is not closed as a slow consumer."""
    a = await connect("huge", stream_mode="delta")
    reply_id = (await a.say("a very long answer"))["data"]["reply_message_id"]
    a.close()
    await settle(lambda: reply_id not in services.streams.generations, timeout=60)
    stored = await stored_message(reply_id)
    assert stored["status"] == "completed" and len(stored["content"]) > 524_288 and len(stored["thinking"]) > PAGE
    b = await connect("huge", stream_mode="delta")
    await b.send({"type": "resume", "message_id": reply_id, "offset": 0, "thinking_offset": 0})
    await b.recv_type("resumed")
    got, sizes = Received(reply_id), []
    while not got.finals:
        text = await asyncio.wait_for(b.ws.read_message(), 30)
        assert text is not None, "closed: %s %s" % (b.ws.close_code, b.ws.close_reason)
        frame = json.loads(text)
        if frame["type"] == "response" and frame["data"]["message_id"] == reply_id:
            sizes.append(len(text.encode()))
            got.add(frame)
    assert len(sizes) >= 12 and max(sizes[:-1]) <= 256 * 1024, sizes
    assert got.joined(got.text) == stored["content"] == got.finals[0]["content"]
    assert got.joined(got.thinking) == stored["thinking"] == got.finals[0]["thinking"]
    await nothing_more(b, reply_id)


async def test_deltas_from_another_instance_are_applied_by_their_offsets(connect, services):
    """What the cluster bus relies on, on one box: events of another origin (through Bus.receive) reach the
    viewers here; a delta overlapping the text already delivered is trimmed, a repeat dropped, an event of our
    own origin coming back is skipped, and exactly one final arrives. Nothing is kept after it."""
    a = await connect("default", stream_mode="delta")
    session_id = a.connected["session_id"]
    reply = {"session_id": session_id, "message_id": "remote-reply", "seq": 2, "reply_to": "remote-question",
             "origin": "elsewhere", "at": time.time()}
    services.bus.receive(events.decode({"type": "reply.started", "status": "streaming", "stream": True, **reply}))
    assert (await a.recv_type("status"))["data"]["message_id"] == "remote-reply"
    for offset, text in ((0, "Hello, "), (3, "lo, wor"), (7, "world!"), (12, "!"), (15, "gap")):
        services.bus.receive(events.decode({"type": "reply.delta", "offset": offset, "text": text, "thinking_offset": 0,
                              "thinking": "", **reply}))
        await idle_socket(services, a)  # each delta its own frame (a busy socket would merge them)
    services.bus.receive(events.decode({"type": "reply.delta", "offset": 13, "text": " Bye.", "thinking_offset": 0,
                          "thinking": "", **reply, "origin": services.instance_id}))  # our own: skipped
    services.bus.receive(events.decode({"type": "reply.final", "status": "completed", "content": "Hello, world!",
                          "thinking": "", "error": None, "usage": None, **reply}))
    got = Received("remote-reply")
    chunks = await chunks_until_final(a, got)
    assert chunks == [(0, "Hello, "), (7, "wor"), (10, "ld!")]
    assert got.joined(got.text) == "Hello, world!" == got.finals[0]["content"]
    assert "remote-reply" not in services.fanout.replies.logs


async def idle_socket(services, client):
    """Until the server has no write of this client's in flight: the next frame goes out on its own."""
    conn = services.hub.connections[client.connected["connection_id"]]
    await settle(lambda: not conn.outbox.in_flight, timeout=10)


async def chunks_until_final(client, got):
    """The (offset, delta) of every non-final response frame until the final (added to `got`), then nothing more."""
    chunks = []
    while not got.finals:
        frame = await client.recv_type("response")
        got.add(frame)
        if not frame["data"]["is_final"]:
            chunks.append((frame["data"]["offset"], frame["data"]["delta"]))
    await nothing_more(client, got.message_id)
    return chunks


async def test_a_reply_generating_on_another_instance_is_followed_from_its_checkpoint(connect, services):
    """A client resumes here a reply generating elsewhere (stored with its checkpoint; its deltas and final come
    as events of another origin): the fan-out takes the stored text as the start (FanOut.follow), so the next
    deltas continue it at once, trimmed where they overlap it, a repeat dropped; then exactly one final."""
    a = await connect("default", stream_mode="delta")
    session_id = a.connected["session_id"]
    seq = await services.store.next_seqs(session_id, 2)
    now = utcnow()
    base = {"session_id": session_id, "pipeline": "default", "created_at": now, "updated_at": now}
    await services.store.insert_messages([
        {"_id": "remote-question", "seq": seq, "role": "user", "content": "hi", "status": "completed", **base},
        {"_id": "remote-reply", "seq": seq + 1, "role": "assistant", "reply_to": "remote-question",
         "content": "", "text_parts": ["Hello, ", "wor"], "thinking": "", "status": "streaming", "epoch": 1,
         "length": 10, "thinking_length": 0, "instance": "elsewhere", "lease_until": time.time() + 300, **base}])
    await a.send({"type": "resume", "message_id": "remote-reply", "offset": 3, "thinking_offset": 0})
    resumed = await a.recv_type("resumed")
    assert [(r["status"], r["offset"], r["length"]) for r in resumed["data"]["replies"]] == [("streaming", 3, 10)]
    got = Received("remote-reply")
    got.text = dict(enumerate("Hel"))
    reply = {"session_id": session_id, "message_id": "remote-reply", "seq": seq + 1, "reply_to": "remote-question",
             "epoch": 1, "origin": "elsewhere", "at": time.time()}
    for offset, text in ((7, "world"), (12, "!"), (12, "!")):  # overlaps the checkpoint; then a repeat
        services.bus.receive(events.decode({"type": "reply.delta", "offset": offset, "text": text, "thinking_offset": 0,
                              "thinking": "", **reply}))
    chunks = []
    while len(got.text) < len("Hello, world!"):  # live deltas: they arrive before the final is even published
        frame = await a.recv_type("response")
        got.add(frame)
        chunks.append((frame["data"]["offset"], frame["data"]["delta"]))
    services.bus.receive(events.decode({"type": "reply.final", "status": "completed", "content": "Hello, world!",
                          "thinking": "", "error": None, "usage": None, **reply}))
    assert await chunks_until_final(a, got) == []
    # the catch-up, then the live text trimmed where it overlapped (a socket busy meanwhile merges the deltas)
    assert chunks[0] == (3, "lo, wor") and chunks[1][0] == 10 and "".join(d for _, d in chunks[1:]) == "ld!"
    assert got.joined(got.text) == "Hello, world!" == got.finals[0]["content"]
    assert "remote-reply" not in services.fanout.replies.logs
