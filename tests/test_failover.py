"""The cluster keeps its promise under failure, seen from outside (issue 21): three real instances on one store
behind the nginx we ship, clients on different loopback networks, every frame of every connection checked as it
arrives (tests/cluster.py Ledger: no gap, no character twice, text taken back only by `rewind`/`resumed`, one
final per client and nothing after it) while instances are killed, paused, stopped and restarted."""
import asyncio
import random
import re
import signal
import time

import pytest
from tornado.httpclient import HTTPClientError
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from services.providers.openai_compat import CONTINUE_INSTRUCTION
from services.storage.store import assemble
from tests.upstream import FakeUpstream, Script
from tests.cluster import (LIVENESS, PATIENCE, cluster, connect, demo_text, explain, fetch, plain,  # noqa: F401
                           spread, wait_for)
from pymongo import MongoClient

pytestmark = pytest.mark.gen_test(timeout=600)  # a bound for a loaded machine, not a speed

GONE_WITHIN = LIVENESS + 20.0  # seconds from kill -9 to every viewer's final: a bound (bench/cluster.py measures)


def stored(cluster, message_id):
    with MongoClient(cluster.mongo_url) as db:
        return assemble(db[cluster.db_name].messages.find_one({"_id": message_id}))


async def reply_frames(client, message_id, count):
    """Read until `count` text frames of the reply arrived (its ledger keeps them)."""
    seen = 0
    while seen < count:
        frame = await client.recv()
        assert frame is not None, "closed"
        if frame["type"] == "response" and frame["data"]["message_id"] == message_id:
            assert not frame["data"]["is_final"], frame["data"]
            seen += 1


async def streams_past(client, message_id, length):
    """Read until the client holds more than `length` characters of the reply's answer, before its final: text
    its new owner generated (counting frames would not do: a client slow to read gets them merged)."""
    held = client.ledger.of(message_id)
    while len(held.text) <= length:
        frame = await client.recv()
        assert frame is not None, "closed"
        assert not held.finals, f"the reply ended at {len(held.text)} characters"


async def holds(client, message_id, count):
    """Read until the client holds `count` characters of the reply (reasoning and answer), before its final."""
    held = client.ledger.of(message_id)
    while len(held.thinking) + len(held.text) < count:
        assert await client.recv() is not None, "closed"
        assert not held.finals, f"the reply ended at {len(held.thinking) + len(held.text)} characters"


async def continued(cluster, message_id, times=1):
    """The stored reply once another instance has gone on with it `times` times."""
    return await wait_for(lambda: _now(d if (d := stored(cluster, message_id)).get("continuations", 0) >= times
                                      else None))


async def until_final(client, message_id):
    """Read until this connection has the reply's final (it may have come already)."""
    held = client.ledger.of(message_id)
    while message_id not in client.ledger.ended_here and not held.finals:
        frame = await client.recv()
        assert frame is not None, f"closed before the final of {message_id}"
    return held.finals[0]


async def nothing_more(client, message_id, settle=1.0):
    """After the final, nothing of the reply: wait a little, then a ping round trip with nothing in between."""
    await asyncio.sleep(settle)
    await client.send({"type": "ping"})
    while (await client.recv())["type"] != "pong":
        pass
    assert not client.ledger.problems, "\n".join(client.ledger.problems)


async def drain(client):
    """Read what a connection received until its socket ends."""
    try:
        while await client.recv() is not None:
            pass
    except (WebSocketClosedError, StreamClosedError):
        pass


async def reconnect(cluster, src, user, held, message_id, pipeline="slow"):
    """A new connection from `src` that resumes the reply from what the client holds (as parley.js does)."""
    client = await connect(cluster, pipeline, src=src, user=user, held=held)
    h = held[message_id]
    frame = {"type": "resume", "message_id": message_id, "offset": len(h.text), "thinking_offset": len(h.thinking)}
    if h.epoch is not None:
        frame["epoch"] = h.epoch
    await client.send(frame)
    return client


QUESTION = "then the lights went out"


