"""The nginx-fronted cluster: three real instances on one store behind a real nginx (tests/cluster.py)."""
import asyncio
import random
import re
import signal

import pytest
from pymongo import MongoClient
from tornado.httpclient import HTTPClientError
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from nginx.cluster import Cluster, nginx_binary
from services.storage.embedded_mongo import EmbeddedMongo, free_port
from services.storage.store import assemble
from tests.conftest import require
from tests.test_resume import Received, abort, follow, nothing_more, send_resume
from tests.upstream import FakeUpstream, Script
from tests.cluster import JWT_SECRET, LEASE, cluster, pipelines_toml, plain, connect, fetch, instance_for, source, spread, wait_for  # noqa: F401 (a fixture)

pytestmark = pytest.mark.gen_test(timeout=300)  # a bound for a loaded machine, not a speed


async def test_ip_hash_keeps_an_address_on_one_backend_and_spreads_networks(cluster):
    landed = {}
    for n in range(1, 13):
        seen = {await instance_for(cluster, source(n)) for _ in range(3)}
        assert len(seen) == 1, f"{source(n)} answered by {seen}"
        landed[source(n)] = seen.pop()
    assert set(landed.values()) == {i.id for i in cluster.instances}, landed
    # ip_hash hashes the /24: another address of the same network lands on the same backend
    assert await instance_for(cluster, "127.0.1.77") == landed[source(1)]

    # a WebSocket follows the same hash, and works through the proxy
    for n in (1, 2, 3):
        client = await connect(cluster, src=source(n), user=f"u{n}")
        assert client.instance == landed[source(n)]
        ack = await client.say("hello through nginx")
        final = (await client.until_final(ack["data"]["reply_message_id"], timeout=20))[-1]["data"]
        assert final["status"] == "completed" and final["content"]
        client.close()


async def test_the_client_address_comes_from_nginx_and_never_from_a_direct_client(cluster):
    via_nginx = await connect(cluster, src=source(4), user="addr")
    backend = cluster.by_id(via_nginx.instance)
    # the same user, straight to the backend, claiming another address
    direct = await connect(cluster, src=source(5), user="addr", base=backend.url,
                           headers={"X-Real-IP": "10.9.9.9", "X-Forwarded-For": "10.9.9.8"})
    code, body, _ = await fetch(cluster, "/api/v1/pipelines/default/ws/connections", admin=True,
                                base=backend.url, src="127.0.0.1")
    assert code == 200, body
    addresses = {c["connection_id"]: c["remote_ip"] for c in body["data"]["connections"]}
    assert addresses[via_nginx.connected["connection_id"]] == source(4)
    assert addresses[direct.connected["connection_id"]] == source(5)
    via_nginx.close()
    direct.close()


