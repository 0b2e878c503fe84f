"""Logs: JSON lines with the chat's ids, the access log's levels, and no token or API key in any line."""
import io
import json
import logging
import re

import pytest
from pymongo import MongoClient
from tornado.websocket import websocket_connect

import server
from services.operations import logs
from services.operations.pipelines import Pipeline, Pipelines, Timeouts
from tests.conftest import TEST_TOKEN, Client, make_test_pipelines, provider_factory
from tests.upstream import FakeUpstream

KEY = "sk-parley-log-test-9f8e7d6c5b4a"          # the key Parley holds: the upstream refuses it
TOKEN = TEST_TOKEN  # the server token, sent as ?token= so it would be in the access log


@pytest.fixture
def captured():
    """Every log line of the test (DEBUG and up), as Parley's own JSON handler writes it."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    def lines():
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    lines.text = stream.getvalue
    yield lines
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.fixture
def upstream(io_loop):
    up = FakeUpstream(api_key="sk-the-right-key")
    io_loop.run_sync(up.start)
    yield up
    io_loop.run_sync(up.stop)


@pytest.fixture
def services(io_loop, config, mongo_url, db_name, upstream, monkeypatch):
    """The usual test services plus `keyed`, an OpenAI-compatible pipeline whose key sits in the environment."""
    monkeypatch.setenv("PARLEY_LOG_TEST_KEY", KEY)
    keyed = Pipeline(id="keyed", provider="openai", model="m", base_url=upstream.base_url,
                     api_key_env="PARLEY_LOG_TEST_KEY", retry_backoff=0.01, timeouts=Timeouts(connect=2.0))
    pipelines = Pipelines(list(make_test_pipelines()) + [keyed])
    svc = io_loop.run_sync(lambda: server.open_services(config, pipelines=pipelines,
                                                       provider_factory=provider_factory))
    yield svc
    io_loop.run_sync(lambda: server.close_services(svc), timeout=30)
    with MongoClient(mongo_url) as client:
        client.drop_database(db_name)


@pytest.mark.gen_test(timeout=20)
async def test_chat_lines_carry_their_ids(connect, captured, services):
    c = await connect("slow")
    ack = await c.say("hello")
    reply_id = ack["data"]["reply_message_id"]
    await c.recv_type("response")
    await c.send({"type": "stop"})
    await c.until_final(reply_id)
    session_id, conn_id = c.connected["session_id"], c.connected["connection_id"]
    lines = captured()

    def line(prefix):
        found = [entry for entry in lines if entry["message"].startswith(prefix)]
        assert found, f"no log line starts with {prefix!r}"
        return found[0]

    registered = line("stream signal registered")
    assert registered["pipeline"] == "slow" and registered["session_id"] == session_id
    assert registered["message_id"] == reply_id and registered["conn_id"] == conn_id
    removed = line("stream signal removed")
    assert (removed["pipeline"], removed["session_id"], removed["message_id"]) == ("slow", session_id, reply_id)
    assert "conn_id" not in removed  # the reply belongs to its session, not to the socket that asked
    stopped = line("stop executed locally")
    assert stopped["session_id"] == session_id and stopped["message_id"] == reply_id
    assert stopped["conn_id"] == conn_id and stopped["level"] == "INFO"
    assert line("connection registered")["conn_id"] == conn_id
    assert registered["request_id"] == line("connection registered")["request_id"]  # the socket's handshake
    for entry in lines:
        assert {"time", "level", "logger", "message"} <= entry.keys()


@pytest.mark.gen_test(timeout=20)
async def test_tokens_and_api_keys_never_reach_the_log(ws_url, captured, services, upstream):
    ws = await websocket_connect(ws_url("keyed", token=TOKEN), subprotocols=["parley.v1"])
    c = Client(ws)
    assert (await c.recv())["type"] == "connected"
    ack = await c.say("hi")
    final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
    c.close()
    # the key did go out, and the upstream answered with it, as OpenAI does
    assert upstream.calls and upstream.calls[0].headers["Authorization"] == f"Bearer {KEY}"
    assert final.get("status") == "failed" and final["error"]["code"] == "upstream_unauthorized", final
    logging.getLogger("parley.test").warning("a careless line: key=%s header=Bearer %s", KEY, KEY)

    text = captured.text()
    assert KEY not in text and KEY[:20] not in text
    assert TOKEN not in text
    access = [e for e in captured() if e["logger"] == "tornado.access" and e.get("status") == 101]
    assert access and "token=***" in access[0]["uri"] and access[0]["level"] == "INFO"
    assert any(e["message"].startswith("a careless line: key=***") for e in captured())
    # the failed reply is one event: one WARNING line, not one from the provider and one from the stream manager
    failed = [e for e in captured() if e["level"] == "WARNING" and "upstream_unauthorized" in e["message"]]
    assert len(failed) == 1, failed


@pytest.mark.gen_test(timeout=20)
async def test_access_log_level_follows_status(fetch, captured, services):
    await fetch("/api/v1/pipelines")
    await fetch("/api/v1/pipelines/nope/sessions")
    await fetch("/healthz")
    services.draining = True
    await fetch("/readyz")
    access = [e for e in captured() if e["logger"] == "tornado.access" and "uri" in e]
    assert len({e["request_id"] for e in access}) == len(access) == 4  # every request has its own id
    levels = {(e["uri"], e["status"]): e["level"] for e in access}
    assert levels == {("/api/v1/pipelines", 200): "INFO", ("/api/v1/pipelines/nope/sessions", 404): "WARNING",
                      ("/healthz", 200): "DEBUG", ("/readyz", 503): "ERROR"}


def test_text_format_appends_context_and_scrubs():
    stream = io.StringIO()
    handler = logs.make_handler("text", stream)
    log = logging.getLogger("parley.test.text")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.info("GET /x?session_type=person&token=abc123 Authorization: Bearer abc.def",
                 extra={"pipeline": "p1", "conn_id": "c1"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    out = stream.getvalue()
    assert "abc123" not in out and "abc.def" not in out
    assert "token=***" in out and "Bearer ***" in out
    assert out.rstrip().endswith("[pipeline=p1 conn_id=c1]")


@pytest.mark.gen_test(timeout=20)
async def test_a_percent_encoded_token_is_scrubbed_too(ws_url, captured, services):
    # Tornado decodes `%74oken` to `token`, so this connects; the access log must not keep the token either way.
    for query in ("%74oken", "%74%6F%6B%65%6E"):
        url = ws_url("default").replace("/ws/connect", "/ws/connect?" + query + "=" + TOKEN)
        c = Client(await websocket_connect(url))
        assert (await c.recv())["type"] == "connected"  # it was the token: the server took it
        c.close()
    logging.getLogger("parley.test").info("GET /x?%2574oken=" + TOKEN)  # double-encoded, in any line
    text = captured.text()
    assert TOKEN not in text
    uris = [e["uri"] for e in captured() if e["logger"] == "tornado.access" and e.get("status") == 101]
    assert len(uris) == 2 and all(u.endswith("=***") for u in uris), uris


def test_scrub_decodes_before_matching_but_never_forges_a_line():
    assert logs.scrub("/ws?%74oken=abc&x=1") == "/ws?token=***&x=1"
    assert logs.scrub("/ws?a=1&%61pi_key=sk-1") == "/ws?a=1&api_key=***"
    assert logs.scrub("/ws?%54%4F%4B%45%4E=abc") == "/ws?TOKEN=***"
    assert logs.scrub("/ws?q=a%0Atoken=forged") == "/ws?q=a%0Atoken=forged"  # a newline stays escaped


def test_json_lines_have_iso_utc_millisecond_times_and_the_instance():
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    log = logging.getLogger("parley.test.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logs.bind_process(instance="test-instance")
    try:
        log.info('quote " and %s', "100%22")
    finally:
        log.removeHandler(handler)
        log.propagate = True
        logs._static.pop("instance", None)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry["time"]
    assert entry["instance"] == "test-instance" and entry["message"] == 'quote " and 100"'
