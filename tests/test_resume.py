"""Resume over real sockets: cut a streaming reply anywhere, reconnect, resume; no gap, no duplicate."""
import asyncio
import random
import time

import pytest

from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=120)

PIPE = "resumable"


class Received:
    """What one client got of one reply, across connections: every character counted by its offset."""

    def __init__(self, message_id):
        self.message_id = message_id
        self.text = {}      # offset -> character
        self.thinking = {}
        self.finals = []

    def add(self, frame):
        data = frame["data"]
        assert data["message_id"] == self.message_id
        if frame["type"] == "rewind":  # text past the offsets is void (its instance was lost): dropped
            self.cut(data["offset"], data["thinking_offset"])
            return
        if data["is_final"]:
            self.finals.append(data)
            return
        for key, delta, offset, store in (("delta", "delta", "offset", self.text),
                                          ("thinking_delta", "thinking_delta", "thinking_offset", self.thinking)):
            if key in data:
                # contiguous: each delta starts where this client's text ends
                assert data[offset] == len(store), (key, data[offset], len(store))
                for i, ch in enumerate(data[delta]):
                    assert data[offset] + i not in store, f"offset {data[offset] + i} received twice"
                    store[data[offset] + i] = ch

    def cut(self, offset, thinking_offset):
        """Drop what lies past the offsets (a `rewind`, or `resumed` continuing from less than is held)."""
        self.text = {i: c for i, c in self.text.items() if i < offset}
        self.thinking = {i: c for i, c in self.thinking.items() if i < thinking_offset}

    @property
    def offsets(self):
        return {"offset": len(self.text), "thinking_offset": len(self.thinking)}

    def joined(self, store):
        assert sorted(store) == list(range(len(store)))  # every offset exactly once, none missing
        return "".join(store[i] for i in range(len(store)))


def abort(client, how):
    if how == "close":
        client.ws.close()
    else:  # tear the TCP connection down with no close frame, as a lost network does
        client.ws.protocol.stream.close()


async def follow(client, got, timeout=10.0):
    """Read this reply's frames (its text, rewinds) through its final frame."""
    while not got.finals:
        frame = await client.recv_type("response", "rewind", timeout=timeout)
        if frame["data"]["message_id"] == got.message_id:
            got.add(frame)


async def nothing_more(client, message_id):
    """After the final frame nothing of the message arrives: a ping round-trips with no response in between."""
    await client.send({"type": "ping"})
    while (frame := await client.recv())["type"] != "pong":
        assert frame["type"] != "response" or frame["data"]["message_id"] != message_id, frame


async def cut_and_resume(connect, services, stored_message, session_id, run, rng):
    a = await connect(PIPE, session_id=session_id, stream_mode="delta")
    client_msg_id = f"run-{run}"
    message = {"type": "message", "message": [{"type": "Plain", "text": f"run {run}"}],
               "client_msg_id": client_msg_id}
    await a.send(message)
    cut = rng.randrange(-1, 60)  # -1: the connection drops before the ack; ~66 deltas per reply
    got = None
    if cut >= 0:
        ack = await a.recv_type("ack")
        got = Received(ack["data"]["reply_message_id"])
        for _ in range(cut):
            frame = await a.recv_type("response")
            got.add(frame)
        assert not got.finals
    abort(a, rng.choice(("close", "reset")))
    if got is not None and run % 10 == 0:
        # every tenth run resumes only after the reply has ended, so the finished path runs however busy the
        # machine is (the others mostly catch it live)
        await settle(lambda: got.message_id not in services.streams.generations, timeout=20)

    b = await connect(PIPE, session_id=session_id, stream_mode="delta")
    if got is None:
        # The sender never learned whether its message landed: resending with the same client_msg_id returns
        # the original's ids if it did (duplicate) and sends it if not; either way one reply exists.
        ack = await b.say(f"run {run}", client_msg_id=client_msg_id)
        assert ack["type"] == "ack" and ack["data"]["client_msg_id"] == client_msg_id, ack
        got = Received(ack["data"]["reply_message_id"])
    resumed, early = await send_resume(b, got)
    [entry] = resumed["data"]["replies"]
    assert entry["message_id"] == got.message_id and entry["offset"] == len(got.text)
    assert entry["thinking_offset"] == len(got.thinking)
    await follow(b, got)
    await nothing_more(b, got.message_id)
    b.close()

    final = got.finals[0]
    stored = await stored_message(got.message_id)
    assert len(got.finals) == 1
    assert final["status"] == stored["status"] == "completed"
    if early:  # the final crossed the resume: it carries the whole text, and nothing follows it
        assert entry["status"] == "completed"
        assert final["content"].startswith(got.joined(got.text)) and final["content"] == stored["content"]
        assert final["thinking"].startswith(got.joined(got.thinking)) and final["thinking"] == stored["thinking"]
    else:
        assert got.joined(got.text) == final["content"] == stored["content"]
        assert got.joined(got.thinking) == final["thinking"] == stored["thinking"]
    return entry["status"]