@pytest.mark.parametrize("pipeline", ["slow_once", "medium"])  # on_instance_lost: interrupt, continue
@pytest.mark.parametrize("wait", [0.0, LIVENESS])  # reconnect at once, or as the survivors find the owner gone
async def test_kill_9_every_viewer_gets_one_final_wherever_it_reconnects(cluster, wait, pipeline):
    """Interrupted (its pipeline says so) with the stored text, or continued by one of the survivors from its
    last checkpoint to exactly the text an uninterrupted reply has: one final per viewer, everything said."""
    where = await spread(cluster)
    owner, b, c = cluster.instances
    user = f"killed-{wait}-{pipeline}"
    # two tabs on the owner (the sender and another), one viewer on each other instance, all there before the send
    sender = await connect(cluster, pipeline, src=where[owner.id], user=user)
    tab = await connect(cluster, pipeline, src=where[owner.id], user=user)
    far = [await connect(cluster, pipeline, src=where[i.id], user=user) for i in (b, c)]
    assert [x.instance for x in (sender, tab, *far)] == [owner.id, owner.id, b.id, c.id]
    reply_id = (await sender.say(QUESTION))["data"]["reply_message_id"]
    await reply_frames(sender, reply_id, 40)  # past the reasoning, into the answer
    for viewer in far:  # followed live on the other instances
        await reply_frames(viewer, reply_id, 3)
    owner.proc.kill()
    killed = time.monotonic()
    owner.proc.wait()
    try:
        for client in (sender, tab):  # what reached them before their instance died, then the end of the socket
            await drain(client)
        await asyncio.sleep(wait)
        # the owner's two tabs come back through the other two instances: one of them is the one that takes the
        # reply up (both race to; exactly one wins), so one reconnect lands on it and one does not
        moved = [await reconnect(cluster, where[i.id], user, x.ledger.held, reply_id, pipeline)
                 for x, i in ((sender, b), (tab, c))]
        assert {m.instance for m in moved} == {b.id, c.id}
        finals = []
        for client in (*moved, *far):
            finals.append(await until_final(client, reply_id))
            if pipeline == "slow_once":
                assert time.monotonic() - killed < GONE_WITHIN, "a viewer waited for its final"
        truth = stored(cluster, reply_id)
        if pipeline == "slow_once":
            assert truth["status"] == "interrupted" and truth["error"]["code"] == "instance_lost"
        else:  # one survivor won the claim, and went on to the very text an uninterrupted reply has
            thinking, answer = demo_text(pipeline, QUESTION)
            assert (truth["status"], truth["content"], truth["thinking"]) == ("completed", answer, thinking)
            assert truth["continuations"] == 1 and len(truth["continued"]) == 1
            assert truth["continued"][0]["from"] == owner.id and truth["continued"][0]["reason"] == "instance_lost"
        for client, final in zip((*moved, *far), finals):
            assert (final["status"], final["content"]) == (truth["status"], truth["content"])
            assert final.get("continued", 0) == truth.get("continuations", 0)
            assert client.ledger.of(reply_id).text == truth["content"]
            await nothing_more(client, reply_id)
        for client in (*moved, *far):
            client.close()
    finally:
        owner.start()
        await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)


async def test_a_viewer_that_moves_to_the_instance_going_on_with_the_reply_streams_it_live(cluster):
    """kill -9 the owner while the reply's only viewer is there: the client reconnects to the survivor that took
    the reply up (which never followed it: no viewer of it was there) and resumes. It gets the new owner's text
    live, well before the final (before, that instance's log of the reply lacked the text it went on from, every
    delta was a gap, and the viewer saw nothing until the final)."""
    where = await spread(cluster)
    owner = cluster.instances[0]
    user = "moves-to-the-survivor"
    sender = await connect(cluster, "long", src=where[owner.id], user=user)
    reply_id = (await sender.say(QUESTION))["data"]["reply_message_id"]
    await holds(sender, reply_id, 300)
    owner.proc.kill()
    owner.proc.wait()
    try:
        await drain(sender)
        doc = await continued(cluster, reply_id)
        moved = await reconnect(cluster, where[doc["instance"]], user, sender.ledger.held, reply_id, "long")
        assert moved.instance == doc["instance"]
        await streams_past(moved, reply_id, len(stored(cluster, reply_id)["content"]) + 100)
        assert stored(cluster, reply_id)["status"] == "streaming", "the text came only with the final"
        final = await until_final(moved, reply_id)
        live = [kind for _, kind in moved.ledger.of(reply_id).trail[-12:] if kind == "response"]
        assert len(live) >= 10, moved.ledger.of(reply_id).trail[-12:]
        assert final["content"] == demo_text("long", QUESTION)[1] == moved.ledger.of(reply_id).text
        assert not moved.ledger.problems, moved.ledger.problems
        moved.close()
    finally:
        owner.start()
        await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)


