"""nginx as shipped (nginx/parley.conf, through nginx/cluster.py: `make cluster`) in front of three instances:
what a browser, a rolling restart, a draining and a hung instance look like from outside."""
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, websocket_connect

from nginx.cluster import ROOT, TEMPLATE, nginx_binary, render_conf, start_nginx, stop_nginx, wait_http
from nginx.supervisor import Supervisor, nginx_workers
from services.storage.embedded_mongo import free_port
from services.storage.store import bus_db_name
from tests.cluster import (PATIENCE, connect, fetch, instance_for, plain, running_cluster, source, spread, token,
                           wait_for)
from tests.conftest import Client, require
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, new_page, send  # noqa: F401 (a fixture)

CLI_TOKEN = "cluster-command-token-0123456789"
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
    # (a reply of a pipeline that is not continued elsewhere: the drain waits for it, so the instance drains a while)
    client = await connect(cluster, "slow_once", src=src, user="drainer")
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


# --- the supervisor: what open-source nginx cannot do (nginx/supervisor.py)

async def networks_of(cluster, instance_id, count):
    """`count` client networks ip_hash sends to `instance_id` (searched from 127.0.21.1 on)."""
    found = []
    for n in range(21, 120):
        if await instance_for(cluster, source(n)) == instance_id:
            found.append(source(n))
            if len(found) == count:
                return found
    raise AssertionError(f"fewer than {count} networks hash to {instance_id}")


@pytest.mark.gen_test(timeout=300)
async def test_an_instance_that_stops_answering_is_marked_down_and_comes_back_when_it_answers(cluster):
    where = await spread(cluster)
    victim, other = cluster.instances[1], cluster.instances[0]
    src = where[victim.id]
    kept = await connect(cluster, "default", src=where[other.id], user="kept")  # open across the reload
    assert kept.instance == other.id
    supervisor = Supervisor(cluster, hung_after=None, report=print).start()  # marks down, never kills
    try:
        victim.signal(signal.SIGSTOP)
        try:
            await wait_for(lambda: _async((victim.id, "down") in supervisor.events))
            # nginx has reloaded: that network's new clients go to another instance, at the first attempt
            client = await connect(cluster, "default", src=src, user="detour")
            assert client.instance != victim.id
            for c in (client, kept):  # and a socket from before the reload still works, on its old worker
                ack = await c.say("around the stopped instance")
                final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
                assert final["status"] == "completed"
            assert any("shutting down" in title for title in nginx_workers(cluster.nginx.pid).values())
            assert await instance_for(cluster, where[other.id]) == other.id  # `down` keeps the others' hash
            client.close()
        finally:
            victim.signal(signal.SIGCONT)
        await wait_for(lambda: _async((victim.id, "ready") in supervisor.events))
        assert await instance_for(cluster, src) == victim.id  # back in nginx
        assert victim.proc.poll() is None  # never killed
    finally:
        kept.close()
        supervisor.stop()


