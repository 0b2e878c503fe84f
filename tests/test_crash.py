"""Nothing stays `streaming` after its instance is gone: leases, the reaper, restarts and kill -9."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

import server
from services.storage.embedded_mongo import free_port
from services.storage.store import assemble, utcnow
from tests.conftest import TEST_TOKEN, Client, make_test_pipelines, provider_factory, ws_request
from services.providers.demo import DemoProvider
from tests.test_resume import Received, abort, follow, nothing_more, send_resume

pytestmark = pytest.mark.gen_test(timeout=60)

ROOT = Path(__file__).resolve().parent.parent


def abandoned(session_id, seq, *, status="streaming", lease=-5.0, content="half of it"):
    now = utcnow()
    lease_until = None if lease is None else time.time() + lease
    return {"_id": f"dead-{seq}", "session_id": session_id, "pipeline": "slow", "seq": seq, "role": "assistant",
            "content": content, "thinking": "", "status": status, "reply_to": f"user-{seq}",
            "instance": "gone", "lease_until": lease_until,
            "created_at": now, "updated_at": now}


async def test_reaper_interrupts_expired_replies_and_tells_their_viewers(connect, services):
    c = await connect("slow", stream_mode="delta")
    session_id = c.connected["session_id"]
    live_id = (await c.say("mine, and running"))["data"]["reply_message_id"]
    await c.recv_type("response")
    await services.store.messages.insert_many([
        abandoned(session_id, 100), abandoned(session_id, 101, status="queued", lease=None),
        abandoned(session_id, 102, lease=+60)])
    # a reply running here is never reaped, even with its lease somehow expired: the sweep renews it
    await services.store.messages.update_one({"_id": live_id}, {"$set": {"lease_until": time.time() - 1}})
    reaped = await services.reaper.sweep()
    assert sorted(reaped) == ["dead-100", "dead-101"]
    finals = {}
    while len(finals) < 2:
        frame = await c.recv_type("response")
        if frame["data"]["is_final"]:
            finals[frame["data"]["message_id"]] = frame["data"]
    assert finals["dead-100"]["status"] == "interrupted" and finals["dead-100"]["content"] == "half of it"
    assert finals["dead-100"]["error"]["code"] == "instance_lost"
    assert finals["dead-101"]["status"] == "interrupted"
    docs = {d["_id"]: d async for d in services.store.messages.find({"session_id": session_id})}
    assert docs["dead-100"]["status"] == docs["dead-101"]["status"] == "interrupted"
    assert docs["dead-102"]["status"] == "streaming"  # its lease still runs: some other instance owns it
    assert docs[live_id]["status"] == "streaming" and docs[live_id]["lease_until"] > time.time()
    assert not await services.reaper.sweep()  # once only
    await c.send({"type": "stop"})
    await c.until_final(live_id)


async def start_instance(config):
    svc = await server.open_services(config, pipelines=make_test_pipelines(), provider_factory=provider_factory)
    sock, port = bind_unused_port()
    http = HTTPServer(server.make_app(svc))
    http.add_sockets([sock])
    return svc, http, f"ws://127.0.0.1:{port}/api/v1/pipelines"


async def stop_instance(svc, http):
    http.stop()
    await server.close_services(svc)


async def ws(base, pipeline, **query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    client = Client(await websocket_connect(ws_request(f"{base}/{pipeline}/ws/connect?{qs}")))
    client.connected = await client.recv_type("connected")
    return client


async def test_restart_finished_replies_complete_and_the_unfinished_one_is_interrupted(config, mongo_url, db_name):
    svc, http, base = await start_instance(config)
    try:
        quick = await ws(base, "resumable", stream_mode="delta")
        slow = await ws(base, "slow", stream_mode="delta")
        q = Received((await quick.say("finish before the restart"))["data"]["reply_message_id"])
        s = Received((await slow.say("still talking at the restart"))["data"]["reply_message_id"])
        for _ in range(5):
            q.add(await quick.recv_type("response"))
        for _ in range(30):
            s.add(await slow.recv_type("response"))
        abort(quick, "reset")
        abort(slow, "reset")
        for _ in range(300):
            if (await svc.store.get_message(q.message_id))["status"] == "completed":
                break
            await asyncio.sleep(0.02)
    finally:
        await stop_instance(svc, http)

    svc, http, base = await start_instance(config)
    try:
        for got, pipeline, status in ((q, "resumable", "completed"), (s, "slow", "interrupted")):
            c = await ws(base, pipeline, stream_mode="delta")
            await c.send({"type": "resume", "message_id": got.message_id, **got.offsets})
            resumed = await c.recv_type("resumed")
            assert resumed["data"]["replies"][0]["status"] == status
            await follow(c, got)
            await nothing_more(c, got.message_id)
            stored = await svc.store.get_message(got.message_id)
            assert len(got.finals) == 1 and got.finals[0]["status"] == stored["status"] == status
            assert got.joined(got.text) == stored["content"] == got.finals[0]["content"]
            c.close()
    finally:
        await stop_instance(svc, http)
        with MongoClient(mongo_url) as client:
            client.drop_database(db_name)


PIPELINES_TOML = """
[pipelines.default]
provider = "demo"
options = { words = 12, rate = 0 }

