"""Metrics move as they should through a chat, a stop, a failure, refusals and disconnects; health probes."""
import asyncio
import json
import os
import socket

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

import server
from services.operations.metrics import Metrics
from services.storage.store import Store
from tests.conftest import TEST_TOKEN, settle

pytestmark = pytest.mark.gen_test(timeout=30)


def value(services, name, **labels):
    return services.metrics.registry.get_sample_value(name, labels) or 0.0


async def scrape(http_client, base_url):
    response = await http_client.fetch(base_url + "/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = response.body.decode()
    return text, {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for family in text_string_to_metric_families(text) for s in family.samples}


async def test_a_chat_moves_connection_frame_generation_and_store_metrics(connect, services, http_client,
                                                                          base_url):
    v = lambda name, **labels: value(services, name, **labels)  # noqa: E731
    c = await connect()
    assert v("parley_connections_opened_total", pipeline="default") == 1
    assert v("parley_connections_open", pipeline="default") == 1
    ack = await c.say("hello there")
    frames = await c.until_final(ack["data"]["reply_message_id"])
    final = frames[-1]["data"]
    assert final["status"] == "completed"
    await settle(lambda: v("parley_generations_finished_total", pipeline="default", status="completed") == 1)

    assert v("parley_generations_started_total", pipeline="default") == 1
    assert v("parley_generations_finished_total", pipeline="default", status="failed") == 0
    assert v("parley_generations_active", pipeline="default", state="streaming") == 0
    assert v("parley_generations_active", pipeline="default", state="queued") == 0
    assert v("parley_generation_first_token_seconds_count", pipeline="default") == 1
    assert v("parley_generation_duration_seconds_count", pipeline="default", status="completed") == 1
    assert v("parley_generation_streamed_characters_total", pipeline="default", kind="text") == len(final["content"])
    assert v("parley_generation_tokens_total", pipeline="default", kind="completion") == \
        final["usage"]["completion_tokens"]
    assert v("parley_ws_frames_received_total", type="message") == 1
    assert v("parley_ws_frames_sent_total", type="connected") == 1
    assert v("parley_ws_frames_sent_total", type="ack") == 1
    assert v("parley_ws_frames_sent_total", type="response") == len(frames)
    assert v("parley_ws_sent_bytes_total") > sum(len(json.dumps(f)) for f in frames) * 0.9
    assert v("parley_store_operation_duration_seconds_count", operation="insert_messages") == 1
    assert v("parley_store_operation_duration_seconds_count", operation="finish") == 1
    assert v("parley_store_operation_errors_total", operation="finish") == 0

    c.ws.close(1001)  # a close frame with a status code (a browser leaving the page; parley.js closes with 1000)
    await settle(lambda: v("parley_connections_open", pipeline="default") == 0)
    assert v("parley_connections_closed_total", pipeline="default", reason="client") == 1
    assert v("parley_connection_duration_seconds_count", pipeline="default") == 1

    text, samples = await scrape(http_client, base_url)
    assert samples[("parley_http_request_duration_seconds_count",
                    (("handler", "ChatSocket"), ("status", "101")))] == 1
    assert samples[("parley_generations_finished_total", (("pipeline", "default"), ("status", "completed")))] == 1
    # no unbounded label: not one id of this chat appears in the exposition
    for ident in (c.connected["connection_id"], c.connected["session_id"], final["message_id"],
                  ack["data"]["message_id"]):
        assert ident not in text


async def test_label_values_exist_before_any_traffic(services, http_client, base_url):
    _, samples = await scrape(http_client, base_url)
    for pipeline in ("default", "slow", "broken"):
        for status in ("completed", "stopped", "failed", "timeout", "interrupted"):
            assert samples[("parley_generations_finished_total",
                            (("pipeline", pipeline), ("status", status)))] == 0
        assert samples[("parley_connections_open", (("pipeline", pipeline),))] == 0
        for source in ("live", "store", "finished"):
            assert samples[("parley_resumes_total", (("pipeline", pipeline), ("source", source)))] == 0
    for outcome in ("local", "forwarded", "noop"):
        assert samples[("parley_stop_requests_total", (("outcome", outcome),))] == 0
    for event in ("stop", "broadcast", "push"):
        assert samples[("parley_bus_events_published_total", (("event", event),))] == 0
    for reason in ("slow", "capacity", "auth", "ping_timeout"):
        assert samples[("parley_ws_disconnects_total", (("reason", reason),))] == 0
    assert samples[("parley_store_operation_errors_total", (("operation", "checkpoint"),))] == 0
    # latency series appear when an operation first runs (pre-created, 27 operations would dominate the count)
    assert ("parley_store_operation_duration_seconds_count", (("operation", "checkpoint"),)) not in samples


async def test_a_stop_counts_once_with_its_latency_and_checkpoints_lag(connect, services):
    v = lambda name, **labels: value(services, name, **labels)  # noqa: E731
    c = await connect("slow")
    ack = await c.say("tell me everything")
    reply_id = ack["data"]["reply_message_id"]
    for _ in range(30):  # long enough for a few checkpoints (every 50 ms in tests)
        await c.recv_type("response")
    assert v("parley_generations_active", pipeline="slow", state="streaming") == 1
    await c.send({"type": "stop"})
    await c.until_final(reply_id)
    await settle(lambda: v("parley_generations_finished_total", pipeline="slow", status="stopped") == 1)
    assert v("parley_stop_requests_total", outcome="local") == 1
    assert v("parley_stop_latency_seconds_count", pipeline="slow") == 1
    assert 0 < v("parley_stop_latency_seconds_sum", pipeline="slow") < 1.0
    assert v("parley_generations_active", pipeline="slow", state="streaming") == 0
    assert v("parley_checkpoint_lag_seconds_count", pipeline="slow") >= 1
    assert v("parley_ws_frames_received_total", type="stop") == 1
    assert v("parley_ws_frames_sent_total", type="stop_ack") == 1

    await c.send({"type": "stop"})  # nothing runs now
    await c.recv_type("stop_ack")
    assert v("parley_stop_requests_total", outcome="noop") == 1
    assert v("parley_stop_requests_total", outcome="local") == 1


async def test_failures_and_timeouts_count_by_status_and_code(connect, services):
    v = lambda name, **labels: value(services, name, **labels)  # noqa: E731
    broken = await connect("broken")
    ack = await broken.say("hi")
    assert (await broken.until_final(ack["data"]["reply_message_id"]))[-1]["data"]["status"] == "failed"
    mute = await connect("mute")
    ack = await mute.say("hi")
    assert (await mute.until_final(ack["data"]["reply_message_id"]))[-1]["data"]["status"] == "timeout"
    await settle(lambda: v("parley_generations_finished_total", pipeline="mute", status="timeout") == 1)
    assert v("parley_generations_finished_total", pipeline="broken", status="failed") == 1
    assert v("parley_provider_errors_total", pipeline="broken", code="upstream_error") == 1
    assert v("parley_provider_errors_total", pipeline="mute", code="first_token_timeout") == 1
    assert v("parley_generation_first_token_seconds_count", pipeline="mute") == 0
    assert v("parley_generations_finished_total", pipeline="broken", status="completed") == 0


async def test_session_busy_is_counted(connect, services):
    c = await connect("slow")
    codes = []
    for i in range(5):  # max_queued=3 in tests: one running + four waiting is the most a session holds
        codes.append((await c.say(f"m{i}"))["type"])
    assert codes == ["ack"] * 4 + ["error"]
    assert value(services, "parley_sessions_busy_rejections_total", pipeline="slow") == 1
    assert value(services, "parley_generations_active", pipeline="slow", state="queued") == 3
    await c.send({"type": "stop"})
    await settle(lambda: not services.streams.generations)
    assert value(services, "parley_generations_active", pipeline="slow", state="queued") == 0
    assert value(services, "parley_generations_finished_total", pipeline="slow", status="stopped") == 4


async def test_bad_frames_refusals_and_server_disconnects(connect, services, ws_url):
    v = lambda name, **labels: value(services, name, **labels)  # noqa: E731
    c = await connect()
    await c.send("not json")
    await c.recv_type("error")
    await c.send({"type": "dance"})
    await c.recv_type("error")
    assert v("parley_ws_frames_received_total", type="invalid") == 1
    assert v("parley_ws_frames_received_total", type="unknown") == 1

    refused = await connect("no-such-pipeline", expect_connected=False)
    assert (await refused.recv())["code"] == "pipeline_not_found"
    await refused.wait_closed()
    assert v("parley_ws_disconnects_total", reason="invalid") == 1
    assert services.metrics.registry.get_sample_value(
        "parley_connections_opened_total", {"pipeline": "no-such-pipeline"}) is None

    big = await connect()
    await big.send("x" * (services.config.max_message_size + 1))
    code, _ = await big.wait_closed()
    assert code == 1009
    await settle(lambda: v("parley_connections_closed_total", pipeline="default", reason="server") == 1)
    assert v("parley_ws_disconnects_total", reason="oversize") == 1

    await c.send({"type": "disconnect"})
    await c.wait_closed()
    await settle(lambda: v("parley_connections_open", pipeline="default") == 0)
    assert v("parley_connections_closed_total", pipeline="default", reason="client") == 1
    assert v("parley_ws_disconnects_total", reason="other") == 0


async def test_resumes_count_by_source_with_the_characters_replayed(connect, services):
    c = await connect("slow", stream_mode="delta")
    ack = await c.say("resume me")
    reply = ack["data"]["reply_message_id"]
    await c.recv_type("response")
    c.close()
    d = await connect("slow", stream_mode="delta")
    await d.send({"type": "resume", "message_id": reply, "offset": 0})
    resumed = await d.recv_type("resumed")
    catch_up = await d.recv_type("response")
    live = value(services, "parley_resumes_total", pipeline="slow", source="live")
    assert live == 1
    assert value(services, "parley_resume_replayed_characters_total", pipeline="slow") == len(catch_up["data"]["delta"])
    await d.send({"type": "stop"})
    await d.until_final(reply)
    e = await connect("slow")
    await e.send({"type": "resume", "message_id": reply, "offset": 3})
    await e.recv_type("resumed")
    final = (await e.until_final(reply))[-1]["data"]
    assert value(services, "parley_resumes_total", pipeline="slow", source="finished") == 1
    assert value(services, "parley_resume_replayed_characters_total", pipeline="slow") == (
        len(catch_up["data"]["delta"]) + len(final["content"]) - 3)
    assert resumed["data"]["replies"][0]["message_id"] == reply


def test_resume_and_bus_metrics_record_what_later_code_reports():
    metrics = Metrics(["default"])
    metrics.resumed("default", "live", 120)
    metrics.resumed("default", "store", 30)
    metrics.bus_event_published("stop")
    metrics.bus_event_received("stop", 0.02)
    get = metrics.registry.get_sample_value
    assert get("parley_resumes_total", {"pipeline": "default", "source": "live"}) == 1
    assert get("parley_resume_replayed_characters_total", {"pipeline": "default"}) == 150
    assert get("parley_bus_events_received_total", {"event": "stop"}) == 1
    assert get("parley_bus_lag_seconds_count", {"event": "stop"}) == 1
    metrics.resumed("some-unknown-pipeline", "live", 1)  # never a new label value from traffic
    assert get("parley_resumes_total", {"pipeline": "some-unknown-pipeline", "source": "live"}) is None
    exposed = generate_latest(metrics.registry).decode()
    assert 'pipeline="other"' not in exposed and "some-unknown-pipeline" not in exposed


def test_every_metric_is_documented():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "operations.md")) as f:
        doc = f.read()
    names = [family.name + ("_total" if family.type == "counter" else "") for family in Metrics().registry.collect()]
    assert len(names) > 20
    assert [n for n in names if f"`{n}`" not in doc] == []


