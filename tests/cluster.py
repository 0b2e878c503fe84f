"""The cluster fixture: one store, three real `server.py --cluster` instances and a real nginx (nginx/cluster.py).

Clients reach nginx from different loopback source addresses (127.0.1.1, 127.0.2.1, ...): ip_hash hashes an
IPv4 client by its /24, so each address family member lands on its own backend, as distinct users would.
Identities are JWTs (HS256), so tests can be several users. Skips without nginx; fails under
PARLEY_REQUIRE_ALL=1.
"""
import asyncio
import json
import time
import uuid

import jwt
import pytest
from pymongo import MongoClient
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from nginx.cluster import Cluster, nginx_binary
from services.storage.embedded_mongo import free_port
from services.storage.store import bus_db_name
from tests.conftest import Client, require

JWT_SECRET = "cluster-test-secret-0123456789abcdef"
LEASE = 2.0  # seconds: short, so the reaper's work is observable quickly
LIVENESS = 2.0  # seconds without a heartbeat before an instance is gone (default 3)
PATIENCE = 60.0  # seconds any one frame may take: three instances, nginx and nx-27017 share a loaded 2-core box


class Held:
    """What one client (across its reconnects) holds of one reply, as static/parley.js keeps it."""
    __slots__ = ("text", "thinking", "epoch", "finals", "trail")

    def __init__(self):
        self.text, self.thinking, self.epoch, self.finals = "", "", None, []
        self.trail = []  # (connection, frame type) as they came: what a problem report shows


def _squeeze(trail):
    """A trail with runs of one frame type on one connection counted: [(conn, type, n), ...]."""
    out = []
    for conn, kind in trail:
        if out and out[-1][:2] == [conn, kind]:
            out[-1][2] += 1
        else:
            out.append([conn, kind, 1])
    return out


class Ledger:
    """Every frame one connection receives, checked as it arrives, for every reply (docs/protocol.md): a delta
    starts exactly where the client's text ends (no gap, no character twice), text is taken back only by a
    `rewind` or by `resumed`'s offsets, a reply's final comes once per client and nothing of it after it on
    that connection, and the final's text starts with what the client holds. `held` is shared by the
    connections of one client (its reconnects); `problems` lists what went wrong, `counts` the frames."""

    def __init__(self, held=None):
        self.held = {} if held is None else held
        self.ended_here = set()
        self.problems = []
        self.counts = {}

    def of(self, message_id):
        return self.held.setdefault(message_id, Held())

    def feed(self, frame):
        kind, data = frame.get("type"), frame.get("data") or {}
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "resumed":
            for entry in data["replies"]:
                h = self.of(entry["message_id"])
                h.trail.append((id(self) % 10000, f"resumed {entry}"))
                if not h.finals:  # where this connection continues: what the client holds past it is void
                    h.text, h.thinking = h.text[:entry["offset"]], h.thinking[:entry["thinking_offset"]]
                    h.epoch = entry["epoch"]
            return
        if kind not in ("response", "rewind", "status"):
            return
        message_id = data["message_id"]
        h = self.of(message_id)
        h.trail.append((id(self) % 10000, "final" if data.get("is_final") else kind))
        if message_id in self.ended_here:
            self.problems.append(f"{kind} of {message_id} after its final: {data}")
            return
        if kind == "status":
            if not h.text and not h.thinking:
                h.epoch = data["epoch"]
        elif kind == "rewind":
            if h.epoch is None or data["epoch"] >= h.epoch:
                h.text, h.thinking = h.text[:data["offset"]], h.thinking[:data["thinking_offset"]]
                h.epoch = data["epoch"]
        elif data["is_final"]:
            self.ended_here.add(message_id)
            if h.finals:
                self.problems.append(f"a second final of {message_id}: {data['status']} {_squeeze(h.trail)}")
            elif not data["content"].startswith(h.text):
                self.problems.append(f"the final of {message_id} takes back text it never said was void: "
                                     f"{len(h.text)} held, {len(data['content'])} in the final")
            h.finals.append(data)
            h.text, h.thinking = data["content"], data.get("thinking", "")
        else:
            for key, at_key, have in (("delta", "offset", "text"), ("thinking_delta", "thinking_offset",
                                                                   "thinking")):
                if key not in data:
                    continue
                held_text = getattr(h, have)
                if data[at_key] > len(held_text):
                    self.problems.append(f"a gap in {message_id}: {have} at {data[at_key]}, {len(held_text)} held "
                                         f"{_squeeze(h.trail)}")
                elif data[at_key] < len(held_text):
                    self.problems.append(f"{message_id}: {len(held_text) - data[at_key]} {have} characters twice "
                                         f"{_squeeze(h.trail)}")
                setattr(h, have, held_text[:data[at_key]] + data[key])