def test_cluster_mode_without_a_shared_store_refuses_to_start(tmp_path):
    import subprocess
    import sys
    from nginx.cluster import ROOT
    out = subprocess.run([sys.executable, "server.py", "--cluster", "--data-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--cluster needs --mongo-url" in out.stderr


async def test_group_replies_run_one_at_a_time_across_instances(cluster):
    members = ["g1", "g2", "g3"]
    clients = [await connect(cluster, "paced", src=source(n + 1), user=u) for n, u in enumerate(members)]
    assert len({c.instance for c in clients}) == 3
    code, body, _ = await fetch(cluster, "/api/v1/pipelines/paced/sessions", method="POST", user="g1",
                                body={"session_type": "group", "members": members})
    assert code in (200, 201), body
    session_id = body["data"]["session_id"]
    for c in clients:
        await c.send({"type": "session.join", "session_id": session_id})
        await c.recv_type("session.joined")
    sends = [c.send({"type": "message", "message": [{"type": "Plain", "text": f"from {c.connected['user_id']} #{i}"}],
                     "session_id": session_id}) for i in range(3) for c in clients]
    await asyncio.gather(*sends)  # all at once, through three instances

    async def watch(client):
        """What one member saw, in arrival order: user messages (seq) and replies (seq of the first frame, and
        of the final), and for each reply whether its question's echo came first."""
        acks, echoes, started, finals, question_first = [], [], [], [], {}
        while len(acks) < 3 or len(echoes) < 9 or len(finals) < 9:
            frame = await client.recv_type("ack", "error", "user_message", "response", timeout=30)
            assert frame["type"] != "error", frame
            data = frame["data"]
            if frame["type"] == "ack":
                acks.append(data)
            elif frame["type"] == "user_message":
                echoes.append((data["seq"], data["message_id"]))
            else:
                if data["message_id"] not in question_first:
                    started.append(data["seq"])
                    question_first[data["message_id"]] = data["reply_to"] in {m for _, m in echoes}
                if data["is_final"]:
                    finals.append((data["seq"], data["message_id"], data["status"]))
        return acks, echoes, finals, started, question_first

    seen = await asyncio.gather(*(watch(c) for c in clients))
    acks = [a for got in seen for a in got[0]]
    reply_ids = {a["reply_message_id"] for a in acks}
    user_ids = {a["message_id"] for a in acks}
    for _, echoes, finals, started, question_first in seen:
        # everyone saw every message and every reply, each in one order: the store's (seq)
        assert {m for _, m in echoes} == user_ids
        assert echoes == seen[0][1] == sorted(echoes), "user messages reached members in different orders"
        assert finals == seen[0][2] == sorted(finals)
        assert started == seen[0][3] == sorted(started)
        assert all(question_first.values()), "a reply was shown before its question"
        assert {m for _, m, _ in finals} == reply_ids
        assert {status for _, _, status in finals} == {"completed"}

    async def all_done():
        code, body, _ = await fetch(cluster, f"/api/v1/pipelines/paced/sessions/{session_id}/messages?limit=100",
                                    user="g1")
        replies = [m for m in body["data"]["messages"] if m["message_id"] in reply_ids]
        return replies if len(replies) == 9 and all(m["is_final"] for m in replies) else None

    replies = await wait_for(all_done)
    assert {m["status"] for m in replies} == {"completed"}
    with MongoClient(cluster.mongo_url) as client:
        docs = list(client[cluster.db_name].messages.find({"_id": {"$in": list(reply_ids)}}))
    spans = sorted((d["started_at"], d["finished_at"], d["seq"], d["instance"]) for d in docs)
    for earlier, later in zip(spans, spans[1:]):
        assert earlier[1] <= later[0], f"replies overlapped: {earlier} and {later}"
    assert [s[2] for s in spans] == sorted(s[2] for s in spans), "replies ran out of acceptance order"
    assert len({s[3] for s in spans}) == 3  # generated on all three instances
    for c in clients:
        c.close()


async def test_session_busy_counts_replies_waiting_on_every_instance(cluster):
    where = await spread(cluster)
    clients = [await connect(cluster, "endless", src=src, user="busy") for src in where.values()]
    session_id = clients[0].connected["session_id"]  # the user's default session, the same everywhere
    assert {c.connected["session_id"] for c in clients} == {session_id}
    answers = []
    for round_ in range(4):  # 12 sends, at most 4 per instance: only a shared count can refuse any
        for c in clients:
            answers.append(await c.say(f"round {round_}"))
    busy = [a for a in answers if a["type"] == "error"]
    accepted = [a for a in answers if a["type"] == "ack"]
    assert busy and all(a["code"] == "session_busy" for a in busy), busy
    assert len(accepted) == 9  # --max-queued 8: eight waiting behind the running one
    code, body, _ = await fetch(cluster, f"/api/v1/pipelines/endless/sessions/{session_id}/stop", method="POST",
                                src=where[cluster.instances[0].id], user="busy")
    assert code == 200, body

    async def all_ended():
        code, body, _ = await fetch(cluster, f"/api/v1/pipelines/endless/sessions/{session_id}/messages?limit=100",
                                    user="busy")
        replies = [m for m in body["data"]["messages"] if m["role"] == "assistant"]
        return replies if all(m["is_final"] for m in replies) else None

    replies = await wait_for(all_ended)
    assert {m["status"] for m in replies} == {"stopped"}
    for c in clients:
        c.close()


async def test_sigterm_drains_clients_to_other_instances_and_hands_their_replies_over(cluster):
    where = await spread(cluster)
    victim = cluster.instances[1]
    src = where[victim.id]
    client = await connect(cluster, "slow", src=src, user="drained")
    assert client.instance == victim.id
    got = Received((await client.say("keep talking"))["data"]["reply_message_id"])
    for _ in range(10):
        got.add(await client.recv_type("response"))
    victim.signal(signal.SIGTERM)
    try:
        while True:  # the rest of what was in flight, then `reconnect`, then close 1012
            frame = await client.recv(timeout=20)
            assert frame is not None, "closed without a reconnect frame"
            if frame["type"] == "reconnect":
                break
            if frame["type"] == "response":
                got.add(frame)
        assert await client.wait_closed(timeout=20) == (1012, "server restarting")
        # new sockets from the same address go to another instance at once
        moved = await connect(cluster, "slow", src=src, user="drained")
        assert moved.instance != victim.id
        await resume(moved, got)
        await follow(moved, got, timeout=20)  # followed to the final, from where it went on
        assert await asyncio.get_running_loop().run_in_executor(None, victim.proc.wait, 120) == 0
        final = got.finals[0]
        assert len(got.finals) == 1
        # the draining instance handed the reply over: another went on with it, from its very end, to the end
        assert final["status"] == "completed" and final["content"] == got.joined(got.text)
        assert final["continued"] == 1
        doc = stored(cluster, got.message_id)
        assert left_streaming(cluster, victim.id) == 0
        assert doc["status"] == "completed" and doc["content"] == final["content"]
        assert [c["reason"] for c in doc["continued"]] == ["drain"]
        moved.close()
    finally:
        if victim.proc.poll() is not None:
            victim.start()
        await asyncio.get_running_loop().run_in_executor(None, victim.wait_ready)


async def resume(client, got):
    """Send `resume` for what `got` has; True when the reply's final arrived before `resumed` (it crossed the
    resume). Deltas before `resumed` are not counted: the resume asks again from the client's offsets."""
    resumed, early = await send_resume(client, got)
    return early


def stored(cluster, message_id):
    with MongoClient(cluster.mongo_url) as db:
        return assemble(db[cluster.db_name].messages.find_one({"_id": message_id}))


def left_streaming(cluster, instance_id):
    with MongoClient(cluster.mongo_url) as db:
        return db[cluster.db_name].messages.count_documents({"status": {"$in": ["queued", "streaming"]},
                                                           "instance": instance_id})


async def restart(instance):
    instance.stop()
    instance.start()
    await asyncio.get_running_loop().run_in_executor(None, instance.wait_ready)


async def test_sigstop_past_the_lease_then_sigcont_cannot_overwrite_the_final(cluster):
    # (a pipeline whose replies are not continued elsewhere: tests/test_failover.py has the ones that are)
    where = await spread(cluster)
    owner = cluster.instances[2]
    client = await connect(cluster, "slow_once", src=where[owner.id], user="paused")
    got = Received((await client.say("pause me"))["data"]["reply_message_id"])
    for _ in range(10):
        got.add(await client.recv_type("response"))
    owner.signal(signal.SIGSTOP)
    try:
        async def reaped():
            doc = stored(cluster, got.message_id)
            return doc if doc["status"] == "interrupted" else None
        truth = await wait_for(reaped)
    finally:
        owner.signal(signal.SIGCONT)
    assert truth["error"]["code"] == "instance_lost"
    await follow(client, got, timeout=20)  # the woken owner tells its client what the store says
    final = got.finals[0]
    assert final["status"] == "interrupted" and final["content"] == truth["content"]

    async def fenced():  # the woken owner tried to write, and was refused
        code, text = await plain(owner.metrics_url)
        return re.search(r"^parley_fenced_writes_refused_total [1-9]", text, re.M)
    await wait_for(fenced)
    after = stored(cluster, got.message_id)
    assert (after["status"], after["content"], after["epoch"]) == ("interrupted", truth["content"], truth["epoch"])
    assert left_streaming(cluster, owner.id) == 0
    client.close()
async def test_kill_9_of_the_owner_clients_get_interrupted_with_the_checkpointed_text(cluster):
    # (on_instance_lost = interrupt: tests/test_failover.py has the reply that goes on)
    where = await spread(cluster)
    owner = cluster.instances[0]
    client = await connect(cluster, "slow_once", src=where[owner.id], user="killed")
    got = Received((await client.say("then the lights went out"))["data"]["reply_message_id"])
    for _ in range(20):
        got.add(await client.recv_type("response"))
    owner.proc.kill()
    owner.proc.wait()
    try:
        await client.wait_closed(timeout=20)
        moved = await connect(cluster, "slow_once", src=where[owner.id], user="killed")  # nginx picks a live one
        assert moved.instance != owner.id
        await resume(moved, got)
        await follow(moved, got)  # once the lease expires, another instance's reaper ends it
        final = got.finals[0]
        truth = stored(cluster, got.message_id)
        assert final["status"] == truth["status"] == "interrupted"
        assert final["error"]["code"] == "instance_lost"
        assert final["content"] == truth["content"] and truth["content"]  # the checkpointed text
        assert left_streaming(cluster, owner.id) == 0
        moved.close()
    finally:
        await restart(owner)


@pytest.mark.parametrize("via", ["ws", "rest"])
async def test_a_stop_through_any_instance_stops_the_reply_where_it_generates(cluster, via):
    upstream = FakeUpstream()
    await upstream.start(cluster.upstream_port)
    try:
        upstream.plan("m", Script(content=[f"w{i} " for i in range(5000)], rate=200))
        where = await spread(cluster)
        ids = [i.id for i in cluster.instances]
        # three viewers of one session, one per instance; the reply generates where the first one is
        viewers = [await connect(cluster, "up", src=where[i], user="stopper") for i in ids]
        session_id = viewers[0].connected["session_id"]
        got = [Received((await viewers[0].say("talk until stopped"))["data"]["reply_message_id"])]
        got += [Received(got[0].message_id) for _ in viewers[1:]]
        for v, g in zip(viewers, got):
            await resume(v, g)  # the other instances' viewers follow it from the start
        await wait_for(lambda: _async(len(upstream.calls) == 1))
        for _ in range(5):
            got[1].add(await next_of(viewers[1], got[1].message_id))  # it streams on the second instance too
        # stop from an instance that is not generating it
        if via == "ws":
            await viewers[2].send({"type": "stop", "session_id": session_id})
        else:
            code, body, answered = await fetch(cluster, f"/api/v1/pipelines/up/sessions/{session_id}/stop",
                                               method="POST", src=where[ids[1]], user="stopper")
            assert code == 200 and answered == ids[1], body
        await upstream.calls[0].wait_disconnect(20)  # the upstream request was closed by the owner
        for v, g in zip(viewers, got):
            await follow(v, g, timeout=20)
            assert len(g.finals) == 1 and g.finals[0]["status"] == "stopped"
            await nothing_more(v, g.message_id)
        assert stored(cluster, got[0].message_id)["status"] == "stopped"
        for v in viewers:
            v.close()
    finally:
        await upstream.stop()


async def _async(value):
    return value


async def next_of(client, message_id):
    while True:
        frame = await client.recv_type("response", timeout=20)
        if frame["data"]["message_id"] == message_id:
            return frame


async def frame_of(client, kind, timeout=20):
    return await client.recv_type(kind, timeout=timeout)


async def presence_of(client, user_id):
    """The next presence frame about `user_id` (others, such as one's own join, are skipped): (event, online)."""
    while (frame := await frame_of(client, "presence"))["data"].get("user_id") != user_id:
        pass
    return frame["data"]["event"], frame["data"]["online"]


async def test_broadcast_push_presence_membership_and_reset_cross_instances(cluster):
    where = await spread(cluster)
    one, two, three = (where[i.id] for i in cluster.instances)
    owner = await connect(cluster, src=one, user="ann")
    ann_phone = await connect(cluster, src=three, user="ann")
    bob = await connect(cluster, src=two, user="bob")
    assert len({owner.instance, ann_phone.instance, bob.instance}) == 3

    code, body, _ = await fetch(cluster, "/api/v1/broadcast", method="POST", src=two, admin=True,
                                body={"message": "maintenance at noon"})
    assert code == 200, body
    for c in (owner, ann_phone, bob):
        assert (await frame_of(c, "broadcast"))["message"] == "maintenance at noon"

    code, body, _ = await fetch(cluster, "/api/v1/users/ann/push", method="POST", src=two, admin=True,
                                body={"message": "for ann's devices"})
    assert code == 200, body
    for c in (owner, ann_phone):
        assert (await frame_of(c, "push"))["data"]["message"] == "for ann's devices"

    code, body, _ = await fetch(cluster, "/api/v1/pipelines/default/sessions", method="POST", src=one, user="ann",
                                body={"session_type": "group", "members": ["bob"]})
    assert code in (200, 201), body
    session_id = body["data"]["session_id"]
    await owner.send({"type": "session.join", "session_id": session_id})
    await frame_of(owner, "session.joined")
    await bob.send({"type": "session.join", "session_id": session_id})
    await frame_of(bob, "session.joined")
    assert await presence_of(owner, "bob") == ("join", ["ann", "bob"])  # bob came online on another instance

    async def online_for_bob():  # who is online, as bob's instance sees it (ann is on another one)
        await bob.send({"type": "presence", "session_id": session_id})
        while (frame := await frame_of(bob, "presence"))["data"]["event"] != "snapshot":
            pass
        return frame["data"]["online"] == ["ann", "bob"]
    await wait_for(online_for_bob, timeout=20, interval=0.2)

    ack = await bob.say("hello group", session_id=session_id)
    echo = await frame_of(owner, "user_message")
    assert echo["data"]["message_id"] == ack["data"]["message_id"]
    final = (await owner.until_final(ack["data"]["reply_message_id"], timeout=20))[-1]["data"]
    assert final["status"] == "completed"

    code, body, _ = await fetch(cluster, f"/api/v1/pipelines/default/sessions/{session_id}/reset", method="POST",
                                src=three, user="ann")
    assert code == 200, body
    for c in (owner, bob):
        assert (await frame_of(c, "session.reset"))["data"]["session_id"] == session_id

    code, body, _ = await fetch(cluster, f"/api/v1/pipelines/default/sessions/{session_id}/members",
                                method="POST", src=three, user="ann", body={"remove": ["bob"]})
    assert code == 200, body
    left = await frame_of(bob, "session.left")
    assert left["data"] == {"session_id": session_id, "reason": "removed"}
    members = await frame_of(owner, "session.members")  # the change went through another instance
    assert (members["data"]["members"], members["data"]["removed"]) == (["ann"], ["bob"])
    assert await presence_of(owner, "bob") == ("leave", ["ann"])
    for c in (owner, ann_phone, bob):
        c.close()
async def test_200_clients_moved_mid_reply_resume_with_no_gap_no_duplicate_and_follow_live(cluster):
    where = await spread(cluster)
    ids = [i.id for i in cluster.instances]
    rng = random.Random(20261129)
    plans = [[(rng.randrange(0, 80), rng.choice(["close", "drop"])) for _ in range(20)] for _ in range(10)]
    outcomes = []

    async def worker(w):
        user = f"mover{w}"
        first, second = where[ids[w % 3]], where[ids[(w + 1) % 3]]
        for run, (cut, how) in enumerate(plans[w]):
            a = await connect(cluster, "cuttable", src=first, user=user)
            await a.send({"type": "message", "message": [{"type": "Plain", "text": f"run {run}"}],
                          "client_msg_id": f"{w}-{run}"})
            got = Received((await a.recv_type("ack", timeout=20))["data"]["reply_message_id"])
            while len(got.text) + len(got.thinking) < cut and not got.finals:
                got.add(await next_of(a, got.message_id))
            abort(a, how)
            b = await connect(cluster, "cuttable", src=second, user=user)  # another instance
            assert b.instance != a.instance
            early = await resume(b, got)
            await follow(b, got, timeout=20)
            final = got.finals[0]
            assert len(got.finals) == 1 and final["status"] == "completed"
            text, thinking = got.joined(got.text), got.joined(got.thinking)
            if early:  # the final crossed the resume: it carries the whole text, and nothing follows it
                assert final["content"].startswith(text) and final.get("thinking", "").startswith(thinking)
                outcomes.append("final first")
            else:
                assert text == final["content"] and thinking == final.get("thinking", "")
                outcomes.append("mid" if cut < len(text) + len(thinking) else "after end")
            b.close()

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(10))), 280)
    assert len(outcomes) == 200 and outcomes.count("mid") >= 50, sorted(set(outcomes))