async def send_resume(client, got):
    """Send `resume` with what `got` holds; return the `resumed` frame and whether this reply's final arrived
    before it (the live stream sent it as the client asked). Deltas sent before `resumed` are not counted: the
    resume asks again from the client's offsets."""
    await client.send({"type": "resume", "message_id": got.message_id, **got.offsets})
    early = False
    while (frame := await client.recv_type("resumed", "error", "response"))["type"] == "response":
        if frame["data"]["message_id"] == got.message_id and frame["data"]["is_final"]:
            got.add(frame)
            early = True
    assert frame["type"] == "resumed", frame
    for entry in frame["data"]["replies"]:  # where this connection continues: what is held past it is void
        if entry["message_id"] == got.message_id and not got.finals:
            got.cut(entry["offset"], entry["thinking_offset"])
    return frame, early


async def test_200_cuts_at_random_points_resume_with_no_gap_and_no_duplicate(connect, fetch, services, stored_message):
    workers, runs_each = 4, 50
    rng = random.Random(20261121)
    statuses = []
    started = time.monotonic()

    async def worker(w):
        code, body = await fetch(f"/api/v1/pipelines/{PIPE}/sessions", "POST", body={})
        assert code == 201
        session_id = body["data"]["session_id"]
        for i in range(runs_each):
            statuses.append(await cut_and_resume(connect, services, stored_message, session_id, w * runs_each + i, rng))
        return session_id

    sessions = await asyncio.gather(*(worker(w) for w in range(workers)))
    elapsed = time.monotonic() - started
    print(f"\n200 cut-and-resume runs in {elapsed:.1f} s; resumed while {sorted(set(statuses))}: "
          f"{ {s: statuses.count(s) for s in set(statuses)} }")
    assert len(statuses) == workers * runs_each
    # both paths ran: resumed live from the buffer and resumed after the reply had finished
    assert statuses.count("streaming") >= 20 and statuses.count("completed") >= 15, statuses
    for session_id in sessions:  # one user message and one reply per run: no resend started a second one
        docs = await services.store.list_messages(session_id, limit=500)
        assert len(docs) == 2 * runs_each
        assert all(d["status"] == "completed" for d in docs)


async def test_second_tab_joins_mid_reply_and_resumes_the_whole_session(connect, services, stored_message):
    a = await connect("slow", stream_mode="delta")
    ack = await a.say("a long story")
    reply_id = ack["data"]["reply_message_id"]
    got_a = Received(reply_id)
    for _ in range(20):
        got_a.add(await a.recv_type("response"))
    b = await connect("slow", session_id=a.connected["session_id"], stream_mode="delta")
    # a delta-mode viewer that joined mid-reply gets nothing of it until it resumes
    await nothing_more(b, reply_id)
    await b.send({"type": "resume"})  # every live reply of the session this connection views
    resumed = await b.recv_type("resumed")
    assert [r["message_id"] for r in resumed["data"]["replies"]] == [reply_id]
    assert resumed["data"]["replies"][0]["offset"] == 0 and resumed["data"]["replies"][0]["status"] == "streaming"
    got_b = Received(reply_id)
    first = await b.recv_type("response")
    got_b.add(first)
    assert first["data"]["offset"] == 0 and len(first["data"]["delta"]) >= len(got_a.text)  # the catch-up
    for _ in range(10):
        got_b.add(await b.recv_type("response"))
    await a.send({"type": "stop"})
    await follow(a, got_a)
    await follow(b, got_b)
    stored = await stored_message(reply_id)
    for got in (got_a, got_b):
        assert len(got.finals) == 1 and got.finals[0]["status"] == "stopped"
        assert got.joined(got.text) == stored["content"]


