"""Every reply reaches exactly one terminal state, whatever the provider does (invariants 1 and 5)."""
import pytest

pytestmark = pytest.mark.gen_test(timeout=20)


async def terminal(connect, services, stored_message, pipeline):
    c = await connect(pipeline)
    ack = await c.say("go")
    frames = await c.until_final(ack["data"]["reply_message_id"])
    final = frames[-1]["data"]
    stored = await stored_message(final["message_id"])
    assert stored["status"] == final["status"]
    assert stored["content"] == final["content"]
    assert stored.get("error") == final.get("error")
    assert services.streams.stop_callbacks == {} and services.streams.generations == {}
    return frames, final


async def test_stall_timeout(connect, services, stored_message):
    frames, final = await terminal(connect, services, stored_message, "stall")
    assert final["status"] == "timeout" and final["error"]["code"] == "stall_timeout"
    assert final["content"] == "half a reply"  # what was streamed before the stall is kept


async def test_a_stall_after_the_first_token_is_timed_by_the_stall_limit(connect, services, stored_message):
    """`stall_late`: first token within 60 s, stall 0.3 s. The reply stalls after two chunks: it ends as a stall
    (well within the 10 s this test waits for a frame), not when the first-token limit would have run out."""
    frames, final = await terminal(connect, services, stored_message, "stall_late")
    assert final["status"] == "timeout" and final["error"]["code"] == "stall_timeout"
    assert final["content"] == "half a reply"


async def test_first_token_timeout(connect, services, stored_message):
    frames, final = await terminal(connect, services, stored_message, "mute")
    assert len(frames) == 1
    assert final["status"] == "timeout" and final["error"]["code"] == "first_token_timeout"
    assert final["content"] == ""


async def test_total_timeout(connect, services, stored_message):
    frames, final = await terminal(connect, services, stored_message, "endless")
    assert final["status"] == "timeout" and final["error"]["code"] == "total_timeout"
    assert len(frames) > 2 and final["content"]


async def test_provider_failure_mid_stream(connect, services, stored_message):
    frames, final = await terminal(connect, services, stored_message, "broken")
    assert final["status"] == "failed" and final["error"]["code"] == "upstream_error"
    assert final["content"] == "partial"


async def test_empty_completion_is_failed_not_completed(connect, services, stored_message):
    frames, final = await terminal(connect, services, stored_message, "empty")
    assert final["status"] == "failed" and final["error"]["code"] == "empty_completion"


async def test_shutdown_interrupts_live_replies_with_a_final_frame(connect, services, stored_message):
    c = await connect("slow")
    ack = await c.say("never finished")
    await c.recv_type("response")
    await services.streams.shutdown()
    frames = await c.until_final(ack["data"]["reply_message_id"])
    assert frames[-1]["data"]["status"] == "interrupted"
    stored = await stored_message(ack["data"]["reply_message_id"])
    assert stored["status"] == "interrupted" and stored["content"] == frames[-1]["data"]["content"]