class ClusterClient(Client):
    """A Client whose every wait for a frame is at least PATIENCE: waits are bounds on a condition (the frame
    comes), never a measure of speed, and four suites run at once on this machine. Every frame it receives goes
    through its `ledger`."""

    def __init__(self, ws, held=None):
        super().__init__(ws)
        self.ledger = Ledger(held)

    async def recv(self, timeout=PATIENCE):
        frame = await super().recv(max(timeout, PATIENCE))
        if frame is not None:
            self.ledger.feed(frame)
        return frame

    async def recv_type(self, *types, timeout=PATIENCE):
        return await super().recv_type(*types, timeout=max(timeout, PATIENCE))

    async def wait_closed(self, timeout=PATIENCE):
        return await super().wait_closed(max(timeout, PATIENCE))


def explain(cluster, message_id, held=None):
    """What a failure report needs about one reply: the client's trail, the store's view, and every instance's
    log lines that name it (CI keeps only the tail of the suite's output)."""
    from services.storage.store import assemble
    with MongoClient(cluster.mongo_url) as db:
        doc = assemble(db[cluster.db_name].messages.find_one({"_id": message_id})) or {}
    lines = [f"reply {message_id}: store status={doc.get('status')} content={len(doc.get('content') or '')} "
             f"epoch={doc.get('epoch')} instance={doc.get('instance')} lease_until={doc.get('lease_until')} "
             f"continued={doc.get('continued')}"]
    if held is not None:
        lines.append(f"client held {len(held.text)} characters, finals {len(held.finals)}, epoch {held.epoch}, "
                     f"trail {_squeeze(held.trail)}")
    for instance in cluster.instances:
        try:
            with open(instance.log_path, errors="replace") as f:
                lines += [f"{instance.id}: {line.rstrip()}" for line in f if message_id in line][-20:]
        except OSError:
            pass
    return "\n".join(lines)


def token(user="alice", admin=False):
    claims = {"sub": user, "exp": int(time.time()) + 3600}
    if admin:
        claims["role"] = "admin"
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def pipelines_toml(upstream_port):
    return f"""
[pipelines.default]
provider = "demo"
model = "demo"
options = {{ words = 12, rate = 0 }}

[pipelines.slow]
provider = "demo"
model = "demo"
options = {{ words = 3000, rate = 200 }}
timeouts = {{ first_token = 10, stall = 10, total = 120 }}

[pipelines.slow_once]
provider = "demo"
model = "demo"
options = {{ words = 3000, rate = 200 }}
timeouts = {{ first_token = 10, stall = 10, total = 120 }}
on_instance_lost = "interrupt"

[pipelines.medium]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 400, thinking = 20, rate = 100 }}
timeouts = {{ first_token = 10, stall = 10, total = 120 }}

[pipelines.long]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 900, thinking = 20, rate = 100 }}
timeouts = {{ first_token = 10, stall = 10, total = 120 }}

[pipelines.endless]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 1000000, rate = 100 }}
timeouts = {{ first_token = 60, stall = 60, total = 3600 }}

[pipelines.paced]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 40, rate = 400 }}

[pipelines.cuttable]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 60, thinking = 10, rate = 100 }}

[pipelines.steady]
provider = "demo"
model = "demo"
history_messages = 0
options = {{ words = 80, rate = 100 }}

[pipelines.up]
provider = "openai"
model = "m"
base_url = "http://127.0.0.1:{upstream_port}/v1"
history_messages = 0
retries = 0
timeouts = {{ first_token = 10, stall = 10, total = 120 }}

[pipelines.up_vllm]
provider = "openai"
model = "m"
base_url = "http://127.0.0.1:{upstream_port}/v1"
history_messages = 0
retries = 0
timeouts = {{ first_token = 10, stall = 10, total = 120 }}
continue_with = "continue_final_message"
"""


