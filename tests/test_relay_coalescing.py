"""A busy socket gets merged chunks: while a write of a connection is in flight (Tornado has not resolved its
future yet), chunks of a reply wait in its outbox and go out merged when the write completes. The text, offsets,
final frame and resume stay exact; a socket that is idle gets each frame at once."""
import asyncio
import json

import pytest
from tornado.concurrent import Future

from services.providers.demo import DemoProvider
from services.wire.outbox import Outbox, encode
from services.wire.schema import Presence, PresenceData, ReplyData, Response
from tests.test_resume import Received, follow, nothing_more, send_resume


def reply_frame(mid="m", is_final=False, **fields):
    return Response(session_type="person", data=ReplyData(
        id=2, role="assistant", timestamp="t", is_final=is_final, connection_id="", session_id="s", message_id=mid,
        seq=2, reply_to=None, **fields))


def chunk(offset, text, mid="m", **extra):
    return reply_frame(mid, offset=offset, delta=text, **extra)


def final(content, mid="m"):
    return reply_frame(mid, is_final=True, content=content, status="completed")


class Socket:
    """A write whose future the test resolves: the socket is busy until then."""

    def __init__(self):
        self.written, self.pending = [], []

    def write(self, text):
        self.written.append(text)
        future = Future()
        self.pending.append(future)
        return future

    def complete(self):
        pending, self.pending = self.pending, []
        for future in pending:
            future.set_result(None)


async def turn():
    """Let the loop run the write futures' callbacks."""
    for _ in range(3):
        await asyncio.sleep(0)


def decoded(socket):
    return [json.loads(t) for t in socket.written]


@pytest.mark.gen_test
async def test_chunks_wait_while_a_write_is_in_flight_and_go_out_merged_when_it_completes():
    sock = Socket()
    box = Outbox(sock.write, limit=10**9, on_overflow=lambda: None)
    box.put(chunk(0, "ab"))                 # idle socket: at once
    assert len(sock.written) == 1
    box.put(chunk(2, "cd"))                 # busy: held
    box.put(chunk(4, "e", thinking_offset=0, thinking_delta="hm"))
    box.put(Presence(data=PresenceData(session_id="s", event="snapshot", online=[])))  # waits in order, unmerged
    box.put(chunk(5, "f"))                  # merges into the waiting chunk of its reply
    assert len(sock.written) == 1 and box.merged == 2
    sock.complete()
    await turn()
    frames = decoded(sock)
    assert [f["type"] for f in frames] == ["response", "response", "presence"]
    merged = frames[1]["data"]
    assert (merged["offset"], merged["delta"]) == (2, "cdef")
    assert (merged["thinking_offset"], merged["thinking_delta"]) == (0, "hm")
    # the socket is busy again with those two writes: the final waits, and is never merged into a chunk
    box.put(chunk(6, "g"))
    box.put(final("abcdefg"))
    sock.complete()
    await turn()
    frames = decoded(sock)
    assert [(f["data"].get("delta"), f["data"]["is_final"]) for f in frames[3:]] == [("g", False), (None, True)]
    sock.complete()
    await turn()
    assert box.in_flight == 0 and box.waiting_size == 0 and not box.waiting and not box.chunks
    box.put(chunk(0, "x", mid="n"))         # idle again: at once
    assert len(sock.written) == 6


@pytest.mark.gen_test
async def test_a_busy_cumulative_socket_gets_the_newest_text_from_the_oldest_offset():
    sock = Socket()
    box = Outbox(sock.write, limit=10**9, on_overflow=lambda: None)

    def cumulative(offset, content):
        return reply_frame(offset=offset, content=content)
    box.put(cumulative(0, "a"))
    box.put(cumulative(1, "ab"))
    box.put(cumulative(2, "abc"))
    sock.complete()
    await turn()
    frames = decoded(sock)
    assert [(f["data"]["offset"], f["data"]["content"]) for f in frames] == [(0, "a"), (1, "abc")]


@pytest.mark.gen_test
async def test_a_closed_socket_drops_what_waits():
    sock = Socket()
    box = Outbox(sock.write, limit=10**9, on_overflow=lambda: None)
    box.put(chunk(0, "a"))
    box.put(chunk(1, "b"))
    sock.pending[0].set_exception(ConnectionError("gone"))
    await turn()
    assert box.in_flight == 0


