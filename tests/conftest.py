"""Fixtures: one real MongoDB-wire server per test session, a real Parley app per test, real sockets.

Every test gets its own database on the shared server. Set PARLEY_TEST_MONGO_URL to run against a real MongoDB.
"""
import asyncio
import json
import os
import uuid
from pathlib import Path

import msgspec
import pytest
from pymongo import AsyncMongoClient, MongoClient
from tornado import httpclient
from tornado.websocket import websocket_connect

import server
from services.operations.pipelines import Embed, Pipeline, Pipelines, Timeouts
from services.providers import make_provider
from services.storage.embedded_mongo import EmbeddedMongo
from services.wire import schema
from services.wire.codes import Code
from tests.fakes import FAKE_PROVIDERS
from tests.upstream import FakeUpstream

REQUIRE_ALL = os.environ.get("PARLEY_REQUIRE_ALL") == "1"
TEST_TOKEN = "test-token-0123456789"
PARLEY_SUBPROTOCOL = "parley.v1"


def ws_request(url, token=TEST_TOKEN, protocol=PARLEY_SUBPROTOCOL, **headers):
    """A WebSocket handshake request carrying `Authorization: Bearer` (token=None: no credentials), opted in to
    Parley's dialect (protocol=None: a plain LangBot connection)."""
    if protocol is not None:
        headers.setdefault("Sec-WebSocket-Protocol", protocol)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpclient.HTTPRequest(url, headers=headers)


def require(condition, reason):
    """Skip when a real component is missing, but fail under PARLEY_REQUIRE_ALL=1 (CI provisions everything)."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required component missing: {reason}")
    pytest.skip(reason)


def frame_problem(frame, text=None, dialect=None):
    """Why a frame about to go on the wire is not what services/wire/schema.py declares (None: it is). The frame must
    be an instance of a server frame Struct (of the connection's dialect, when known); its bytes, when the
    sender encoded them (shared by many connections), must be exactly its encoding and decode under the
    dialect's declaration with no unknown field."""
    if type(frame) not in schema.SERVER_STRUCTS:
        return f"not a server frame Struct: {type(frame).__name__} {str(frame)[:300]}"
    if dialect is not None and type(frame) not in schema.STRUCTS_OF[dialect]:
        return f"{type(frame).__name__} is not a frame of the {dialect} dialect"
    if type(frame) is schema.Error:  # its code is a row of the table; one a plain LangBot client may get, if it
        # answers a LangBot frame (or the connect)
        if frame.code not in set(Code):
            return f"error code {frame.code!r} is not in services/wire/codes.py"
        langbot_request = frame.request_type in (msgspec.UNSET, *(schema.frame_type(t) for t in schema.LANGBOT_CLIENT))
        if dialect == "langbot" and langbot_request and not Code(frame.code).langbot:
            return f"error code {frame.code!r} answers a LangBot request but is not marked `langbot`"
    encoded = schema.encode(frame)
    if text is not None and bytes(text) != encoded:
        return f"the bytes sent are not the frame's encoding: {bytes(text)[:300]!r} vs {encoded[:300]!r}"
    if dialect is not None:
        try:
            schema.check_server_frame(encoded, dialect)
        except ValueError as exc:
            return str(exc)
    return None


@pytest.fixture(autouse=True)
def frames_are_their_structs(monkeypatch):
    """Every frame the server puts on a WebSocket is checked where it is sent (frame_problem): everything encoded
    as a frame, everything queued for a connection (against its dialect), everything an outbox writes (merged
    chunks and paged catch-ups included). A mismatch fails the test that sent it."""
    from services.delivery import hub
    from services.wire import outbox
    problems = []
    encode, send, write = schema.encode, hub.Connection.send, outbox.Outbox._send

    def checked_encode(frame):
        if type(frame) not in schema.SERVER_STRUCTS:
            problems.append(frame_problem(frame))
        return encode(frame)

    def checked_send(self, frame, text=None, nbytes=None):
        # a plain LangBot connection is never queued an extension frame (Connection.send drops those), but a
        # LangBot frame type must come as its LangBot Struct
        dialect = self.dialect
        if dialect == "langbot" and schema.TYPE_OF.get(type(frame)) not in schema.LANGBOT_TYPES:
            dialect = None
        if problem := frame_problem(frame, text, dialect):
            problems.append(problem)
        return send(self, frame, text, nbytes)

    def checked_write(self, frame, text=None, nbytes=None):
        if problem := frame_problem(frame, text):
            problems.append(problem)
        return write(self, frame, text, nbytes)

    monkeypatch.setattr(schema, "encode", checked_encode)
    monkeypatch.setattr(hub.Connection, "send", checked_send)
    monkeypatch.setattr(outbox.Outbox, "_send", checked_write)
    yield problems
    assert not problems, "server frames that are not their Structs:\n" + "\n".join(problems[:5])


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory):
    url = os.environ.get("PARLEY_TEST_MONGO_URL")
    if url:
        yield url
        return
    embedded = EmbeddedMongo(tmp_path_factory.mktemp("mongo")).start()
    yield embedded.url
    embedded.stop()