async def test_two_apps_have_independent_registries(services):
    other = Metrics(["default"])
    other.generations_started.labels("default").inc()
    assert value(services, "parley_generations_started_total", pipeline="default") == 0


# health

async def test_healthz_and_readyz(fetch, services):
    code, body = await fetch("/healthz")
    assert code == 200 and body["data"]["status"] == "alive"
    code, body = await fetch("/readyz")
    assert code == 200 and body["data"]["status"] == "ready"
    services.draining = True
    code, body = await fetch("/readyz")
    assert code == 503 and body["code"] == "not_ready"
    code, _ = await fetch("/healthz")
    assert code == 200


async def test_readyz_is_503_when_the_store_is_unreachable(fetch, services):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = AsyncMongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=300)
    reachable, services.store = services.store, Store(client, "parley", metrics=services.metrics)
    try:
        code, body = await fetch("/readyz")
    finally:
        services.store = reachable
        await client.close()
    assert code == 503 and body["code"] == "not_ready" and "not reachable" in body["message"]
    assert value(services, "parley_store_operation_errors_total", operation="ping") == 1
    code, _ = await fetch("/readyz")
    assert code == 200


async def test_access_is_measured_by_handler_class_and_status(fetch, services):
    await fetch("/api/v1/pipelines")
    await fetch("/api/v1/nothing-here")
    await fetch("/api/v1/pipelines/nope/sessions")
    assert value(services, "parley_http_request_duration_seconds_count", handler="PipelinesHandler",
                 status="200") == 1
    assert value(services, "parley_http_request_duration_seconds_count", handler="NotFoundHandler",
                 status="404") == 1
    assert value(services, "parley_http_request_duration_seconds_count", handler="SessionsHandler",
                 status="404") == 1


