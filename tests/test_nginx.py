"""nginx as shipped (nginx/parley.conf, through nginx/cluster.py: `make cluster`) in front of three instances:
what a browser, a rolling restart, a draining and a hung instance look like from outside."""
import asyncio
import json
import os
import signal
import socket
import statistics
from collections import Counter

import pytest
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from nginx.cluster import TEMPLATE, render_conf, start_nginx, stop_nginx, wait_http
from services.embedded_mongo import free_port
from tests.cluster import PATIENCE, connect, fetch, plain, running_cluster, source, spread, token, wait_for
from tests.conftest import require
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, new_page, send  # noqa: F401 (a fixture)

CLIENTS = 20        # chatting through the rolling restart, each from its own /24 (127.0.N.1)
PAUSE = 1.0         # seconds between a client's messages: a steady load, not a flood, on a shared machine
FINAL_WAIT = 30.0   # seconds a client waits for its reply's final before it reconnects (counted, not asserted)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mongo_url):
    # the default drain (10 s): a reply still generating keeps a draining instance up that long
    yield from running_cluster(tmp_path_factory, mongo_url, "--drain-timeout", "10")


@pytest.fixture
def browser():
    """Chromium for one test (tests/test_browser.py keeps one per module): Playwright's sync API holds an event
    loop on this thread while it runs, and this module's other tests run their own."""
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e '.[test]')")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


def open_page(page, base, user):
    page.goto(f"{base}/?token={token(user)}#/default")


def test_a_browser_chats_through_make_clusters_nginx(new_page, cluster):  # noqa: F811
    page = new_page()
    open_page(page, cluster.url, "webby")
    page.wait_for_selector("#conn[data-state=open]")
    send(page, "hello through nginx")
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    assert page.locator(".msg.assistant .body").inner_text().strip()
    assert not page.errors


def test_a_proxy_that_drops_the_hosts_port_gets_a_page_that_says_why(new_page, cluster, tmp_path):  # noqa: F811
    """`proxy_set_header Host $host` (what nginx/parley.conf had): the handshake's Origin names the port, the
    Host the backend sees does not, and the socket is refused. The page says so instead of counting down."""
    shipped = TEMPLATE.read_text()
    assert "proxy_set_header Host $parley_host;" in shipped
    template = tmp_path / "host.conf"
    template.write_text(shipped.replace("proxy_set_header Host $parley_host;", "proxy_set_header Host $host;"))
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_conf(tmp_path, port=port, backends=[i.port for i in cluster.instances],
                                template=template))
    proxy = start_nginx(tmp_path, conf)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proxy, "nginx")
        page = new_page()
        open_page(page, f"http://127.0.0.1:{port}", "hosty")
        note = page.wait_for_selector(".notice[data-key=refused]")
        assert "refuses the live connection" in note.inner_text()
        assert page.get_attribute("#conn", "data-state") != "open"
    finally:
        stop_nginx(proxy)


def refused(url):
    """True when nothing accepts connections at `url`'s port (the listener is closed)."""
    port = int(url.rsplit(":", 1)[1])
    try:
        socket.create_connection(("127.0.0.1", port), timeout=PATIENCE).close()
    except ConnectionRefusedError:
        return True
    return False


async def _async(value):
    return value


class KeptConnection:
    """One HTTP/1.1 connection straight to an instance, reused request after request: (status, body)."""

    def __init__(self, reader, writer, host):
        self.reader, self.writer, self.host = reader, writer, host

    async def get(self, path, upgrade=False):
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token('drainer')}\r\n"
        if upgrade:
            head += ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
        self.writer.write((head + "\r\n").encode())
        status = int((await asyncio.wait_for(self.reader.readline(), PATIENCE)).split()[1])
        length = 0
        while (line := await asyncio.wait_for(self.reader.readline(), PATIENCE)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await asyncio.wait_for(self.reader.readexactly(length), PATIENCE)

    def close(self):
        self.writer.close()


async def keep_alive(url):
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return KeptConnection(reader, writer, f"127.0.0.1:{port}")


@pytest.mark.gen_test(timeout=300)
async def test_a_draining_instance_stops_listening_and_nginx_moves_every_request(cluster):
    """nginx/README.md's rolling-restart step 1: SIGTERM closes the listener at once; nginx, refused, sends GETs,
    POSTs and handshakes from that instance's clients to another instance, while it drains."""
    where = await spread(cluster)
    victim = cluster.instances[0]
    src = where[victim.id]
    client = await connect(cluster, "slow", src=src, user="drainer")
    assert client.instance == victim.id
    await client.say("a long reply: the drain waits for it")
    await client.recv_type("response")
    kept = await keep_alive(victim.url)  # a direct client's HTTP connection, open before the drain
    assert (await kept.get("/healthz"))[0] == 200
    victim.signal(signal.SIGTERM)
    await wait_for(lambda: _async(refused(victim.url)))
    status, answer = await kept.get("/readyz")
    assert status == 503 and b"shutting down" in answer, answer  # on a connection it already had
    status, answer = await kept.get("/api/v1/pipelines/default/ws/connect", upgrade=True)
    assert status == 503 and b'"draining"' in answer, answer
    kept.close()
    assert victim.proc.poll() is None, "exited before the requests below: they did not test a drain"
    code, body, answered = await fetch(cluster, "/healthz", src=src, user="drainer")
    assert code == 200 and answered != victim.id, (code, body, answered)
    code, body, answered = await fetch(cluster, "/api/v1/pipelines/default/sessions", src=src, method="POST",
                                       body={}, user="drainer")
    assert code == 201 and answered != victim.id, (code, body, answered)
    moved = await connect(cluster, "default", src=src, user="drainer")
    assert moved.instance != victim.id
    assert victim.proc.poll() is None, "exited before the requests above: they did not test a drain"
    assert (await client.recv_type("reconnect"))["type"] == "reconnect"
    moved.close()
    client.close()
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, victim.proc.wait, 120) == 0
    victim.start()
    await loop.run_in_executor(None, victim.wait_ready)