def demo_text(pipeline, question):
    """(reasoning, answer): what the demo pipeline of this file streams for `question`, uninterrupted."""
    import tomllib
    from services.operations.pipelines import Pipeline
    from services.providers.demo import DemoProvider
    table = tomllib.loads(pipelines_toml(0))["pipelines"][pipeline]
    return DemoProvider(Pipeline(id=pipeline, options=table.get("options", {}))).whole(question)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, mongo_url):
    yield from running_cluster(tmp_path_factory, mongo_url)


def running_cluster(tmp_path_factory, mongo_url, *more_args):
    """Start the cluster (server options `more_args` after the suite's own: the last of a repeated one counts),
    yield it, stop it and drop its database."""
    require(nginx_binary(), "nginx is not installed (Debian package nginx)")
    workdir = tmp_path_factory.mktemp("cluster")
    upstream_port = free_port()
    pipelines = workdir / "pipelines.toml"
    pipelines.write_text(pipelines_toml(upstream_port))
    db_name = "c_" + uuid.uuid4().hex[:12]
    c = Cluster(workdir, instances=3, mongo_url=mongo_url, db_name=db_name, pipelines_file=pipelines,
                env={"PARLEY_JWT_SECRET": JWT_SECRET},
                extra_args=["--auth", "jwt", "--lease-seconds", str(LEASE), "--liveness-timeout", str(LIVENESS),
                            "--checkpoint-interval", "0.05", "--drain-timeout", "1", "--rate-limit", "1000", "--rate-burst", "1000",
                            "--log-level", "info", *more_args])
    c.upstream_port = upstream_port
    c.start()
    yield c
    c.stop()
    with MongoClient(mongo_url) as client:
        client.drop_database(db_name)
        client.drop_database(bus_db_name(db_name))


def source(n):
    """The n-th client network: 127.0.n.1 (its own /24, so its own ip_hash bucket)."""
    return f"127.0.{n}.1"


async def fetch(cluster, path, *, src=source(1), method="GET", body=None, user="alice", admin=False, base=None):
    """REST through nginx (or `base`) from source address `src`: (status, json body, answering instance)."""
    headers = {"Authorization": f"Bearer {token(user, admin)}"}
    if body is not None and not isinstance(body, str):
        body = json.dumps(body)
    if method == "POST" and body is None:
        body = ""
    if body:
        headers["Content-Type"] = "application/json"  # a body must say it is JSON (415 otherwise)
    request = HTTPRequest((base or cluster.url) + path, method=method, body=body, headers=headers,
                          network_interface=src, request_timeout=PATIENCE)
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, json.loads(response.body), response.headers.get("X-Parley-Instance")


async def plain(url):
    """GET a text answer (e.g. /metrics straight from one instance): (status, body text)."""
    response = await AsyncHTTPClient().fetch(url, raise_error=False, request_timeout=PATIENCE)
    return response.code, response.body.decode()


async def instance_for(cluster, src):
    code, body, _ = await fetch(cluster, "/healthz", src=src)
    assert code == 200, body
    return body["data"]["instance"]


async def connect(cluster, pipeline="default", *, src=source(1), user="alice", admin=False, base=None,
                  headers=None, held=None, **query):
    """A WebSocket through nginx from `src`; returns a Client with `.connected` and `.instance` set. `held`: what
    this client held on its previous connections (its ledger's, shared)."""
    query.setdefault("stream_mode", "delta")
    query.setdefault("protocol", "parley.v1")  # Parley's dialect (plain connections speak LangBot's)
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    url = (base or cluster.url).replace("http", "ws", 1) + f"/api/v1/pipelines/{pipeline}/ws/connect?{qs}"
    request = HTTPRequest(url, headers={"Authorization": f"Bearer {token(user, admin)}", **(headers or {})},
                          network_interface=src, request_timeout=PATIENCE)
    ws = await websocket_connect(request)
    client = ClusterClient(ws, held)
    client.instance = ws.headers.get("X-Parley-Instance")
    client.connected = await client.recv()
    assert client.connected["type"] == "connected", client.connected
    return client


async def wait_for(predicate, timeout=PATIENCE, interval=0.05):
    """Poll an async predicate until it returns something truthy; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


async def spread(cluster):
    """One source address per instance: {instance_id: "127.0.n.1"} (ip_hash is deterministic; cached)."""
    if getattr(cluster, "sources", None) is None:
        found = {}
        for n in range(1, 40):
            found.setdefault(await instance_for(cluster, source(n)), source(n))
            if len(found) == len(cluster.instances):
                break
        assert len(found) == len(cluster.instances), found
        cluster.sources = found
    return cluster.sources