class TestPingTimeout:
    @pytest.fixture
    def config(self, mongo_url, db_name):
        return server.Config(mongo_url=mongo_url, db_name=db_name, ping_interval=0.2, ping_timeout=0.2,
                             token=TEST_TOKEN)

    async def test_a_client_that_never_pongs_is_disconnected_and_counted(self, services, http_server, http_port):
        # A raw socket: it completes the handshake, then never reads, so Tornado's pings go unanswered.
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(b"GET /api/v1/pipelines/default/ws/connect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Authorization: Bearer " + TEST_TOKEN.encode() + b"\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        try:
            await settle(lambda: value(services, "parley_ws_disconnects_total", reason="ping_timeout") == 1)
        finally:
            writer.close()
        await settle(lambda: value(services, "parley_connections_open", pipeline="default") == 0)
        assert value(services, "parley_connections_closed_total", pipeline="default", reason="server") == 1

    async def test_a_client_that_answers_pings_stays_connected(self, services, connect):
        c = await connect()
        pings = []
        c.ws.on_ping = pings.append  # Tornado's client answers each ping with a pong, then calls this
        await settle(lambda: len(pings) >= 4, timeout=15)  # each ping waits for the previous one's pong
        await c.send({"type": "ping"})
        assert (await c.recv_type("pong"))["type"] == "pong"
        assert value(services, "parley_ws_disconnects_total", reason="ping_timeout") == 0
        assert len(services.hub.connections) == 1


IDLE_SERIES_LIMIT = 400  # docs/operations.md "Series count"


@pytest.mark.gen_test(timeout=30)
async def test_an_idle_server_with_one_pipeline_exports_a_few_hundred_series(io_loop, config, mongo_url, db_name):
    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from services.operations.pipelines import default_pipelines
    svc = await server.open_services(config, pipelines=default_pipelines())
    sockets = bind_sockets(0, "127.0.0.1")
    http = HTTPServer(server.make_app(svc))
    http.add_sockets(sockets)
    try:
        url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/metrics"
        for _ in range(3):  # as Prometheus would: its own scrapes add the HTTP series of /metrics
            text = (await AsyncHTTPClient().fetch(url)).body.decode()
        series = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert 200 < len(series) <= IDLE_SERIES_LIMIT, len(series)
        assert 'pipeline="other"' not in text and "_created" not in text
        assert {f.name for f in text_string_to_metric_families(text)} >= {"parley_connections_open"}
    finally:
        http.stop()
        await server.close_services(svc)
        async with AsyncMongoClient(mongo_url) as client:
            await client.drop_database(db_name)