def make_test_pipelines():
    fast = Timeouts(first_token=5, stall=5, total=30)
    return Pipelines([
        Pipeline(id="default", name="Demo", provider="demo", model="demo", timeouts=fast,
                 options={"words": 12, "rate": 0}),
        # Long and paced: there is always time to stop it mid-stream.
        Pipeline(id="slow", provider="demo", model="demo", timeouts=fast,
                 options={"words": 3000, "rate": 200}),
        Pipeline(id="thinker", provider="demo", model="demo", timeouts=fast,
                 options={"words": 8, "rate": 0, "thinking": 5}),
        # Resume tests: thinking then text, ~0.1 s per reply, so a cut lands mid-reply or after it.
        Pipeline(id="resumable", provider="demo", model="demo", timeouts=fast, history_messages=0,
                 options={"words": 50, "thinking": 15, "rate": 600}),
        Pipeline(id="stall", provider="stall", timeouts=Timeouts(first_token=2, stall=0.3, total=10)),
        # A first-token limit far longer than the stall limit: a stall after the first token is still timed by
        # the stall limit.
        Pipeline(id="stall_late", provider="stall", timeouts=Timeouts(first_token=60, stall=0.3, total=120)),
        Pipeline(id="mute", provider="stall", options={"before_first": 99},
                 timeouts=Timeouts(first_token=0.3, stall=5, total=10)),
        Pipeline(id="endless", provider="demo", options={"words": 100000, "rate": 500},
                 timeouts=Timeouts(first_token=5, stall=5, total=0.4)),
        # As fast as possible and long: floods a reader that stops reading.
        # Over 524,288 code points of answer (its final frame alone is over the 1 MB outbox limit), in ~100 chunks.
        Pipeline(id="huge", provider="demo", model="demo", timeouts=fast, history_messages=0,
                 options={"words": 95000, "thinking": 12000, "rate": 0, "chunk_words": 1000}),
        Pipeline(id="bulk", provider="demo", model="demo", timeouts=fast,
                 options={"words": 3000, "rate": 0}),
        # As fast as possible and long enough (~1 s) that a second tab resumes it while it streams.
        Pipeline(id="torrent", provider="demo", model="demo", timeouts=fast, history_messages=0,
                 options={"words": 50000, "rate": 0}),
        Pipeline(id="broken", provider="fail", timeouts=fast),
        # Takes images; LangBot's embed widget reaches it as bot "widget".
        Pipeline(id="vision", provider="demo", model="demo", timeouts=fast, inputs=("text", "image"),
                 embed=Embed(bot="widget", origins=("https://shop.example",), name="Vision help"),
                 options={"words": 12, "rate": 0}),
        Pipeline(id="empty", provider="empty", timeouts=fast),
        # Answers with its context (tests/fakes.py ContextProvider): what the model was given.
        Pipeline(id="context", provider="context", timeouts=fast),
    ])


def provider_factory(pipeline):
    fake = FAKE_PROVIDERS.get(pipeline.provider)
    return fake(pipeline) if fake else make_provider(pipeline)


@pytest.fixture
def upstream(io_loop):
    """A fake OpenAI-compatible server on loopback (tests/upstream.py)."""
    up = FakeUpstream()
    io_loop.run_sync(up.start)
    yield up
    io_loop.run_sync(up.stop)


@pytest.fixture
def db_name():
    return "t_" + uuid.uuid4().hex[:16]


@pytest.fixture
def config(mongo_url, db_name):
    return server.Config(mongo_url=mongo_url, db_name=db_name, checkpoint_interval=0.05, max_queued=3,
                         auth="token", token=TEST_TOKEN, auth_timeout=0.5, rate_limit=1000, rate_burst=1000)