[pipelines.slow]
provider = "demo"
options = { words = 3000, rate = 100 }

[pipelines.slow_once]
provider = "demo"
options = { words = 3000, rate = 100 }
on_instance_lost = "interrupt"
"""


class ServerProcess:
    """`python server.py` as a real child process on its own port."""

    def __init__(self, tmp_path, mongo_url, db_name, name):
        self.port = free_port()
        pipelines = tmp_path / "pipelines.toml"
        pipelines.write_text(PIPELINES_TOML)
        self.log = tmp_path / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "server.py", "--port", str(self.port), "--mongo-url", mongo_url, "--db-name", db_name,
             "--lease-seconds", "1", "--checkpoint-interval", "0.1", "--pipelines", str(pipelines),
             "--token", TEST_TOKEN,
             "--log-level", "info"],
            cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.base = f"ws://127.0.0.1:{self.port}/api/v1/pipelines"

    async def ready(self, timeout=20.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                c = await ws(self.base, "default")
                c.close()
                return
            except (ConnectionError, OSError):
                assert loop.time() < deadline, "server did not start:\n" + self.log.read_text()
                await asyncio.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def test_kill_9_leaves_nothing_streaming_and_a_resuming_client_gets_the_terminal_frame(
        tmp_path, mongo_url, db_name):
    """A pipeline with on_instance_lost = "interrupt": the reply ends `interrupted` with its stored text."""
    first = ServerProcess(tmp_path, mongo_url, db_name, "first")
    second = None
    try:
        await first.ready()
        quick = await ws(first.base, "default", stream_mode="delta")
        slow = await ws(first.base, "slow_once", stream_mode="delta")
        q = Received((await quick.say("done before the crash"))["data"]["reply_message_id"])
        q.add(await quick.recv_type("response"))
        s = Received((await slow.say("cut me off"))["data"]["reply_message_id"])
        for _ in range(40):  # 0.4 s at 100 words/s: several checkpoints (every 0.1 s) have landed
            s.add(await slow.recv_type("response"))
        first.proc.kill()  # SIGKILL: no shutdown code runs
        first.proc.wait()
        with MongoClient(mongo_url) as client:
            doc = assemble(client[db_name].messages.find_one({"_id": s.message_id}))
        assert doc["status"] == "streaming" and doc["content"]  # left behind by the dead instance

        second = ServerProcess(tmp_path, mongo_url, db_name, "second")
        await second.ready()
        c = await ws(second.base, "slow_once", stream_mode="delta", session_id=slow.connected["session_id"])
        await c.send({"type": "resume", "message_id": s.message_id, **s.offsets})
        resumed = await c.recv_type("resumed")
        assert resumed["data"]["replies"][0]["status"] in ("streaming", "interrupted")  # reaped yet or not
        await follow(c, s, timeout=5)  # the lease is 1 s and the reaper runs every 0.5 s
        await nothing_more(c, s.message_id)
        final = s.finals[0]
        with MongoClient(mongo_url) as client:
            stored = client[db_name].messages.find_one({"_id": s.message_id})
            left = client[db_name].messages.count_documents({"status": {"$in": ["queued", "streaming"]}})
        assert len(s.finals) == 1 and final["status"] == stored["status"] == "interrupted"
        assert final["content"] == stored["content"]
        # text streamed after the last checkpoint died with the instance: the final frame is authoritative
        assert s.joined(s.text).startswith(stored["content"]) and stored["content"]
        assert left == 0

        c2 = await ws(second.base, "default", stream_mode="delta")
        await c2.send({"type": "resume", "message_id": q.message_id, **q.offsets})
        await c2.recv_type("resumed")
        await follow(c2, q)
        assert q.finals[0]["status"] == "completed"
        with MongoClient(mongo_url) as client:
            assert q.joined(q.text) == client[db_name].messages.find_one({"_id": q.message_id})["content"]
    finally:
        _stop(first, second, mongo_url, db_name)


async def test_after_kill_9_the_reply_goes_on_from_its_last_checkpoint_to_the_same_text(tmp_path, mongo_url, db_name):
    """The same message, continued by the next server on the store: the client that resumes gets `resumed` at
    the stored point (what it held past it is void), then the rest; the whole text equals what the demo streams
    uninterrupted for the same question."""
    first = ServerProcess(tmp_path, mongo_url, db_name, "first")
    second = None
    try:
        await first.ready()
        slow = await ws(first.base, "slow", stream_mode="delta")
        question = "go on after the crash"
        s = Received((await slow.say(question))["data"]["reply_message_id"])
        for _ in range(40):  # several checkpoints (every 0.1 s) have landed, and text after the last one
            s.add(await slow.recv_type("response"))
        first.proc.kill()
        first.proc.wait()
        held = len(s.text)
        second = ServerProcess(tmp_path, mongo_url, db_name, "second")
        await second.ready()
        c = await ws(second.base, "slow", stream_mode="delta", session_id=slow.connected["session_id"])
        resumed, _ = await send_resume(c, s)
        [entry] = resumed["data"]["replies"]
        assert entry["offset"] <= held and entry["status"] == "streaming"
        await follow(c, s, timeout=60)
        await nothing_more(c, s.message_id)
        final = s.finals[0]
        _, whole = DemoProvider(_slow()).whole(question)
        with MongoClient(mongo_url) as client:
            stored = client[db_name].messages.find_one({"_id": s.message_id})
        assert final["status"] == stored["status"] == "completed" and final.get("continued") == 1
        assert s.joined(s.text) == final["content"] == stored["content"] == whole
        # it went on from its last checkpoint: at most what the client held, which it was told to drop past that
        assert stored["continuations"] == 1 and 0 < stored["continued"][0]["offset"] <= held
    finally:
        _stop(first, second, mongo_url, db_name)


def _stop(first, second, mongo_url, db_name):
    """After a crash test: the killed server's leftovers and the second server stopped (the second cleanly), the
    test's database dropped."""
    first.stop()
    if second:
        second.stop()
        assert second.proc.returncode == 0, second.log.read_text()
    with MongoClient(mongo_url) as client:
        client.drop_database(db_name)