@pytest.mark.gen_test(timeout=120)
async def test_a_reply_at_full_speed_is_merged_and_arrives_exact(connect, services, stored_message):
    """`bulk`: 3,000 words as fast as the provider makes them, one chunk per word. The socket is busy whenever a
    chunk comes (the previous write is in flight), so chunks merge; the client still gets every character
    once, each delta where the previous ended, then one final equal to the stored text."""
    client = await connect("bulk", stream_mode="delta")
    ack = await client.say("merge me")
    got = Received(ack["data"]["reply_message_id"])
    frames = 0
    while not got.finals:
        frame = await client.recv_type("response", timeout=20)
        got.add(frame)
        frames += 1
    await nothing_more(client, got.message_id)
    stored = await stored_message(got.message_id)
    assert got.joined(got.text) == got.finals[0]["content"] == stored["content"]
    chunks = len(DemoProvider(services.streams.pipelines.get("bulk")).answer("merge me"))
    conn = services.hub.connections[client.connected["connection_id"]]
    assert conn.outbox.merged > 0 and frames - 1 < chunks, (frames, chunks)  # fewer frames than chunks
    assert frames - 1 + conn.outbox.merged == chunks  # each chunk sent once: in its own frame or merged


@pytest.mark.gen_test(timeout=120)
async def test_a_resume_into_a_busy_reply_continues_exactly(connect, services, stored_message):
    """A second tab resumes from the middle of a reply streaming at full speed: its catch-up and the merged live
    chunks after it give exactly the text after its offset, and its final."""
    first_tab = await connect("torrent", stream_mode="delta")
    ack = await first_tab.say("resume into me")
    first = Received(ack["data"]["reply_message_id"])
    for _ in range(20):
        first.add(await first_tab.recv_type("response", timeout=20))
    assert not first.finals
    offset = len(first.text) // 2
    second = await connect("torrent", stream_mode="delta", session_id=first_tab.connected["session_id"])
    got = Received(first.message_id)
    got.text = {i: ch for i, ch in first.text.items() if i < offset}  # what a client that dropped had
    resumed, early = await send_resume(second, got)
    [entry] = resumed["data"]["replies"]
    assert entry["offset"] == offset and entry["status"] == "streaming" and not early, entry
    await follow(second, got, timeout=20)
    await follow(first_tab, first, timeout=20)
    stored = await stored_message(first.message_id)
    assert len(got.finals) == 1 and len(first.finals) == 1
    assert got.joined(got.text) == first.joined(first.text) == stored["content"]


@pytest.mark.gen_test
async def test_the_next_delta_joins_a_waiting_chunk_without_a_frame_and_never_changes_a_shared_one():
    """Outbox.extend (the fan-out's way to hand a busy socket the next text of a reply): it joins the chunk
    waiting there, copying it first when the frame is still the one the fan-out shared with other sockets."""
    a, b = Socket(), Socket()
    boxes = [Outbox(s.write, limit=10**9, on_overflow=lambda: None) for s in (a, b)]
    for box in boxes:
        box.put(chunk(0, "ab"))
    shared = chunk(2, "cd")
    text = encode(shared)
    for box in boxes:
        box.put(shared, text, len(text))          # both busy: the same frame waits in both
    assert boxes[0].extend("m", 4, "é\"", 0, "", "t2")
    assert boxes[0].extend("m", 0, "", 0, "hm", "t3")        # reasoning joins too, from its own offset
    assert not boxes[0].extend("m", 5, "x", 2, "", "t4")     # not where the text ends: the caller makes a frame
    assert not boxes[0].extend("other", 0, "x", 0, "", "t4")  # nothing of that reply waits
    assert shared.data.delta == "cd" and json.loads(text)["data"]["delta"] == "cd"
    a.complete()
    b.complete()
    await turn()
    got_a, got_b = decoded(a)[1]["data"], decoded(b)[1]["data"]
    assert (got_a["offset"], got_a["delta"], got_a["thinking_offset"], got_a["thinking_delta"], got_a["timestamp"]) \
        == (2, 'cdé"', 0, "hm", "t3")
    assert (got_b["offset"], got_b["delta"]) == (2, "cd") and "thinking_delta" not in got_b
    assert boxes[0].merged == 2 and boxes[0].waiting_size == 0


@pytest.mark.gen_test
async def test_a_waiting_cumulative_chunk_is_never_extended():
    sock = Socket()
    box = Outbox(sock.write, limit=10**9, on_overflow=lambda: None)
    box.put(reply_frame(offset=0, content="a"))
    box.put(reply_frame(offset=1, content="ab"))
    assert not box.extend("m", 2, "c", 0, "", "t")
