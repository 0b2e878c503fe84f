"""End to end over real sockets and a real MongoDB-wire server: connect, echo, streaming modes, history."""
import pytest

pytestmark = pytest.mark.gen_test(timeout=20)


async def test_connect_echo_and_stream(connect, services, stored_message):
    c = await connect()
    hello = c.connected
    assert hello["pipeline_uuid"] == "default" and hello["session_type"] == "person"
    assert hello["connection_id"] and hello["session_id"] and hello["timestamp"]

    await c.send({"type": "message", "message": [{"type": "Plain", "text": "hi"}]})
    echo = await c.recv_type("user_message")
    assert echo["data"]["content"] == "hi" and echo["data"]["role"] == "user"
    assert echo["data"]["message_chain"] == [{"type": "Plain", "text": "hi"}]
    ack = await c.recv_type("ack")
    assert ack["data"]["message_id"] == echo["data"]["message_id"]
    assert ack["data"]["reply_seq"] == ack["data"]["seq"] + 1

    frames = await c.until_final(ack["data"]["reply_message_id"])
    finals = [f for f in frames if f["data"]["is_final"]]
    assert len(finals) == 1 and finals[0] is frames[-1]
    final = finals[0]["data"]
    assert final["status"] == "completed" and final["role"] == "assistant"
    assert final["id"] == final["seq"] == ack["data"]["reply_seq"]
    # cumulative (LangBot) mode: each frame's content extends the previous one
    contents = [f["data"]["content"] for f in frames]
    assert len(contents) > 2
    for before, after in zip(contents, contents[1:]):
        assert after.startswith(before)
    for f in frames[:-1]:
        assert f["data"]["offset"] <= len(f["data"]["content"])
        assert f["data"]["message_chain"] == [{"type": "Plain", "text": f["data"]["content"]}]

    stored = await stored_message(final["message_id"])
    assert stored["status"] == "completed" and stored["content"] == final["content"]
    assert stored["usage"]["completion_tokens"] > 0
    # nothing follows the final frame
    await c.send({"type": "ping"})
    assert (await c.recv())["type"] == "pong"


async def test_delta_mode_offsets_are_contiguous_and_thinking_separate(connect, services, stored_message):
    c = await connect("thinker", stream_mode="delta")
    ack = await c.say("why?")
    frames = await c.until_final(ack["data"]["reply_message_id"])
    text, thinking = "", ""
    for f in frames[:-1]:
        d = f["data"]
        assert "content" not in d
        if "delta" in d:
            assert d["offset"] == len(text)
            text += d["delta"]
        if "thinking_delta" in d:
            assert d["thinking_offset"] == len(thinking)
            thinking += d["thinking_delta"]
    final = frames[-1]["data"]
    assert thinking and final["thinking"] == thinking
    assert final["content"] == text
    assert text.startswith('You said "why?"')
    stored = await stored_message(final["message_id"])
    assert (stored["content"], stored["thinking"]) == (text, thinking)


async def test_stream_false_gives_one_final_frame(connect):
    c = await connect()
    ack = await c.say("no streaming please", stream=False)
    frames = await c.until_final(ack["data"]["reply_message_id"])
    assert len(frames) == 1 and frames[0]["data"]["status"] == "completed"
    assert frames[0]["data"]["content"].startswith('You said "no streaming please"')


async def test_two_tabs_of_a_session_both_see_echo_and_reply(connect):
    a = await connect()
    b = await connect(session_id=a.connected["session_id"])
    ack = await a.say("hello both")
    echo = await b.recv_type("user_message")
    assert echo["data"]["message_id"] == ack["data"]["message_id"]
    fa = await a.until_final(ack["data"]["reply_message_id"])
    fb = await b.until_final(ack["data"]["reply_message_id"])
    assert fa[-1]["data"]["content"] == fb[-1]["data"]["content"]
    # LangBot's meaning, the same bytes for every viewer: the echo names the sending connection, a reply none
    assert echo["data"]["connection_id"] == a.connected["connection_id"]
    assert fb[-1]["data"]["connection_id"] == ""