async def test_fifty_replies_killed_at_random_points_each_go_on_to_the_same_text(cluster):
    """kill -9 at 50 random points of a reply: rounds of up to 25 replies started a random moment apart on one
    instance, then the instance killed (so each reply dies at its own point: in its reasoning, its answer, a
    checkpoint write in flight). In the second
    round the instance that takes them up is killed too, a random moment after the first is found gone (while
    it claims, or just after): the last one goes on with them. Each sender returns through the survivor; it and
    a viewer there from before the send end with exactly the text an uninterrupted reply has, in one final,
    every frame adding up; the store agrees."""
    rng = random.Random(50)
    where = await spread(cluster)
    owner, claimer, last = cluster.instances
    thinking, answer = demo_text("long", QUESTION)
    loop = asyncio.get_running_loop()
    points, continued = [], 0
    for round_ in range(6):
        if len(points) == 50:
            break
        second_kill = round_ == 1
        users = [f"fifty-{round_}-{k}" for k in range(min(25, 50 - len(points)))]
        senders = [await connect(cluster, "long", src=where[owner.id], user=u) for u in users]
        viewers = [await connect(cluster, "long", src=where[last.id], user=u) for u in users]
        replies = []
        first = None
        for sender in senders:  # started a random moment apart
            replies.append((await sender.say(QUESTION))["data"]["reply_message_id"])
            first = first or time.monotonic()
            if time.monotonic() - first > 4.0:  # the first is at most 400 words into its 900: all are live
                break
            await asyncio.sleep(rng.uniform(0, 0.15))
        users, senders, viewers = users[:len(replies)], senders[:len(replies)], viewers[:len(replies)]
        await asyncio.sleep(rng.uniform(0, 0.3))
        owner.proc.kill()
        killed = time.monotonic()
        owner.proc.wait()
        try:
            for sender, reply_id in zip(senders, replies):
                await drain(sender)
                points.append(len(sender.ledger.of(reply_id).text) + len(sender.ledger.of(reply_id).thinking))
            if second_kill:  # the claimer dies as it claims, or just after it began to continue
                await asyncio.sleep(max(0.0, killed + LIVENESS + rng.uniform(-0.5, 1.5) - time.monotonic()))
                claimer.proc.kill()
                claimer.proc.wait()
            moved = [await reconnect(cluster, where[last.id], u, s.ledger.held, r, "long")
                     for u, s, r in zip(users, senders, replies)]
            for client, reply_id in zip((*moved, *viewers), replies * 2):
                final = await until_final(client, reply_id)  # (the rest of a 900-word reply: a few seconds)
                case = f"round {round_}, reply {replies.index(reply_id)}"
                assert (final["status"], final["content"], final.get("thinking", "")) == (
                    "completed", answer, thinking), case
                assert client.ledger.of(reply_id).text == answer, case
            for k, reply_id in enumerate(replies):
                truth = stored(cluster, reply_id)
                assert (truth["status"], truth["content"], truth["thinking"]) == ("completed", answer, thinking)
                # continued from its last checkpoint; or, when the store had it still `queued` (killed before it
                # was marked streaming: the last few, on a loaded machine), adopted and run from the start
                assert truth.get("continuations", 0) <= (2 if second_kill else 1), truth["continued"]
                assert k > 0 or truth["continuations"] >= 1  # the first had streamed for seconds
                continued += truth.get("continuations", 0) > 0
            for client, reply_id in zip((*moved, *viewers), replies * 2):
                await nothing_more(client, reply_id, settle=0)
                client.close()
        finally:
            for instance in (owner, claimer):
                if instance.proc.poll() is not None:
                    instance.start()
            for instance in (owner, claimer):
                await loop.run_in_executor(None, instance.wait_ready)
            await asyncio.sleep(LIVENESS)  # the others see them back before the next round
    # the kill points spread over the reply (reasoning and answer), not bunched at one place
    print(f"{continued} of 50 continued; kill points (characters the sender held):", sorted(points))
    assert len(points) == 50 and min(points) < len(thinking) < len(thinking) + 800 < max(points), sorted(points)