@pytest.mark.gen_test(timeout=300)
async def test_a_hung_instances_clients_reconnect_elsewhere_and_chat_within_seconds(cluster):
    """SIGSTOP: the kernel still accepts connections, so nginx alone would hold the instance's clients until
    proxy_read_timeout (120 s, beyond every wait here). The supervisor kills it; its clients move and chat."""
    loop = asyncio.get_running_loop()
    victim = cluster.instances[2]
    networks = await networks_of(cluster, victim.id, 3)
    clients = [await connect(cluster, "default", src=src, user=f"stuck{n}") for n, src in enumerate(networks)]
    assert {c.instance for c in clients} == {victim.id}
    supervisor = Supervisor(cluster, report=print).start()
    try:
        stopped = loop.time()
        victim.signal(signal.SIGSTOP)
        back = []
        for n, (src, client) in enumerate(zip(networks, clients)):
            while (await client.recv()) is not None:  # (a bound: PATIENCE, half of proxy_read_timeout)
                pass
            moved = await connect(cluster, "default", src=src, user=f"stuck{n}")
            assert moved.instance != victim.id
            ack = await moved.say("still here")
            final = (await moved.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
            assert final["status"] == "completed"
            back.append(loop.time() - stopped)
            moved.close()
        print(f"\nhung instance: its clients chatting elsewhere {', '.join(f'{s:.1f}' for s in back)} s after SIGSTOP")
        hung = supervisor.events.index((victim.id, "hung"))
        await wait_for(lambda: _async((victim.id, "ready") in supervisor.events[hung:]))  # started again, back
    finally:
        supervisor.stop()
        victim.signal(signal.SIGCONT)


# --- `make cluster` itself (nginx/cluster.py as a command)

class Command:
    """`python nginx/cluster.py ...` in a process group of its own (a terminal's foreground job), temporary
    directories under `tmp`; its output in a file."""

    def __init__(self, tmp, *args):
        self.out = tmp / "cluster.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        env["TMPDIR"] = str(tmp)
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "nginx" / "cluster.py"), *args], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.workdir = None

    def output(self):
        return self.out.read_text()

    async def ready(self):
        async def banner():
            assert self.proc.poll() is None, self.output()
            found = re.search(r"Logs, pid files and state: (\S+)", self.output())
            return found and "Ctrl-C stops all" in self.output() and Path(found.group(1))
        self.workdir = await wait_for(banner, timeout=180)  # three processes start on a loaded machine
        return self

    def pid(self, name):
        return int((self.workdir / f"{name}.pid").read_text())

    def interrupt(self):
        """Ctrl-C in the terminal: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(120)


def descendants(pid):
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.add(child)
            todo.append(child)
    return found


def alive(pid):
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


async def healthz_from(base, src):
    request = HTTPRequest(base + "/healthz", network_interface=src, request_timeout=PATIENCE)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, response.headers.get("X-Parley-Instance")


@pytest.mark.gen_test(timeout=400)
async def test_make_cluster_restarts_a_killed_instance_and_the_others_keep_serving(tmp_path, mongo_url):
    require(nginx_binary(), "nginx is not installed (Debian package nginx)")
    port, db_name = free_port(), "k_" + uuid.uuid4().hex[:12]
    command = Command(tmp_path, "--instances", "2", "--port", str(port), "--mongo-url", mongo_url,
                      "--token", CLI_TOKEN, "--", "--db-name", db_name)
    try:
        await command.ready()
        base = f"http://127.0.0.1:{port}"
        src = None
        for n in range(1, 40):  # a network ip_hash sends to parley-1
            if (await healthz_from(base, source(n)))[1] == "parley-1":
                src = source(n)
                break
        assert src, "no network hashes to parley-1"
        killed = command.pid("parley-1")
        os.kill(killed, signal.SIGKILL)
        # the other instance serves that network meanwhile: a chat through nginx
        ws = await websocket_connect(HTTPRequest(
            f"ws://127.0.0.1:{port}/api/v1/pipelines/default/ws/connect?protocol=parley.v1&stream_mode=delta",
            headers={"Authorization": f"Bearer {CLI_TOKEN}"}, network_interface=src, request_timeout=PATIENCE))
        client = Client(ws)
        assert ws.headers.get("X-Parley-Instance") == "parley-2"
        assert (await client.recv(PATIENCE))["type"] == "connected"
        ack = await client.say("while parley-1 is down")
        assert (await client.until_final(ack["data"]["reply_message_id"], PATIENCE))[-1]["data"]["status"] == \
            "completed"
        client.ws.close()
        # reported, started again, and back in nginx; the rest never stopped
        await wait_for(lambda: _async(f"parley-1 (pid {killed}) exited with code -9" in command.output()))
        await wait_for(lambda: _async(command.pid("parley-1") != killed))

        async def back():
            return (await healthz_from(base, src)) == (200, "parley-1")
        await wait_for(back, timeout=180)
        assert command.proc.poll() is None
    finally:
        if command.proc.poll() is None:
            assert command.interrupt() == 0
        with MongoClient(mongo_url) as db:
            db.drop_database(db_name)
            db.drop_database(bus_db_name(db_name))


def test_ctrl_c_stops_every_process_of_make_cluster_and_removes_its_directory(tmp_path, io_loop):
    require(nginx_binary(), "nginx is not installed (Debian package nginx)")
    command = Command(tmp_path, "--instances", "2", "--port", str(free_port()))  # its own store, a temp dir
    io_loop.run_sync(command.ready, timeout=240)
    assert command.workdir.parent == tmp_path and command.workdir.name.startswith("parley-cluster-")
    processes = descendants(command.proc.pid)
    assert {command.pid("parley-1"), command.pid("parley-2"), command.pid("nginx")} <= processes
    assert len(processes) >= 5  # two instances, nginx's master and worker, the store
    assert command.interrupt() == 0
    assert [p for p in processes if alive(p)] == []
    assert not command.workdir.exists()
    assert list(tmp_path.glob("parley-cluster-*")) == []