async def test_session_resume_names_a_finished_reply_and_picks_up_live_ones(connect, services):
    a = await connect("resumable", stream_mode="delta")
    first = (await a.say("first"))["data"]["reply_message_id"]
    done = Received(first)
    await follow(a, done)
    a.close()
    b = await connect("resumable", session_id=a.connected["session_id"], stream_mode="delta")
    await b.send({"type": "resume", "offsets": {first: {"offset": 5, "thinking_offset": 3}}})
    resumed = await b.recv_type("resumed")
    assert [(r["message_id"], r["status"], r["offset"]) for r in resumed["data"]["replies"]] == \
        [(first, "completed", 5)]
    rest = await b.recv_type("response")
    assert rest["data"]["offset"] == 5 and rest["data"]["delta"] == done.joined(done.text)[5:]
    assert rest["data"]["thinking_offset"] == 3 and rest["data"]["thinking_delta"] == done.joined(done.thinking)[3:]
    final = await b.recv_type("response")
    assert final["data"]["is_final"] and final["data"]["status"] == "completed"
    assert final["data"]["content"] == done.finals[0]["content"]
    await nothing_more(b, first)


async def test_resume_after_completion_sends_the_rest_and_one_final(connect, services, stored_message):
    a = await connect("resumable", stream_mode="delta")
    ack = await a.say("finish first")
    reply_id = ack["data"]["reply_message_id"]
    got = Received(reply_id)
    for _ in range(7):
        got.add(await a.recv_type("response"))
    abort(a, "reset")
    for _ in range(300):  # it goes on without its sender
        if (await stored_message(reply_id))["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    b = await connect("resumable", stream_mode="delta")
    await b.send({"type": "resume", "message_id": reply_id, **got.offsets})
    resumed = await b.recv_type("resumed")
    assert resumed["data"]["replies"][0]["status"] == "completed"
    await follow(b, got)
    stored = await stored_message(reply_id)
    assert got.joined(got.text) == stored["content"] and got.joined(got.thinking) == stored["thinking"]
    # resuming from the very end: only the terminal frame
    await b.send({"type": "resume", "message_id": reply_id, "offset": len(stored["content"]),
                  "thinking_offset": len(stored["thinking"])})
    await b.recv_type("resumed")
    frame = await b.recv_type("response")
    assert frame["data"]["is_final"] and frame["data"]["content"] == stored["content"]
    await nothing_more(b, reply_id)


async def test_cumulative_resume_is_self_contained(connect, services):
    a = await connect("slow")
    reply_id = (await a.say("cumulative"))["data"]["reply_message_id"]
    for _ in range(5):
        await a.recv_type("response")
    b = await connect("slow", session_id=a.connected["session_id"])
    await b.send({"type": "resume", "message_id": reply_id, "offset": 3})
    await b.recv_type("resumed")
    frame = await b.recv_type("response")
    data = frame["data"]
    assert data["offset"] == 3 and data["content"].startswith('You said "cumulative"') and not data["is_final"]
    nxt = await b.recv_type("response")
    assert nxt["data"]["offset"] == len(data["content"]) and nxt["data"]["content"].startswith(data["content"])
    await a.send({"type": "stop"})
    frames = await b.until_final(reply_id)
    assert frames[-1]["data"]["status"] == "stopped"


async def test_resume_errors(connect, fetch, services):
    a = await connect("resumable", stream_mode="delta")
    ack = await a.say("errors")
    got = Received(ack["data"]["reply_message_id"])
    await follow(a, got)
    length = len(got.finals[0]["content"])
    cases = [
        ({"message_id": "no-such-message"}, "message_not_found"),
        ({"message_id": ack["data"]["message_id"]}, "message_not_found"),  # a user message is not a reply
        ({"message_id": got.message_id, "offset": length + 1}, "invalid_offset"),
        ({"message_id": got.message_id, "offset": -1}, "invalid_param"),
        ({"message_id": got.message_id, "offset": "3"}, "invalid_param"),
        ({"message_id": got.message_id, "offset": True}, "invalid_param"),
        ({"message_id": {"$ne": None}}, "invalid_param"),
        ({"offsets": {"no-such-message": {"offset": 0}}}, "message_not_found"),
        ({"offsets": [1, 2]}, "invalid_param"),
        ({"session_id": "someone-elses"}, "session_not_found"),
    ]
    # a reply of another pipeline is foreign to this connection: indistinguishable from unknown
    other = await connect("default")
    foreign = (await other.say("elsewhere"))["data"]["reply_message_id"]
    cases.append(({"message_id": foreign}, "message_not_found"))
    for body, code in cases:
        await a.send({"type": "resume", **body})
        frame = await a.recv_type("error", "resumed", "response")
        assert frame["type"] == "error" and frame["code"] == code and frame["request_type"] == "resume", (body, frame)
    # the socket stays usable
    await a.send({"type": "resume", "message_id": got.message_id, "offset": length})
    assert (await a.recv_type("resumed", "error"))["type"] == "resumed"


async def test_resume_by_message_makes_the_connection_a_viewer_of_its_session(connect, fetch, services):
    code, body = await fetch("/api/v1/pipelines/resumable/sessions", "POST", body={"session_type": "group"})
    group_id = body["data"]["session_id"]
    a = await connect(PIPE, session_id=group_id, stream_mode="delta")
    first = Received((await a.say("in the group"))["data"]["reply_message_id"])
    await follow(a, first)
    b = await connect(PIPE, stream_mode="delta")  # views its own session, not the group
    assert b.connected["session_id"] != group_id
    await b.send({"type": "resume", "message_id": first.message_id, "offset": len(first.text),
                  "thinking_offset": len(first.thinking)})
    resumed = await b.recv_type("resumed")
    assert resumed["data"]["session_id"] == group_id
    assert (await b.recv_type("response"))["data"]["is_final"]
    code, body = await fetch(f"/api/v1/pipelines/{PIPE}/ws/connections")
    [listed] = [c for c in body["data"]["connections"] if c["connection_id"] == b.connected["connection_id"]]
    assert code == 200 and group_id in listed["session_ids"]
    ack = await a.say("after the resume")  # b now gets the group's later frames
    echo = await b.recv_type("user_message")
    assert echo["data"]["message_id"] == ack["data"]["message_id"]
    got = Received(ack["data"]["reply_message_id"])
    await follow(b, got)
    assert got.joined(got.text) == got.finals[0]["content"]


async def test_connected_lists_the_live_replies_to_resume(connect, services):
    a = await connect("slow", stream_mode="delta")
    assert a.connected["live_replies"] == []
    ack = await a.say("keep going")
    reply = ack["data"]["reply_message_id"]
    await a.recv_type("response")
    b = await connect("slow", stream_mode="delta", session_id=a.connected["session_id"])
    [live] = b.connected["live_replies"]
    assert live["message_id"] == reply and live["status"] == "streaming" and live["length"] > 0
    await b.send({"type": "resume", "message_id": reply, "offset": 0})
    await b.recv_type("resumed")
    await b.send({"type": "stop"})
    frames = await b.until_final(reply)
    text = "".join(f["data"].get("delta", "") for f in frames[:-1])
    assert text == frames[-1]["data"]["content"]