@pytest.mark.parametrize("how,seed", [("kill", 31337), ("stop", 2026), ("term", 99)])  # 31337: back at once
async def test_an_owner_lost_at_a_random_moment_the_reply_goes_on_to_the_same_text(cluster, how, seed):
    """Chaos, seeded (a failure names its case): the owner is lost after a random number of characters, anywhere
    from the reasoning's first token to deep into the answer — kill -9 (back at once under the same id, or not
    until the end), SIGSTOP past its liveness then SIGCONT (it wakes fenced, its client still on it), or SIGTERM
    (it drains: closes its sockets, hands the reply over). A client that lost its socket returns through a random
    survivor after a random pause. Every viewer ends with the one text an uninterrupted reply has, in one final,
    every frame adding up."""
    rng = random.Random(seed)
    where = await spread(cluster)
    owner = cluster.instances[0]
    others = cluster.instances[1:]
    user = f"chaos-{how}-{seed}"
    sender = await connect(cluster, "medium", src=where[owner.id], user=user)
    far = [await connect(cluster, "medium", src=where[i.id], user=user) for i in others]
    reply_id = (await sender.say(QUESTION))["data"]["reply_message_id"]
    kill_after, back_at_once, pause = rng.randrange(1, 2400), rng.random() < 0.5, rng.uniform(0, LIVENESS * 1.5)
    where_to = rng.choice(others)
    case = f"{how} after {kill_after} characters, back at once {back_at_once}, pause {pause:.2f} s"
    await holds(sender, reply_id, kill_after)  # characters, not frames: a slow reader gets frames merged
    try:
        if how == "stop":
            owner.signal(signal.SIGSTOP)
            await wait_for(lambda: _now(stored(cluster, reply_id).get("continuations") == 1), interval=0.2)
            owner.signal(signal.SIGCONT)
            viewers = (sender, *far)
        else:
            if how == "kill":
                owner.proc.kill()
            else:
                owner.proc.terminate()
            await drain(sender)
            owner.proc.wait()
            if back_at_once:
                owner.start()
            await asyncio.sleep(pause)
            moved = await reconnect(cluster, where[where_to.id], user, sender.ledger.held, reply_id, "medium")
            assert moved.instance == where_to.id, case
            viewers = (moved, *far)
        thinking, answer = demo_text("medium", QUESTION)
        finals = [await until_final(client, reply_id) for client in viewers]
        truth = stored(cluster, reply_id)
        assert (truth["status"], truth["content"], truth["thinking"]) == ("completed", answer, thinking), case
        assert truth["continuations"] == 1, case
        for client, final in zip(viewers, finals):
            assert (final["status"], final["content"], final.get("continued")) == ("completed", answer, 1), case
            assert client.ledger.of(reply_id).text == answer, case
            await nothing_more(client, reply_id)
            client.close()
    finally:
        owner.signal(signal.SIGCONT)
        if owner.proc.poll() is not None:
            owner.start()
        await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)


async def test_a_stop_through_a_third_instance_reaches_viewers_there_before_the_send(cluster):
    """Viewers on A (the sender) and B follow a reply live, having done nothing but connect; the stop comes
    through C. Each streams the reply as it generates, then gets one `stopped` final with the text it has."""
    where = await spread(cluster)
    a, b, c = cluster.instances
    for run in range(3):
        user = f"stopper-{run}"
        sender = await connect(cluster, "slow", src=where[a.id], user=user)
        viewer = await connect(cluster, "slow", src=where[b.id], user=user)
        stopper = await connect(cluster, "slow", src=where[c.id], user=user)
        reply_id = (await sender.say("talk until stopped"))["data"]["reply_message_id"]
        await reply_frames(sender, reply_id, 5)
        await reply_frames(viewer, reply_id, 5)  # it streams on B too, to a viewer that never asked for it
        await stopper.send({"type": "stop", "session_id": stopper.connected["session_id"]})
        assert (await stopper.recv_type("stop_ack"))["type"] == "stop_ack"
        truth = None
        for client in (sender, viewer, stopper):
            final = await until_final(client, reply_id)
            truth = truth or stored(cluster, reply_id)
            assert (final["status"], final["content"]) == ("stopped", truth["content"])
            assert client.ledger.of(reply_id).text == truth["content"]
        for client in (sender, viewer, stopper):
            await nothing_more(client, reply_id)
            client.close()