async def connect_retrying(cluster, pipeline, *, src, user, attempts=80):
    """Connect through nginx while instances restart: a refused or closed attempt is tried again (bounded)."""
    for _ in range(attempts - 1):
        try:
            return await connect(cluster, pipeline, src=src, user=user)
        except (OSError, HTTPClientError, StreamClosedError, WebSocketClosedError, AssertionError,
                asyncio.TimeoutError):
            await asyncio.sleep(0.25)
    return await connect(cluster, pipeline, src=src, user=user)


async def test_rolling_restart_under_load_loses_no_accepted_message(cluster):
    """SIGTERM, restart and wait for each instance in turn while six users chat without pause: every acked
    message is stored and its reply ended, and every reply ended in exactly one final on the client following it
    (across its reconnects), with no gap and no duplicate in its text."""
    where = await spread(cluster)
    sources = list(where.values())
    loop = asyncio.get_running_loop()
    rolling = asyncio.Event()
    acked = {}          # user message id -> reply id
    followed = []       # (reply id, its one final, the text the client assembled, final crossed the resume)
    stray_finals = []   # finals of a reply other than the one its client was following: a duplicate
    reconnects = []

    async def reopen(w, got):
        reconnects.append(w)
        while True:
            conn = await connect_retrying(cluster, "steady", src=sources[w % 3], user=f"roll{w}")
            if got is None:
                return conn, False
            try:
                return conn, await resume(conn, got)
            except (AssertionError, asyncio.TimeoutError, WebSocketClosedError, StreamClosedError):
                conn.close()  # that instance began draining too: once more

    async def worker(w):
        conn, _ = await reopen(w, None)
        n = 0
        while not rolling.is_set() or n == 0:
            client_msg_id = f"roll-{w}-{n}"
            n += 1
            while True:  # until acked: a repeat of the client_msg_id after a reconnect is the same message
                before_ack = []  # a repeat's reply may end (its final reach this socket) before the ack does
                try:
                    await conn.send({"type": "message", "message": [{"type": "Plain", "text": client_msg_id}],
                                     "client_msg_id": client_msg_id})
                    while (ack := await conn.recv(timeout=30)) is not None and ack["type"] not in ("ack", "error"):
                        before_ack.append(ack)
                    assert ack is not None, "closed before the ack"
                    break
                except (AssertionError, WebSocketClosedError, StreamClosedError):
                    conn, _ = await reopen(w, None)
            assert ack["type"] == "ack", ack
            got = Received(ack["data"]["reply_message_id"])
            for frame in before_ack:
                if frame["type"] in ("response", "rewind") and frame["data"]["message_id"] == got.message_id:
                    got.add(frame)
            acked[ack["data"]["message_id"]] = got.message_id
            early = bool(got.finals)  # a repeat's reply whose final came before the ack
            if ack["data"]["duplicate"] and not early:  # a repeat after a reconnect: it may have ended meanwhile
                try:
                    early = await resume(conn, got)  # (as a client does: the state of the reply, from the store)
                except (AssertionError, asyncio.TimeoutError, WebSocketClosedError, StreamClosedError):
                    conn, early = await reopen(w, got)
            while not got.finals:
                try:
                    frame = await conn.recv(timeout=30)
                except WebSocketClosedError:
                    frame = None
                if frame is None:
                    conn, early = await reopen(w, got)
                elif frame["type"] in ("response", "rewind"):  # a rewind takes text back, as a client applies it
                    if frame["data"]["message_id"] == got.message_id:
                        got.add(frame)
                    elif frame["type"] == "response" and frame["data"]["is_final"]:
                        stray_finals.append(frame["data"])
            followed.append((got.message_id, got.finals[0], got.joined(got.text), early))
        conn.close()

    async def roll():
        for instance in cluster.instances:
            before = len(acked)
            await wait_for(lambda: _async(len(acked) >= before + 6))  # the load runs meanwhile
            instance.signal(signal.SIGTERM)
            assert await loop.run_in_executor(None, instance.proc.wait, 120) == 0
            instance.start()
            await loop.run_in_executor(None, instance.wait_ready)
        before = len(acked)
        await wait_for(lambda: _async(len(acked) >= before + 6))
        rolling.set()

    await asyncio.wait_for(asyncio.gather(roll(), *(worker(w) for w in range(6))), 280)
    assert len(set(reconnects)) == 6 and len(reconnects) > 6, "no client was moved by the restarts"
    assert not stray_finals, stray_finals
    assert len(followed) == len(acked) == len({r for r, *_ in followed})
    with MongoClient(cluster.mongo_url) as db:
        messages = db[cluster.db_name].messages
        users = {d["_id"] for d in messages.find({"_id": {"$in": list(acked)}, "role": "user"})}
        replies = {d["_id"]: assemble(d) for d in messages.find({"_id": {"$in": list(acked.values())}})}
    assert users == set(acked), "an acked message is missing from the store"
    for reply_id, final, text, early in followed:
        truth = replies[reply_id]
        assert truth["status"] in ("completed", "interrupted"), truth["status"]
        assert (final["status"], final["content"]) == (truth["status"], truth["content"])
        assert final["content"].startswith(text) if early else text == final["content"]
    statuses = [replies[r]["status"] for r, *_ in followed]
    assert statuses.count("completed") >= len(statuses) // 2, statuses