@pytest.mark.gen_test(timeout=600)
async def test_a_rolling_restart_under_twenty_chatting_clients_locks_none_out(cluster):
    """SIGTERM, restart and wait for each instance in turn while 20 clients from 20 networks chat: no handshake
    is refused (nginx's "no live upstreams" is a 502), every acked message is stored, every client is moved."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    refusals = Counter()    # handshakes answered with an HTTP status instead of 101, by status
    dropped = Counter()     # connects that failed otherwise (reset, closed before `connected`), by kind
    reconnects = []         # (client, seconds from the lost socket to the next `connected`, attempts)
    acked = set()
    no_final = []           # replies whose final did not reach their sender's open socket within FINAL_WAIT

    async def reconnect(w):
        started, attempts = loop.time(), 0
        while True:
            attempts += 1
            try:
                conn = await connect(cluster, "paced", src=source(w + 1), user=f"roller{w}")
                reconnects.append((w, loop.time() - started, attempts))
                return conn
            except HTTPClientError as exc:
                refusals[exc.code] += 1
            except (OSError, StreamClosedError, WebSocketClosedError, AssertionError) as exc:
                dropped[type(exc).__name__] += 1
            assert attempts < 100, "a client could not reconnect"
            await asyncio.sleep(0.1)

    async def client(w):
        conn = await connect(cluster, "paced", src=source(w + 1), user=f"roller{w}")
        n = 0
        while not done.is_set():
            frame = {"type": "message", "message": [{"type": "Plain", "text": f"m{n}"}],
                     "client_msg_id": f"roll-{w}-{n}"}
            n += 1
            while True:  # until acked: a resend after a reconnect carries the same client_msg_id
                try:
                    await conn.send(frame)
                    ack = await conn.recv_type("ack", "error")
                    break
                except (AssertionError, WebSocketClosedError, StreamClosedError):
                    conn = await reconnect(w)
            assert ack["type"] == "ack", ack
            acked.add(ack["data"]["message_id"])
            if ack["data"]["duplicate"]:  # a resend: its reply started on the socket that was lost
                continue
            reply = ack["data"]["reply_message_id"]
            try:  # its reply, to its final; a drain may close the socket first
                while True:
                    got = await asyncio.wait_for(conn.ws.read_message(), FINAL_WAIT)
                    if got is None:
                        raise WebSocketClosedError()
                    got = json.loads(got)
                    if got["type"] == "response" and got["data"]["message_id"] == reply and got["data"]["is_final"]:
                        break
                await asyncio.sleep(PAUSE)
            except WebSocketClosedError:
                conn = await reconnect(w)
            except asyncio.TimeoutError:  # what a viewer gets of a reply is for the recovery tests to judge
                no_final.append(reply)
                conn.close()
                conn = await reconnect(w)
        conn.close()

    async def roll():
        for instance in cluster.instances:
            before = len(acked)
            await wait_for(lambda: _async(len(acked) >= before + CLIENTS))  # the load runs meanwhile
            instance.signal(signal.SIGTERM)
            assert await loop.run_in_executor(None, instance.proc.wait, 120) == 0
            instance.start()
            await loop.run_in_executor(None, instance.wait_ready)
        before = len(acked)
        await wait_for(lambda: _async(len(acked) >= before + CLIENTS))
        done.set()

    await asyncio.gather(roll(), *(client(w) for w in range(CLIENTS)))
    seconds = sorted(s for _, s, _ in reconnects)
    print(f"\nrolling restart: {len(acked)} acked, {len(reconnects)} reconnects (median "
          f"{statistics.median(seconds):.3f} s, max {seconds[-1]:.3f} s, max attempts "
          f"{max(a for *_, a in reconnects)}), refused {dict(refusals)}, dropped {dict(dropped)}, "
          f"no final within {FINAL_WAIT:g} s: {no_final}")
    assert refusals[502] == 0, f"{refusals[502]} handshakes got 502 (nginx found no live instance)"
    assert not refusals, refusals
    assert max(a for *_, a in reconnects) <= 2, "a client needed more than one retry to get back in"
    assert {w for w, *_ in reconnects} == set(range(CLIENTS)), "a client was never moved by the restarts"
    with MongoClient(cluster.mongo_url) as db:
        stored = {d["_id"] for d in db[cluster.db_name].messages.find({"_id": {"$in": list(acked)}}, {"_id": 1})}
    assert stored == acked, f"{len(acked - stored)} acked messages are not in the store"


@pytest.mark.gen_test(timeout=120)
async def test_metrics_are_refused_through_nginx_and_served_on_each_instances_own_listener(cluster):
    for path in ("/metrics", "//metrics", "/%6Detrics?x=1"):  # nginx matches the normalized path
        response = await AsyncHTTPClient().fetch(cluster.url + path, raise_error=False)
        assert response.code == 404 and "X-Parley-Instance" not in response.headers, path  # nginx's own answer
    for instance in cluster.instances:
        code, text = await plain(instance.url + "/metrics")
        assert code == 404, text
        code, text = await plain(instance.metrics_url)
        assert code == 200 and "parley_connections_open" in text
