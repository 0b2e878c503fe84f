"""Hostile timing and faults against the real `python server.py` with its embedded store (issue 12): slow
headers and bodies are cut off, huge bodies refused before they are read, the store's files are private, a
killed store comes back by itself, a paused one answers `store_unavailable` fast instead of hanging."""
import asyncio
import json
import os
import signal
import stat
import time

import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.websocket import websocket_connect

from services.storage.embedded_mongo import free_port
from tests.conftest import TEST_TOKEN, Client, ws_request
from tests.test_server_process import AUTH, alive, nx_pid, start_server, stop_server, wait_ready

pytestmark = pytest.mark.gen_test(timeout=120)


@pytest.fixture
def run_server(tmp_path):
    """Start server.py with extra flags; stopped (SIGTERM) at teardown."""
    procs = []

    async def start(*extra):
        port = free_port()
        proc = start_server(tmp_path, port, *extra)
        procs.append(proc)
        await wait_ready(port, proc)
        return port, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except Exception:
                proc.kill()


async def get(port, path, **kw):
    r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", raise_error=False, headers=AUTH, **kw)
    return r.code, json.loads(r.body) if r.body else None


async def closed_within(reader, writer, trickle, limit):
    """Feed `trickle` one byte at a time (0.2 s apart, at most `limit` s); True if the server closed on us."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    for byte in trickle:
        if loop.time() > deadline:
            return False
        try:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1024), 0.2) == b"":
                return True
        except asyncio.TimeoutError:
            continue
        except (ConnectionError, OSError):
            return True
    return False


async def test_slow_headers_and_slow_bodies_are_cut_off(run_server):
    port, _ = await run_server("--http-idle-timeout", "1", "--body-timeout", "1")
    # Slowloris: a header line that never ends, one byte every 0.2 s. Tornado's default would wait an hour.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert await closed_within(reader, writer, b"X-Slow: " + b"a" * 500, limit=20)
    finally:
        writer.close()
    # A body trickled in after complete headers.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /api/v1/pipelines/default/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {TEST_TOKEN}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 500\r\n\r\n".encode())
    try:
        assert await closed_within(reader, writer, b"{" + b" " * 498 + b"}", limit=20)
    finally:
        writer.close()
    code, _ = await get(port, "/api/v1/pipelines")  # a normal client is served as ever
    assert code == 200


async def test_a_60_mb_post_is_answered_from_its_headers(run_server):
    port, _ = await run_server()
    for auth, status, code in ((b"", 401, "unauthorized"),
                               (f"Authorization: Bearer {TEST_TOKEN}\r\n".encode(), 413, "payload_too_large")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # As curl sends a big body: headers with Expect: 100-continue, then it waits for the go-ahead. The
            # answer comes from the headers alone (never "100 Continue"), so no byte of the 60 MB is sent.
            writer.write(b"POST /api/v1/pipelines/default/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 62914560\r\n"
                         b"Expect: 100-continue\r\n" + auth + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            assert head.startswith(f"HTTP/1.1 {status}".encode()), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            assert json.loads(await asyncio.wait_for(reader.readexactly(length), 20))["code"] == code
        finally:
            writer.close()


async def test_store_files_are_private_and_a_killed_store_is_restarted(run_server, tmp_path):
    port, proc = await run_server()
    mongo = tmp_path / "mongo"
    for root, dirs, files in os.walk(mongo):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))
    assert any(files for _, _, files in os.walk(mongo / "db"))

    first = nx_pid(tmp_path)
    os.kill(first, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    saw_down = False
    while True:
        code, body = await get(port, "/readyz")
        saw_down |= code == 503
        if saw_down and code == 200:
            break
        assert loop.time() < deadline, f"/readyz never recovered (last {code} {body})"
        await asyncio.sleep(0.05)
    second = nx_pid(tmp_path)
    assert second and second != first and alive(second)
    c = Client(await websocket_connect(ws_request(f"ws://127.0.0.1:{port}/api/v1/pipelines/default/ws/connect")))
    assert (await c.recv(timeout=20))["type"] == "connected"
    ack = await c.say("after the restart")
    assert (await c.until_final(ack["data"]["reply_message_id"], timeout=30))[-1]["data"]["status"] == "completed"
    c.close()
    assert await stop_server(proc) == 0
    assert not alive(second)


async def test_a_paused_store_answers_store_unavailable_instead_of_hanging(run_server, tmp_path):
    port, _ = await run_server("--store-timeout", "1")
    code, _ = await get(port, "/api/v1/pipelines/default/sessions")
    assert code == 200
    pid = nx_pid(tmp_path)
    os.kill(pid, signal.SIGSTOP)
    try:
        # Without a bound the driver waits on the stopped store until SIGCONT: far past these request timeouts.
        code, body = await get(port, "/api/v1/pipelines/default/sessions", request_timeout=30)
        assert (code, body["code"]) == (503, "store_unavailable")
        assert body.get("retryable") is True
        c = Client(await websocket_connect(ws_request(
            f"ws://127.0.0.1:{port}/api/v1/pipelines/default/ws/connect?session_type=group")))
        err = await c.recv(timeout=30)
        assert err["code"] == "store_unavailable"
        assert (await c.wait_closed(timeout=30))[0] == 1011
        code, _ = await get(port, "/readyz", request_timeout=30)
        assert code == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (await get(port, "/api/v1/pipelines/default/sessions", request_timeout=30))[0] != 200:
        assert loop.time() < deadline, "the store never came back after SIGCONT"
        await asyncio.sleep(0.1)