async def test_a_follower_on_another_instance_reaches_the_final_after_the_store_restarts(tmp_path):
    """Break the change stream for real: kill -9 the shared store (nx-27017) while a client on B follows a reply
    generating on A, keep it down past --store-timeout (the stream errors out, nothing resumes it
    transparently), then start it again on the same port and data directory. B reopens its stream from its resume
    token and, unable to prove it missed nothing, resynchronizes the followed reply from the store: the follower
    gets the rest with no gap and no duplicate, and one final."""
    require(nginx_binary(), "nginx is not installed (Debian package nginx)")
    store = EmbeddedMongo(tmp_path / "store").start()
    cluster = Cluster(tmp_path / "cluster", instances=2, mongo_url=store.url, db_name="restart",
                      pipelines_file=_pipelines_file(tmp_path), env={"PARLEY_JWT_SECRET": JWT_SECRET},
                      extra_args=["--auth", "jwt", "--lease-seconds", "60", "--store-timeout", "1",
                                  "--checkpoint-interval", "0.05", "--log-level", "info"])
    try:
        await asyncio.get_running_loop().run_in_executor(None, cluster.start)
        a, b = cluster.instances
        writer = await connect(cluster, "slow", user="outage", base=a.url)
        follower = await connect(cluster, "slow", user="outage", base=b.url)
        got = Received((await writer.say("keep going through the outage"))["data"]["reply_message_id"])
        await resume(follower, got)
        for _ in range(20):
            got.add(await next_of(follower, got.message_id))  # it crosses from A to B
        log_b = b.log_path.read_text()
        store.process.kill()
        store.process.wait()
        await wait_for(lambda: _async("change stream" in b.log_path.read_text()[len(log_b):]))
        store = EmbeddedMongo(tmp_path / "store", port=store.port).start()
        await follow(follower, got, timeout=60)
        assert len(got.finals) == 1 and got.finals[0]["status"] == "completed"
        assert got.joined(got.text) == got.finals[0]["content"]  # every character once, none missing
        await nothing_more(follower, got.message_id)
        assert "resynchroniz" in b.log_path.read_text()[len(log_b):]
        writer.close()
        follower.close()
    finally:
        cluster.stop()
        store.stop()