def _slow():
    """The `slow` pipeline of PIPELINES_TOML, as the servers read it."""
    from services.operations.pipelines import Pipeline
    return Pipeline(id="slow", provider="demo", options={"words": 3000, "rate": 100})


def test_server_cli_accepts_the_lease_and_viewer_options():
    config = server.parse_args(["--lease-seconds", "2.5", "--on-last-viewer-gone", "stop"])
    assert config.lease_seconds == 2.5 and config.on_last_viewer_gone == "stop"
    assert server.parse_args([]).on_last_viewer_gone == "continue"
    json.dumps(vars(config))


@pytest.mark.parametrize("lost_before", [2, 3])
async def test_a_reply_goes_on_at_most_max_continuations_times(connect, services, stored_message, lost_before):
    """Lost for the third time (2 continuations so far): it goes on once more, to the demo's text from where it
    was stored. Lost a fourth time (3 so far, the default --max-continuations): it ends `interrupted`, saying so."""
    c = await connect("slow", stream_mode="delta")
    session_id = c.connected["session_id"]
    seq = await services.store.next_seqs(session_id, 2)
    now = utcnow()
    base = {"session_id": session_id, "pipeline": "slow", "created_at": now, "updated_at": now}
    await services.store.messages.insert_many([
        {"_id": f"q-{lost_before}", "seq": seq, "role": "user", "content": "again and again", "status": "completed",
         "sender": "local", **base},
        {"_id": f"r-{lost_before}", "seq": seq + 1, "role": "assistant", "reply_to": f"q-{lost_before}",
         "content": "half of it", "thinking": "", "status": "streaming", "epoch": 4, "length": 10,
         "thinking_length": 0, "continuations": lost_before, "instance": "gone", "lease_until": time.time() - 5,
         **base}])
    taken = await services.reaper.sweep()
    reply_id = f"r-{lost_before}"
    assert taken == {reply_id: "continued" if lost_before == 2 else "interrupted"}
    await c.send({"type": "resume", "message_id": reply_id, "offset": 10, "thinking_offset": 0, "epoch": 4})
    final = (await c.until_final(reply_id, timeout=60))[-1]["data"]
    stored = await stored_message(reply_id)
    if lost_before == 2:
        _, whole = DemoProvider(services.pipelines.get("slow")).whole("again and again")
        assert (final["status"], final["continued"]) == ("completed", 3)
        assert final["content"] == stored["content"] == "half of it" + whole[10:]
    else:
        assert (final["status"], final["error"]["code"]) == ("interrupted", "instance_lost")
        assert "4 times" in final["error"]["message"] and final["content"] == "half of it"
        assert stored["continuations"] == 3 and stored["status"] == "interrupted"