async def test_sigstop_past_the_lease_then_sigcont_one_final_per_viewer(cluster):
    """Paused past its liveness and lease (on_instance_lost = interrupt): ended by another instance; the woken
    owner is fenced and its own end reaches no viewer a second time."""
    where = await spread(cluster)
    owner, b, c = cluster.instances
    user = "paused-everywhere"
    sender = await connect(cluster, "slow_once", src=where[owner.id], user=user)
    far = [await connect(cluster, "slow_once", src=where[i.id], user=user) for i in (b, c)]
    reply_id = (await sender.say("pause me"))["data"]["reply_message_id"]
    await reply_frames(sender, reply_id, 10)
    for viewer in far:
        await reply_frames(viewer, reply_id, 2)
    owner.signal(signal.SIGSTOP)
    try:
        async def reaped():
            doc = stored(cluster, reply_id)
            return doc if doc["status"] == "interrupted" else None
        truth = await wait_for(reaped)
        for viewer in far:
            await until_final(viewer, reply_id)
    finally:
        owner.signal(signal.SIGCONT)
    # the woken owner's own fenced end reaches no one a second time (its viewer gets the stored final once)
    final = await until_final(sender, reply_id)
    assert (final["status"], final["content"]) == ("interrupted", truth["content"])
    await asyncio.sleep(LIVENESS * 2)  # time for the woken owner's stale events to cross, if they were to
    for client in (sender, *far):
        held = client.ledger.of(reply_id)
        assert [f["status"] for f in held.finals] == ["interrupted"]
        assert held.text == truth["content"]
        await nothing_more(client, reply_id)
        client.close()
    after = stored(cluster, reply_id)
    assert (after["status"], after["content"], after["epoch"]) == ("interrupted", truth["content"], truth["epoch"])


async def test_paused_owners_are_fenced_and_the_reply_goes_on_twice_to_the_same_text(cluster):
    """A pauses (SIGSTOP) past its liveness: B or C takes the reply over and goes on; then that one pauses
    too: the third goes on. Both wake fenced. Every viewer ends with one final, the uninterrupted text, and
    `continued: 2`."""
    where = await spread(cluster)
    ids = [i.id for i in cluster.instances]
    user = "paused-twice"
    viewers = [await connect(cluster, "long", src=where[i], user=user) for i in ids]
    reply_id = (await viewers[0].say(QUESTION))["data"]["reply_message_id"]
    await reply_frames(viewers[0], reply_id, 30)
    paused = []
    try:
        for round_ in (1, 2):
            owner = cluster.by_id(stored(cluster, reply_id)["instance"])
            owner.signal(signal.SIGSTOP)
            paused.append(owner)
            doc = await continued(cluster, reply_id, round_)
            assert doc["instance"] not in {p.id for p in paused}
            watcher = next(v for v in viewers if v.instance == doc["instance"])
            await streams_past(watcher, reply_id, len(doc["content"]) + 20)  # its new owner goes on with it
    finally:
        for owner in paused:
            owner.signal(signal.SIGCONT)
    truth = await wait_for(lambda: _now(d if (d := stored(cluster, reply_id))["status"] != "streaming" else None))
    thinking, answer = demo_text("long", QUESTION)
    assert (truth["status"], truth["content"], truth["continuations"]) == ("completed", answer, 2)
    for v in viewers:
        final = await until_final(v, reply_id)
        assert (final["content"], final["continued"]) == (answer, 2)
        assert v.ledger.of(reply_id).text == answer
    await asyncio.sleep(LIVENESS)  # the woken owners' stale writes are refused, their stale events dropped
    for v in viewers:
        await nothing_more(v, reply_id)
        v.close()
    for owner in paused:
        code, text = await plain(owner.metrics_url)
        assert re.search(r"^parley_fenced_writes_refused_total [1-9]", text, re.M), owner.id