def _pipelines_file(tmp_path):
    path = tmp_path / "pipelines.toml"
    path.write_text(pipelines_toml(free_port()))
    return path


def test_the_cluster_bench_runs_in_quick_mode(tmp_path):
    """bench/cluster.py (stop across instances, follower lag) cannot rot: a quick run measures every row. No
    timing is asserted (the numbers go in docs/performance.md)."""
    import json
    import subprocess
    import sys
    from nginx.cluster import ROOT
    require(nginx_binary(), "nginx is not installed (Debian package nginx)")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "cluster", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"stop_across_instances", "follower_lag", "failover_continued", "failover_text",
                            "failover_interrupted"}, results
    assert results["failover_text"]["parley"]["final_text_mismatches"] == 0  # each continued final is whole
    stop, lag = results["stop_across_instances"], results["follower_lag"]
    assert stop["parley"]["reps"] == stop["same_instance"]["reps"] == 3
    assert lag["follower"]["reps"] > 0 and lag["owner_viewer"]["reps"] > 0
    # two kills each, two viewers each: every viewer timed, and what it had to drop counted
    for kind in ("failover_continued", "failover_interrupted"):
        assert results[kind]["parley"]["reps"] == 4 and results[kind]["parley"]["dropped_chars_max"] >= 0
    assert "| stop_across_instances | stop→final p99 ms | parley |" in proc.stdout


