"""Regenerate: a new reply to the question the session's latest reply answered, over parley.v1 and REST.

The earlier reply stays in the history as an earlier version (`superseded_by` names the new one) and leaves the
model's context; only the latest reply of a session, once ended, can be regenerated.
"""
import pytest

from services.delivery.ordering import Ordering
from services.wire import events

pytestmark = pytest.mark.gen_test(timeout=30)

P = "/api/v1/pipelines/context"


async def chat_once(c, text):
    ack = await c.say(text)
    assert ack["type"] == "ack", ack
    frames = await c.until_final(ack["data"]["reply_message_id"])
    return ack["data"], frames[-1]["data"]


async def history(fetch, session_id):
    code, body = await fetch(f"{P}/sessions/{session_id}/messages?limit=50")
    assert code == 200
    return body["data"]["messages"]


async def test_regenerate_over_the_socket_answers_the_same_question_again(connect, fetch):
    c = await connect("context", stream_mode="delta")
    other = await connect("context", stream_mode="delta")  # a second tab on the same session
    first, _ = await chat_once(c, "one")
    second, old = await chat_once(c, "two")
    assert old["content"] == "answer 2 to two after [user: one | assistant: answer 1 to one after []]"
    await other.until_final(second["reply_message_id"])

    await c.send({"type": "regenerate", "message_id": second["reply_message_id"]})
    ack = (await c.recv_type("ack", "error"))
    assert ack["type"] == "ack", ack
    new_id = ack["data"]["reply_message_id"]
    assert ack["data"]["message_id"] == second["message_id"] and new_id != second["reply_message_id"]
    assert ack["data"]["reply_seq"] > old["seq"]

    for viewer in (c, other):
        frames = await viewer.until_final(new_id)
        final = frames[-1]["data"]
        assert final["status"] == "completed" and final["reply_to"] == second["message_id"]
        # the same question, the same context before it: the earlier answer to it is not part of it
        assert final["content"] == "answer 3 to two after [user: one | assistant: answer 1 to one after []]"

    messages = await history(fetch, c.connected["session_id"])
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "assistant"]
    assert messages[3]["message_id"] == second["reply_message_id"] and messages[4]["message_id"] == new_id
    assert messages[3]["superseded_by"] == new_id and "superseded_by" not in messages[4]
    assert messages[3]["reply_to"] == messages[4]["reply_to"] == second["message_id"]

    # the next message's context has one answer per question: the latest
    _, after = await chat_once(c, "three")
    assert after["content"] == ("answer 4 to three after [user: one | assistant: answer 1 to one after [] | user: two"
                                " | assistant: answer 3 to two after [user: one | assistant: answer 1 to one after []]]")


async def test_only_the_latest_ended_reply_can_be_regenerated(connect, fetch):
    c = await connect("context")
    first, _ = await chat_once(c, "one")
    second, _ = await chat_once(c, "two")
    sid = c.connected["session_id"]
    url = f"{P}/sessions/{sid}/messages/{{}}/regenerate"

    code, body = await fetch(url.format(first["reply_message_id"]), "POST", body={})
    assert (code, body["code"]) == (409, "not_latest_reply")
    code, body = await fetch(url.format(second["message_id"]), "POST", body={})  # a question, not a reply
    assert (code, body["code"]) == (404, "message_not_found")
    code, body = await fetch(url.format("no-such-message"), "POST", body={})
    assert (code, body["code"]) == (404, "message_not_found")

    code, body = await fetch(url.format(second["reply_message_id"]), "POST", body={"stream": True})
    assert code == 202, body
    new_id = body["data"]["reply_message_id"]
    assert body["data"]["message_id"] == second["message_id"]
    await c.until_final(new_id)
    # the replaced version cannot be regenerated again (two tabs clicking at once: one wins)
    code, body = await fetch(url.format(second["reply_message_id"]), "POST", body={})
    assert (code, body["code"]) == (409, "not_latest_reply")
    code, body = await fetch(url.format(new_id), "POST")
    assert code == 202, body


async def test_a_reply_still_being_written_is_not_regenerated(connect, fetch):
    c = await connect("slow")
    ack = await c.say("a long one")
    reply_id = ack["data"]["reply_message_id"]
    await c.recv_type("response")  # it streams
    code, body = await fetch(f"/api/v1/pipelines/slow/sessions/{c.connected['session_id']}/messages/"
                             f"{reply_id}/regenerate", "POST")
    assert (code, body["code"]) == (409, "reply_live")
    await c.send({"type": "regenerate", "message_id": reply_id})
    error = await c.recv_type("error")
    assert error["code"] == "reply_live" and error["request_type"] == "regenerate"


async def test_a_regenerated_reply_is_delivered_at_once_in_every_viewers_order():
    """Its number follows the session's last one with no user message before it: its `reply.regenerate` event
    accounts for it, so the reply's events are not held waiting for a missing number."""
    delivered = []
    order = Ordering(delivered.append)
    order.track("s", 2)  # a user message 1 and its reply 2 were delivered
    order.handle(events.ReplyRegenerate(session_id="s", seq=3, message_id="r3", reply_to="u1", replaces="r2"))
    order.handle(events.ReplyStarted(session_id="s", message_id="r3", seq=3, reply_to="u1", status="streaming"))
    order.handle(events.UserMessage(session_id="s", message={"seq": 4, "session_id": "s"}))
    assert [e.type for e in delivered] == ["reply.regenerate", "reply.started", "user_message"]
    assert not order.sessions["s"].held and order.sessions["s"].timer is None