@pytest.fixture
def services(io_loop, config, mongo_url, db_name):
    svc = io_loop.run_sync(lambda: server.open_services(config, pipelines=make_test_pipelines(),
                                                       provider_factory=provider_factory))
    yield svc
    io_loop.run_sync(lambda: server.close_services(svc), timeout=30)
    with MongoClient(mongo_url) as client:
        client.drop_database(db_name)


@pytest.fixture
def stored_message(io_loop, mongo_url, db_name):
    """`await stored_message(message_id)`: a message as any MongoDB client reads it from the suite's store, not
    through services/storage/store.py: its document, with the text checkpointed so far (`content` plus the appended
    `text_parts`: docs/architecture.md, "Checkpoints append"). None if there is none."""
    client = AsyncMongoClient(mongo_url, tz_aware=True)

    async def read(message_id):
        doc = await client[db_name].messages.find_one({"_id": message_id})
        if doc is not None and ("text_parts" in doc or "thinking_parts" in doc):
            doc["content"] = (doc.get("content") or "") + "".join(doc.pop("text_parts", None) or ())
            doc["thinking"] = (doc.get("thinking") or "") + "".join(doc.pop("thinking_parts", None) or ())
        return doc

    yield read
    io_loop.run_sync(client.close)


@pytest.fixture
def app(services):
    return server.make_app(services)


@pytest.fixture
def base_url(http_server, http_port):
    return f"http://127.0.0.1:{http_port}"


@pytest.fixture
def ws_url(base_url):
    def url(pipeline="default", **query):
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{base_url.replace('http', 'ws', 1)}/api/v1/pipelines/{pipeline}/ws/connect" + (f"?{qs}" if qs else "")
    return url


class Client:
    """A test WebSocket client: JSON frames, reads with a deadline, helpers that follow one reply."""

    def __init__(self, ws):
        self.ws = ws
        self.connected = None

    async def send(self, frame):
        await self.ws.write_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout=5.0):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        return None if raw is None else json.loads(raw)

    async def recv_type(self, *types, timeout=5.0):
        """The next frame of one of `types`, skipping others."""
        while True:
            frame = await self.recv(timeout)
            assert frame is not None, f"socket closed while waiting for {types}"
            if frame["type"] in types:
                return frame

    async def say(self, text, **extra):
        """Send a message; return its ack."""
        await self.send({"type": "message", "message": [{"type": "Plain", "text": text}], **extra})
        return await self.recv_type("ack", "error")

    async def until_final(self, message_id, timeout=10.0):
        """All response frames of one reply, through its final frame."""
        got = []
        while True:
            frame = await self.recv_type("response", timeout=timeout)
            if frame["data"]["message_id"] != message_id:
                continue
            got.append(frame)
            if frame["data"]["is_final"]:
                return got

    async def wait_closed(self, timeout=5.0):
        while True:
            if await asyncio.wait_for(self.ws.read_message(), timeout) is None:
                return self.ws.close_code, self.ws.close_reason

    def close(self):
        self.ws.close()


@pytest.fixture
def connect(io_loop, ws_url):
    clients = []

    async def open_client(pipeline="default", *, expect_connected=True, token=TEST_TOKEN, headers=None, **query):
        ws = await websocket_connect(ws_request(ws_url(pipeline, **query), token, **(headers or {})))
        client = Client(ws)
        clients.append(client)
        if expect_connected:
            client.connected = await client.recv()
            assert client.connected["type"] == "connected", client.connected
        return client

    yield open_client
    for c in clients:
        c.close()


@pytest.fixture
def fetch(http_client, base_url):
    """REST helper: JSON in and out, never raises on 4xx; asserts every answer is JSON."""

    async def do(path, method="GET", body=None, token=TEST_TOKEN, headers=None, **kw):
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None and not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        if body:
            headers.setdefault("Content-Type", "application/json")
        if method == "POST" and body is None:
            body = ""
        response = await http_client.fetch(base_url + path, method=method, body=body, headers=headers,
                                           raise_error=False, **kw)
        assert response.headers["Content-Type"].startswith("application/json"), response.headers
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        return response.code, json.loads(response.body)

    return do


async def settle(predicate, timeout=5.0):
    """Wait until `predicate()` is true (state that changes on the loop), failing after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# The modules that take longest (minutes of waiting on clusters, browsers and installs) go first: `make test`'s
# two processes (pytest-xdist, a module at a time, handed out in collection order) then end close together.
FIRST = ("test_failover", "test_cluster", "test_nginx", "test_browser", "test_crash", "test_install")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.nodeid.split("::")[0]).stem, len(FIRST)))