async def said(sender, viewers, text):
    """`sender` sends `text`; every viewer (the sender among them) gets its echo and then its reply's final.
    Returns the ack's data and the echoes' data."""
    await sender.send({"type": "message", "message": [{"type": "Plain", "text": text}]})
    echoes, ack = {}, None
    while ack is None:  # the sender's own echo comes before its ack
        frame = await sender.recv_type("ack", "error", "user_message")
        assert frame["type"] != "error", frame
        if frame["type"] == "ack":
            ack = frame["data"]
        else:
            echoes[sender] = frame["data"]
    for v in viewers:
        if v not in echoes:
            echoes[v] = (await v.recv_type("user_message"))["data"]
        assert echoes[v]["message_id"] == ack["message_id"]
        await v.until_final(ack["reply_message_id"])
    return ack, list(echoes.values())


def store_without_event(cluster, session_id, text, reply="from the store only"):
    """What a send stores when its instance dies before its bus write: the numbers reserved, the user message and
    its ended reply inserted, and no event ever published. Returns (user id, reply id, user seq)."""
    from datetime import datetime, timezone
    from pymongo import ReturnDocument
    from services.storage.store import new_id
    now = datetime.now(timezone.utc)
    with MongoClient(cluster.mongo_url) as db:
        store = db[cluster.db_name]
        session = store.sessions.find_one_and_update({"_id": session_id}, {"$inc": {"next_seq": 2}},
                                                     return_document=ReturnDocument.AFTER)
        seq = session["next_seq"] - 1
        user = {"_id": new_id(), "session_id": session_id, "pipeline": session["pipeline"], "seq": seq,
                "role": "user", "content": text, "chain": [{"type": "Plain", "text": text}], "status": "completed",
                "sender": session["owner"], "created_at": now, "updated_at": now}
        answer = {"_id": new_id(), "session_id": session_id, "pipeline": session["pipeline"], "seq": seq + 1,
                  "role": "assistant", "content": reply, "thinking": "", "status": "completed", "epoch": 1,
                  "length": len(reply), "thinking_length": 0, "reply_to": user["_id"], "created_at": now,
                  "updated_at": now, "started_at": now, "finished_at": now, "instance": "gone"}
        store.messages.insert_many([user, answer])
    return user["_id"], answer["_id"], seq


