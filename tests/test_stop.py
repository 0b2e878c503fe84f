"""Stopping replies: from the socket, by message id, over REST; isolation; nothing left behind after churn."""
import asyncio

import pytest

from services.providers.demo import DemoProvider
from tests.conftest import settle

pytestmark = pytest.mark.gen_test(timeout=60)


async def start_reply(c, text="tell me everything"):
    ack = await c.say(text)
    assert ack["type"] == "ack", ack
    await c.recv_type("response")  # at least one chunk has streamed
    return ack["data"]["reply_message_id"]


async def assert_stopped_cleanly(c, services, stored_message, reply_id):
    frames = await c.until_final(reply_id)
    final = frames[-1]["data"]
    assert final["status"] == "stopped"
    # nothing for this message after its final frame: ping round-trips with no response frame in between
    await c.send({"type": "ping"})
    while (frame := await c.recv())["type"] != "pong":
        assert frame["type"] != "response" or frame["data"]["message_id"] != reply_id, frame
    stored = await stored_message(reply_id)
    assert stored["status"] == "stopped"
    assert stored["content"] == final["content"] and stored["content"]
    assert reply_id not in services.streams.stop_callbacks
    assert reply_id not in services.streams.generations
    return final


async def test_stop_current_reply_from_the_socket(connect, services, stored_message):
    c = await connect("slow")
    reply_id = await start_reply(c)
    assert reply_id in services.streams.stop_callbacks
    await c.send({"type": "stop"})
    ack = await c.recv_type("stop_ack")
    assert ack["data"]["stopped"] == [reply_id] and ack["data"]["session_id"] == c.connected["session_id"]
    final = await assert_stopped_cleanly(c, services, stored_message, reply_id)
    assert len(final["content"]) < 3000


async def test_a_reply_at_full_speed_is_stopped_mid_reply(connect, services, stored_message):
    """The demo at rate 0 makes words back to back, giving the loop a turn every so often: a stop sent after its
    first chunk is heard long before its 50,000 words are made."""
    c = await connect("torrent")
    reply_id = await start_reply(c)
    await c.send({"type": "stop"})
    assert (await c.recv_type("stop_ack"))["data"]["stopped"] == [reply_id]
    final = await assert_stopped_cleanly(c, services, stored_message, reply_id)
    whole = "".join(DemoProvider(services.streams.pipelines.get("torrent")).answer("tell me everything"))
    assert len(final["content"]) < len(whole)


async def test_stop_by_message_id(connect, services, stored_message):
    c = await connect("slow")
    reply_id = await start_reply(c)
    await c.send({"type": "stop", "message_id": "not-this-one"})
    assert (await c.recv_type("stop_ack"))["data"]["stopped"] == []
    await c.send({"type": "stop", "message_id": reply_id})
    assert (await c.recv_type("stop_ack"))["data"]["stopped"] == [reply_id]
    await assert_stopped_cleanly(c, services, stored_message, reply_id)


async def test_stop_over_rest(connect, fetch, services, stored_message):
    c = await connect("slow")
    reply_id = await start_reply(c)
    session_id = c.connected["session_id"]
    code, body = await fetch(f"/api/v1/pipelines/slow/sessions/{session_id}/stop", "POST")
    assert code == 200 and body["code"] == 0 and body["data"]["stopped"] == [reply_id]
    await assert_stopped_cleanly(c, services, stored_message, reply_id)


async def test_stop_when_nothing_runs_is_a_noop(connect, fetch):
    c = await connect()
    await c.send({"type": "stop"})
    ack = await c.recv_type("stop_ack")
    assert ack["data"] == {"session_id": c.connected["session_id"], "stopped": [], "count": 0}
    code, body = await fetch(f"/api/v1/pipelines/default/sessions/{c.connected['session_id']}/stop", "POST",
                             body={})
    assert code == 200 and body["data"]["stopped"] == []


