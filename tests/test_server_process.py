"""The real `python server.py` as a user runs it: embedded store, a chat, SIGTERM, restart, data kept."""
import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from services.storage.embedded_mongo import EmbeddedMongo, EmbeddedMongoError, free_port
from tests.conftest import TEST_TOKEN, Client, ws_request

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
pytestmark = pytest.mark.gen_test(timeout=60)


async def wait_ready(port, proc, timeout=30):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/v1/pipelines", raise_error=False,
                                              headers=AUTH)
            if r.code == 200:
                return
        except OSError:
            pass
        assert loop.time() < deadline, "server did not come up"
        await asyncio.sleep(0.1)


def start_server(data_dir, port, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    return subprocess.Popen([sys.executable, "server.py", "--port", str(port), "--data-dir", str(data_dir),
                             "--token", TEST_TOKEN, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def nx_pid(data_dir):
    pid_file = Path(data_dir) / "mongo" / "nx-27017.pid"
    return int(pid_file.read_text()) if pid_file.exists() else None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


async def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    for _ in range(200):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("server ignored SIGTERM")


async def test_run_chat_sigterm_restart_keeps_history(tmp_path):
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        await wait_ready(port, proc)
        child = nx_pid(tmp_path)
        assert child and alive(child)
        c = Client(await websocket_connect(ws_request(f"ws://127.0.0.1:{port}/api/v1/pipelines/default/ws/connect")))
        assert (await c.recv())["type"] == "connected"
        ack = await c.say("remember me")
        final = (await c.until_final(ack["data"]["reply_message_id"], timeout=20))[-1]["data"]
        assert final["status"] == "completed"
        c.close()
    finally:
        code = await stop_server(proc)
    assert code == 0
    assert not alive(child), "the embedded store outlived the server"
    assert nx_pid(tmp_path) is None

    # a stale pid file (a pid that is not an nx-27017) must not block the next start
    (tmp_path / "mongo" / "nx-27017.pid").write_text(str(os.getpid()))
    proc = start_server(tmp_path, port)
    try:
        await wait_ready(port, proc)
        r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/v1/pipelines/default/ws/messages/person",
                                          headers=AUTH)
        messages = json.loads(r.body)["data"]["messages"]
        assert [m["content"] for m in messages] == ["remember me", final["content"]]
    finally:
        assert await stop_server(proc) == 0


async def test_server_kill_9_takes_the_embedded_store_with_it(tmp_path):
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        await wait_ready(port, proc)
        child = nx_pid(tmp_path)
        proc.kill()
        proc.wait()
        for _ in range(100):
            if not alive(child):
                break
            await asyncio.sleep(0.05)
        assert not alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_live_store_on_the_same_data_dir_is_refused(tmp_path):
    first = EmbeddedMongo(tmp_path).start()
    try:
        with pytest.raises(EmbeddedMongoError, match="is in use .*is Parley already running"):
            EmbeddedMongo(tmp_path).start()
    finally:
        first.stop()


def test_bad_pipelines_file_fails_start_up_naming_the_problem(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[pipelines.gpt]\nprovider = "openai"\nmodel = "m"\n[pipelines.gpt.timeouts]\nstall = -1\n')
    out = subprocess.run([sys.executable, "server.py", "--pipelines", str(bad), "--data-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "p.toml" in out.stderr and "gpt" in out.stderr and "timeouts.stall" in out.stderr


def test_a_port_in_use_is_named_without_a_traceback(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        out = subprocess.run([sys.executable, "server.py", "--port", str(port), "--data-dir", str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"parley: cannot listen on 127.0.0.1:{port}: Address already in use" in out.stderr
    assert nx_pid(tmp_path) is None  # the embedded store it had started is stopped again


async def test_a_second_server_on_the_same_data_dir_says_so_in_one_line(tmp_path):
    port = free_port()
    first = start_server(tmp_path, port)
    try:
        await wait_ready(port, first)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        out = subprocess.run([sys.executable, "server.py", "--port", str(free_port()), "--data-dir", str(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().splitlines() == [
            f"parley: the embedded store in {tmp_path.resolve() / 'mongo'} is in use (nx-27017, pid "
            f"{nx_pid(tmp_path)}): is Parley already running? Stop it, or give this one its own --data-dir"]
        assert first.poll() is None  # the first one is untouched
    finally:
        assert await stop_server(first) == 0


async def test_ctrl_c_mid_reply_stops_server_then_store_with_nothing_alarming_logged(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the embedded store must not get it
    (it would die under the server's last writes: 'exited with code 0; restarting', 'checkpoint failed')."""
    pipelines = tmp_path / "pipelines.toml"
    pipelines.write_text('[pipelines.paced]\nprovider = "demo"\nmodel = "demo"\n'
                         '[pipelines.paced.options]\nwords = 2000\nrate = 100\n')
    port = free_port()
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    with open(log, "wb") as out:  # its own process group, as a shell's foreground job has
        proc = subprocess.Popen([sys.executable, "server.py", "--port", str(port), "--data-dir", str(tmp_path),
                                 "--token", TEST_TOKEN, "--pipelines", str(pipelines), "--checkpoint-interval",
                                 "0.05", "--drain-timeout", "0.2"], cwd=ROOT, env=env, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        await wait_ready(port, proc)
        child = nx_pid(tmp_path)
        c = Client(await websocket_connect(ws_request(f"ws://127.0.0.1:{port}/api/v1/pipelines/paced/ws/connect")))
        assert (await c.recv())["type"] == "connected"
        ack = await c.say("keep talking")
        for _ in range(5):  # mid-reply, checkpoints being written
            await c.recv_type("response", timeout=20)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert (await c.wait_closed(timeout=30))[0] == 1012  # told to reconnect
        for _ in range(400):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    for alarming in (" ERROR ", " WARNING ", "exited with code", "checkpoint failed", "Traceback"):
        assert alarming not in text, text[-3000:]
    assert not alive(child) and nx_pid(tmp_path) is None
    # the server ended the reply in the store before it stopped the store
    proc = start_server(tmp_path, port, "--pipelines", str(pipelines))
    try:
        await wait_ready(port, proc)
        r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/api/v1/pipelines/paced/sessions/"
                                          f"{ack['data']['session_id']}/messages", headers=AUTH)
        reply = json.loads(r.body)["data"]["messages"][1]
        assert reply["status"] == "interrupted" and reply["content"]
    finally:
        assert await stop_server(proc) == 0