async def test_the_last_message_of_a_session_whose_event_was_lost_reaches_every_viewer_from_the_store(cluster):
    """A send's instance stores the message and its reply, then dies before its bus write: no event will ever come,
    and no later message shows the gap. The viewers on every instance still get the message and the reply's
    final, from the store, and then the conversation goes on in order."""
    where = await spread(cluster)
    viewers = [await connect(cluster, src=where[i.id], user="lossy") for i in cluster.instances]
    session_id = viewers[0].connected["session_id"]
    await said(viewers[0], viewers, "before the loss")
    user_id, reply_id, seq = store_without_event(cluster, session_id, "stored, never announced")
    for v in viewers:
        echo = await v.recv_type("user_message", timeout=30)
        assert (echo["data"]["message_id"], echo["data"]["seq"]) == (user_id, seq)
        final = (await v.until_final(reply_id, timeout=30))[-1]["data"]
        assert (final["status"], final["content"]) == ("completed", "from the store only")
    _, echoes = await said(viewers[1], viewers, "after the loss")
    assert {e["seq"] for e in echoes} == {seq + 2}  # the next one, in order, and nothing of the lost one twice
    for v in viewers:
        await nothing_more(v, reply_id)
    for v in viewers:
        v.close()


async def next_presence(client, skip=()):
    """The next presence frame about a user not in `skip`: (event, user, online)."""
    while (data := (await frame_of(client, "presence"))["data"]).get("user_id") in skip:
        pass
    return data["event"], data.get("user_id"), data["online"]