async def connect_retrying(cluster, pipeline, *, src, user, held):
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            return await connect(cluster, pipeline, src=src, user=user, held=held)
        except (OSError, HTTPClientError, StreamClosedError, WebSocketClosedError, AssertionError,
                asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def test_rolling_restarts_under_20_chatting_clients_no_duplicate_no_gap_no_lost_message(cluster):
    """Every instance, in turn, twice: SIGTERM, wait for its exit, start it again, while 20 clients on different
    networks chat without pause. Every acked message is stored, every reply ends, each client gets exactly one
    final of each of its replies across its reconnects, every connection's frames add up."""
    sources = [f"127.0.{n}.1" for n in range(1, 21)]
    loop = asyncio.get_running_loop()
    rolling = asyncio.Event()
    acked = {}        # user message id -> reply id
    ledgers = []      # every connection's
    helds = {}        # client -> what it holds (shared by its connections)

    async def open_(w, pending):
        held = helds.setdefault(w, {})
        while True:
            conn = await connect_retrying(cluster, "steady", src=sources[w], user=f"roller{w}", held=held)
            ledgers.append(conn.ledger)
            try:
                for message_id in pending:
                    h = conn.ledger.of(message_id)
                    frame = {"type": "resume", "message_id": message_id, "offset": len(h.text),
                             "thinking_offset": len(h.thinking)}
                    if h.epoch is not None:
                        frame["epoch"] = h.epoch
                    h.trail.append((id(conn.ledger) % 10000, f"sent resume {len(h.text)} finals {len(h.finals)}"))
                    await conn.send(frame)
                return conn
            except (WebSocketClosedError, StreamClosedError):
                conn.close()

    async def worker(w):
        conn = await open_(w, ())
        n = 0
        while not rolling.is_set() or n == 0:
            client_msg_id = f"roll-{w}-{n}"
            n += 1
            for attempt in range(6):  # until acked: a repeat of the client_msg_id after a reconnect is the same message
                try:
                    await conn.send({"type": "message", "message": [{"type": "Plain", "text": client_msg_id}],
                                     "client_msg_id": client_msg_id})
                    ack = await conn.recv_type("ack", "error")
                    break
                except (AssertionError, WebSocketClosedError, StreamClosedError, asyncio.TimeoutError):
                    conn = await open_(w, ())
            else:
                raise AssertionError(f"{client_msg_id} was never acked in six tries")
            assert ack["type"] == "ack", ack
            reply_id = ack["data"]["reply_message_id"]
            acked[ack["data"]["message_id"]] = reply_id
            held = helds[w]
            if ack["data"]["duplicate"]:  # its reply may have ended while we were away: ask for it
                try:
                    h = conn.ledger.of(reply_id)
                    h.trail.append((id(conn.ledger) % 10000, f"duplicate: sent resume {len(h.text)} finals "
                                                              f"{len(h.finals)}"))
                    await conn.send({"type": "resume", "message_id": reply_id, "offset": len(h.text),
                                     "thinking_offset": len(h.thinking)})
                except (WebSocketClosedError, StreamClosedError):
                    conn = await open_(w, (reply_id,))
            waited_since = loop.time()
            while not conn.ledger.of(reply_id).finals:
                assert loop.time() - waited_since < 3 * PATIENCE, explain(cluster, reply_id, held.get(reply_id))
                try:
                    frame = await conn.recv()
                except (WebSocketClosedError, StreamClosedError, asyncio.TimeoutError):
                    frame = None
                if frame is None:
                    conn = await open_(w, (reply_id,))
            assert held[reply_id].finals
        conn.close()

    async def roll():
        for _ in range(2):
            for instance in cluster.instances:
                before = len(acked)
                await wait_for(lambda: _now(len(acked) >= before + 10))  # the load runs meanwhile
                instance.signal(signal.SIGTERM)
                assert await loop.run_in_executor(None, instance.proc.wait, 120) == 0
                instance.start()
                await loop.run_in_executor(None, instance.wait_ready)
        before = len(acked)
        await wait_for(lambda: _now(len(acked) >= before + 10))
        rolling.set()

    await asyncio.wait_for(asyncio.gather(roll(), *(worker(w) for w in range(20))), 400)
    problems = [p for ledger in ledgers for p in ledger.problems]
    assert not problems, problems[:10]
    assert len(ledgers) >= 20 + 6, "the restarts moved too few clients to prove anything"
    finals = sum(len(h.finals) for held in helds.values() for h in held.values())
    assert finals == len(acked) >= 60
    with MongoClient(cluster.mongo_url) as db:
        messages = db[cluster.db_name].messages
        users = {d["_id"] for d in messages.find({"_id": {"$in": list(acked)}, "role": "user"})}
        replies = {d["_id"]: assemble(d) for d in messages.find({"_id": {"$in": list(acked.values())}})}
    assert users == set(acked), "an acked message is missing from the store"
    for w, held in helds.items():
        for reply_id, h in held.items():
            if reply_id not in replies:
                continue
            truth = replies[reply_id]
            assert len(h.finals) == 1, (w, reply_id, h.finals)
            # a drain hands its replies over: the others go on with them, nothing is interrupted
            assert truth["status"] == "completed", (truth["status"], truth.get("error"))
            assert (h.finals[0]["status"], h.finals[0]["content"], h.text) == (
                truth["status"], truth["content"], truth["content"])


async def _now(value):
    return value


@pytest.mark.parametrize("pipeline", ["up", "up_vllm"])  # continue_with: instruction, continue_final_message
async def test_the_upstream_is_asked_to_continue_the_stored_answer(cluster, pipeline):
    """The survivor's request carries the history, the question and the stored partial answer as the last
    assistant message: with the instruction to go on (the fallback), or flagged for vLLM/SGLang to continue it.
    The final is the stored partial plus what the continuation streamed."""
    upstream = FakeUpstream()
    await upstream.start(cluster.upstream_port)
    try:
        upstream.plan("m", Script(content=[f"w{i} " for i in range(3000)], rate=100),
                      Script(content=["and ", "that ", "is ", "all."]))
        where = await spread(cluster)
        owner, b, _ = cluster.instances
        user = f"continued-{pipeline}"
        sender = await connect(cluster, pipeline, src=where[owner.id], user=user)
        far = await connect(cluster, pipeline, src=where[b.id], user=user)
        reply_id = (await sender.say("tell me everything"))["data"]["reply_message_id"]
        await reply_frames(far, reply_id, 20)
        owner.proc.kill()
        owner.proc.wait()
        try:
            final = await until_final(far, reply_id)
            assert len(upstream.calls) == 2
            first, second = (call.body["messages"] for call in upstream.calls)
            truth = stored(cluster, reply_id)
            partial = truth["content"][:truth["continued"][0]["offset"]]
            assert partial and partial.startswith("w0 w1 ") and truth["content"] == partial + "and that is all."
            assert second[:len(first)] == first  # the same context and question
            if pipeline == "up":
                assert second[len(first):] == [{"role": "assistant", "content": partial},
                                               {"role": "user", "content": CONTINUE_INSTRUCTION}]
                assert "continue_final_message" not in upstream.calls[1].body
            else:
                assert second[len(first):] == [{"role": "assistant", "content": partial}]
                assert upstream.calls[1].body["continue_final_message"] is True
                assert upstream.calls[1].body["add_generation_prompt"] is False
            assert (final["status"], final["content"], final["continued"]) == ("completed", truth["content"], 1)
            assert far.ledger.of(reply_id).text == truth["content"]
            await nothing_more(far, reply_id)
            sender.close()
            far.close()
        finally:
            owner.start()
            await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)
    finally:
        await upstream.stop()