async def test_ping_is_answered_while_a_reply_streams(connect):
    c = await connect("slow")
    ack = await c.say("take your time")
    await c.recv_type("response")  # streaming has begun
    await c.send({"type": "ping"})
    while True:
        frame = await c.recv()
        if frame["type"] == "pong":
            break
        assert not frame["data"].get("is_final"), "pong came only after the reply ended"
    await c.send({"type": "stop", "message_id": ack["data"]["reply_message_id"]})


async def test_disconnect_frame_closes_with_1000(connect):
    c = await connect()
    await c.send({"type": "disconnect"})
    code, _ = await c.wait_closed()
    assert code == 1000


async def test_replies_in_a_session_run_one_at_a_time_in_order(connect, services, stored_message):
    c = await connect("slow")
    first = await c.say("one")
    await c.recv_type("response")  # the first reply streams
    second = await c.say("two")
    assert (await stored_message(second["data"]["reply_message_id"]))["status"] == "queued"
    await c.send({"type": "stop", "message_id": first["data"]["reply_message_id"]})
    frames = await c.until_final(first["data"]["reply_message_id"])
    assert frames[-1]["data"]["status"] == "stopped"
    status = await c.recv_type("status")
    assert status["data"] == {**status["data"], "message_id": second["data"]["reply_message_id"],
                              "status": "streaming"}
    await c.send({"type": "stop"})
    frames = await c.until_final(second["data"]["reply_message_id"])
    assert frames[-1]["data"]["status"] == "stopped"


async def test_a_full_queue_answers_session_busy(connect, services):
    c = await connect("slow")  # max_queued=3 in tests: one running + three waiting
    for i in range(4):
        assert (await c.say(f"m{i}"))["type"] == "ack"
    busy = await c.say("one too many")
    assert busy["type"] == "error" and busy["code"] == "session_busy" and busy["retryable"] is True
    await c.send({"type": "stop"})
    ack = await c.recv_type("stop_ack")
    assert ack["data"]["count"] == 4


async def test_partial_text_is_visible_in_history_while_streaming(connect, fetch, services):
    c = await connect("slow")
    ack = await c.say("stream for a while")
    reply_id = ack["data"]["reply_message_id"]
    session_id = c.connected["session_id"]
    for _ in range(20):  # > checkpoint interval of 0.05 s at 200 words/s
        await c.recv_type("response")
    seen = None
    for _ in range(50):
        code, body = await fetch(f"/api/v1/pipelines/slow/sessions/{session_id}/messages")
        seen = next(m for m in body["data"]["messages"] if m["message_id"] == reply_id)
        if seen["content"]:
            break
    assert code == 200 and seen["status"] == "streaming" and seen["is_final"] is False
    assert seen["content"].startswith('You said "stream for a while"')
    await c.send({"type": "stop"})
    frames = await c.until_final(reply_id)
    assert frames[-1]["data"]["content"].startswith(seen["content"])


async def test_checkpoints_are_throttled_not_per_token(connect, services, monkeypatch):
    calls = []
    real = services.store.checkpoint

    async def counting(message_id, **kw):
        calls.append(kw["text"])
        return await real(message_id, **kw)

    monkeypatch.setattr(services.store, "checkpoint", counting)
    c = await connect("slow", stream_mode="delta")  # a frame per chunk (cumulative frames come 10 a second)
    ack = await c.say("count the writes")
    chunks = 0
    for _ in range(60):  # 60 chunks at 200/s = 0.3 s; checkpoint interval 0.05 s
        await c.recv_type("response")
        chunks += 1
    await c.send({"type": "stop"})
    await c.until_final(ack["data"]["reply_message_id"])
    assert 1 <= len(calls) <= chunks // 3, (len(calls), chunks)