async def test_a_user_with_tabs_on_two_instances_is_online_once_and_leaves_with_the_last_tab(cluster):
    """Presence is per user across instances. The events of one instance reach the others in the order it
    published them, so a marker (another user's join on the same instance, published after the tab's) shows that
    nothing was announced about the tab in between."""
    where = await spread(cluster)
    one, two, three = (where[i.id] for i in cluster.instances)
    code, body, _ = await fetch(cluster, "/api/v1/pipelines/default/sessions", method="POST", src=three,
                                user="w1", body={"session_type": "group", "members": ["w2", "tabs", "m1", "m2"]})
    assert code in (200, 201), body
    session_id = body["data"]["session_id"]

    async def join(src, user):
        client = await connect(cluster, src=src, user=user)
        await client.send({"type": "session.join", "session_id": session_id})
        await frame_of(client, "session.joined")
        return client

    watchers = [await join(three, "w1"), await join(one, "w2")]  # on a third instance, and beside the first tab
    skip = ("w1", "w2")
    for w in watchers:  # each instance knows the other watcher is online before the tabs come (the bus is async)
        for _ in range(300):  # bounded: 300 snapshots, 0.2 s apart
            await w.send({"type": "presence", "session_id": session_id})
            while (data := (await frame_of(w, "presence"))["data"])["event"] != "snapshot":
                pass
            if data["online"] == ["w1", "w2"]:
                break
            await asyncio.sleep(0.2)
        assert data["online"] == ["w1", "w2"], data

    async def everyone_sees(event, user, online):
        for w in watchers:
            assert await next_presence(w, skip) == (event, user, sorted(online))

    tab1 = await join(one, "tabs")
    await everyone_sees("join", "tabs", ["w1", "w2", "tabs"])
    tab2 = await join(two, "tabs")  # the same user on another instance: not news
    m1 = await join(two, "m1")
    await everyone_sees("join", "m1", ["w1", "w2", "tabs", "m1"])
    await tab1.send({"type": "session.leave", "session_id": session_id})  # tab 2 still views it: still online
    await frame_of(tab1, "session.left")
    m2 = await join(one, "m2")
    await everyone_sees("join", "m2", ["w1", "w2", "tabs", "m1", "m2"])
    tab2.close()  # the last tab anywhere
    await everyone_sees("leave", "tabs", ["w1", "w2", "m1", "m2"])
    for c in (*watchers, tab1, m1, m2):
        c.close()


async def test_the_first_reply_after_a_reset_starts_at_once_and_replies_keep_their_order(cluster):
    """A reset deletes the session's messages: a reply waiting for earlier numbers of its session to be stored
    (a send accepted just before it elsewhere) must not wait for the deleted ones. And after it, replies sent at
    once through three instances still run one at a time in acceptance order, each shown after its question."""
    where = await spread(cluster)
    viewers = [await connect(cluster, "paced", src=where[i.id], user="resetter") for i in cluster.instances]
    session_id = viewers[0].connected["session_id"]
    await said(viewers[0], viewers, "before the reset")
    code, body, _ = await fetch(cluster, f"/api/v1/pipelines/paced/sessions/{session_id}/reset", method="POST",
                                src=where[cluster.instances[2].id], user="resetter")
    assert code == 200 and body["data"]["deleted"] == 2, body
    for v in viewers:
        await frame_of(v, "session.reset")
    owner = cluster.by_id(viewers[0].instance)
    log_before = len(owner.log_path.read_text())
    ack, _ = await said(viewers[0], viewers, "the first after the reset")
    waited = [line for line in owner.log_path.read_text()[log_before:].splitlines()
              if f"message_id={ack['reply_message_id']} waited" in line]
    assert not waited, waited  # it did not wait for the numbers the reset deleted

    await asyncio.gather(*(v.send({"type": "message", "message": [{"type": "Plain", "text": f"at once {n}"}]})
                           for n, v in enumerate(viewers)))
    seen = []
    for v in viewers:
        echoes, finals, shown = [], [], set()
        while len(echoes) < 3 or len(finals) < 3:
            frame = await v.recv_type("user_message", "response", "error")
            assert frame["type"] != "error", frame
            data = frame["data"]
            if frame["type"] == "user_message":
                echoes.append(data["seq"])
                shown.add(data["message_id"])
            else:
                assert data["reply_to"] in shown, "a reply was shown before its question"
                if data["is_final"]:
                    finals.append((data["seq"], data["message_id"], data["status"]))
        seen.append((echoes, finals))
    for echoes, finals in seen:
        assert echoes == sorted(echoes) == seen[0][0]
        assert finals == sorted(finals) == seen[0][1]
        assert {status for *_, status in finals} == {"completed"}
    with MongoClient(cluster.mongo_url) as db:
        docs = list(db[cluster.db_name].messages.find({"_id": {"$in": [m for _, m, _ in seen[0][1]]}}))
    spans = sorted((d["started_at"], d["finished_at"], d["seq"]) for d in docs)
    for earlier, later in zip(spans, spans[1:]):
        assert earlier[1] <= later[0], f"replies overlapped: {earlier} and {later}"
    assert [s[2] for s in spans] == sorted(s[2] for s in spans), "replies ran out of acceptance order"
    for v in viewers:
        v.close()