async def test_a_model_that_refuses_to_continue_ends_the_reply_interrupted_with_the_reason(cluster):
    upstream = FakeUpstream()
    await upstream.start(cluster.upstream_port)
    try:
        upstream.plan("m", Script(content=[f"w{i} " for i in range(3000)], rate=100), Script(status=400))
        where = await spread(cluster)
        owner, b, _ = cluster.instances
        far = await connect(cluster, "up", src=where[b.id], user="refused")
        sender = await connect(cluster, "up", src=where[owner.id], user="refused")
        reply_id = (await sender.say("go on, if you can"))["data"]["reply_message_id"]
        await reply_frames(far, reply_id, 20)
        owner.proc.kill()
        owner.proc.wait()
        try:
            final = await until_final(far, reply_id)
            truth = stored(cluster, reply_id)
            assert (final["status"], truth["status"]) == ("interrupted", "interrupted")
            assert final["error"]["code"] == truth["error"]["code"] == "continuation_refused"
            assert final["content"] == truth["content"] == far.ledger.of(reply_id).text and truth["content"]
            await nothing_more(far, reply_id)
            far.close()
            sender.close()
        finally:
            owner.start()
            await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)
    finally:
        await upstream.stop()


@pytest.mark.parametrize("when", ["before the claim", "after it"])
async def test_a_stop_during_a_handover_stops_the_reply_exactly_once(cluster, when):
    """The owner dies; a stop arrives through a third instance before a survivor takes the reply over (the
    durable flag: it ends `stopped`, not continued) or once it goes on elsewhere (its new owner stops it).
    Every viewer: one `stopped` final with the stored text."""
    where = await spread(cluster)
    owner, b, c = cluster.instances
    user = f"stop-{when.split()[0]}"
    # a long reply (the stop ends it): it is still generating when the stop comes, however slow the machine
    sender = await connect(cluster, "slow", src=where[owner.id], user=user)
    far = await connect(cluster, "slow", src=where[b.id], user=user)
    third = await connect(cluster, "slow", src=where[c.id], user=user)
    reply_id = (await sender.say(QUESTION))["data"]["reply_message_id"]
    await reply_frames(far, reply_id, 10)
    owner.proc.kill()
    owner.proc.wait()
    try:
        if when == "after it":
            doc = await continued(cluster, reply_id)
            await streams_past(far, reply_id, len(doc["content"]) + 20)  # it goes on, from its new owner
        await third.send({"type": "stop", "session_id": third.connected["session_id"]})
        await third.recv_type("stop_ack")
        truth = None
        for client in (far, third):
            final = await until_final(client, reply_id)
            truth = truth or stored(cluster, reply_id)
            assert (final["status"], final["content"]) == ("stopped", truth["content"]) == (truth["status"],
                                                                                            truth["content"])
            assert client.ledger.of(reply_id).text == truth["content"]
        assert truth.get("continuations", 0) == (1 if when == "after it" else 0)
        await asyncio.sleep(LIVENESS)
        for client in (far, third):
            await nothing_more(client, reply_id)
            client.close()
    finally:
        owner.start()
        await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)


async def test_a_reset_during_a_handover_leaves_nothing_to_continue(cluster):
    where = await spread(cluster)
    owner, b, _ = cluster.instances
    sender = await connect(cluster, "medium", src=where[owner.id], user="resetter")
    far = await connect(cluster, "medium", src=where[b.id], user="resetter")
    session_id = far.connected["session_id"]
    reply_id = (await sender.say(QUESTION))["data"]["reply_message_id"]
    await reply_frames(far, reply_id, 10)
    owner.proc.kill()
    owner.proc.wait()
    try:
        code, body, _ = await fetch(cluster, f"/api/v1/pipelines/medium/sessions/{session_id}/reset",
                                    method="POST", src=where[b.id], user="resetter")
        assert code == 200, body
        await far.recv_type("session.reset")
        await asyncio.sleep(LIVENESS * 2)  # the survivors find the owner gone: nothing is left to take over
        with MongoClient(cluster.mongo_url) as db:
            assert db[cluster.db_name].messages.count_documents({"session_id": session_id}) == 0
        await nothing_more(far, reply_id)
        assert far.ledger.of(reply_id).finals == []
        far.close()
        sender.close()
    finally:
        owner.start()
        await asyncio.get_running_loop().run_in_executor(None, owner.wait_ready)