async def test_stop_a_queued_reply_gives_it_one_final_frame(connect, services):
    c = await connect("slow")
    running = await start_reply(c, "first")
    queued = (await c.say("second"))["data"]["reply_message_id"]
    await c.send({"type": "stop", "message_id": queued})
    frames = await c.until_final(queued)
    assert len(frames) == 1 and frames[0]["data"]["status"] == "stopped"
    assert frames[0]["data"]["content"] == ""
    assert running in services.streams.generations  # the running one is untouched
    await c.send({"type": "stop"})
    await c.until_final(running)


async def test_stopping_one_of_ten_sessions_touches_no_other(connect, fetch, services, stored_message):
    clients, replies = [], []
    for i in range(10):
        code, body = await fetch("/api/v1/pipelines/slow/sessions", "POST", body={"title": f"s{i}"})
        assert code == 201
        c = await connect("slow", session_id=body["data"]["session_id"])
        clients.append(c)
    for i, c in enumerate(clients):
        ack = await c.say(f"story {i}")
        replies.append(ack["data"]["reply_message_id"])
    for c in clients:
        await c.recv_type("response")
    victim = 4
    await clients[victim].send({"type": "stop"})
    assert (await clients[victim].recv_type("stop_ack"))["data"]["stopped"] == [replies[victim]]
    await assert_stopped_cleanly(clients[victim], services, stored_message, replies[victim])
    # every other reply is still streaming: each client keeps receiving chunks, no final
    for i, c in enumerate(clients):
        if i == victim:
            continue
        for _ in range(3):
            frame = await c.recv_type("response")
            assert frame["data"]["message_id"] == replies[i] and not frame["data"]["is_final"]
        assert replies[i] in services.streams.stop_callbacks
    assert len(services.streams.generations) == 9


async def test_viewer_of_another_session_sees_nothing_of_it(connect, fetch):
    code, body = await fetch("/api/v1/pipelines/slow/sessions", "POST", body={})
    a = await connect("slow")
    b = await connect("slow", session_id=body["data"]["session_id"])
    reply_id = await start_reply(a)
    await b.send({"type": "stop"})  # b's session has nothing running
    assert (await b.recv_type("stop_ack"))["data"]["stopped"] == []
    await b.send({"type": "stop", "message_id": reply_id})  # not b's session: no effect
    assert (await b.recv_type("stop_ack"))["data"]["stopped"] == []
    frame = await a.recv_type("response")
    assert not frame["data"]["is_final"]
    await a.send({"type": "stop"})
    await a.until_final(reply_id)


async def test_nothing_is_left_behind_after_200_send_stop_disconnect_cycles(connect, services):
    loop = asyncio.get_running_loop()
    for i in range(200):
        c = await connect("slow")
        ack = await c.say(f"cycle {i}")
        assert ack["type"] == "ack"
        if i % 3 == 0:
            await c.send({"type": "stop"})
            await c.recv_type("stop_ack")
        elif i % 3 == 1:
            await c.recv_type("response")
            await c.send({"type": "stop", "message_id": ack["data"]["reply_message_id"]})
        c.close()  # i % 3 == 2: disconnect mid-reply; the reply goes on without its sender
        if i % 3 == 2:
            services.streams.stop(ack["data"]["session_id"])
    await settle(lambda: not services.streams.generations, timeout=20)
    await settle(lambda: not services.hub.connections, timeout=10)
    assert services.streams.stop_callbacks == {}
    assert services.streams.by_session == {}
    assert services.hub.by_session == {} and services.hub.by_user == {} and services.hub.by_pipeline == {}
    assert services.hub.session_users == {} and services.hub.session_types == {}

    def ours():  # every task Parley starts is named after what it serves
        return [t.get_name() for t in asyncio.all_tasks(loop) if t.get_name().startswith(("generation-", "inbox-"))]
    await settle(lambda: not ours(), timeout=10)
    live = await services.store.messages.count_documents({"status": {"$in": ["queued", "streaming"]}})
    assert live == 0
