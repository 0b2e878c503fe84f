"""A real Prometheus scrapes a running Parley on its --metrics-port listener (loopback): `up` becomes 1 and the chats
we drive show in its queries; the main port does not serve /metrics."""
import asyncio
import json
import os
import shutil
import subprocess
import urllib.parse

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

import server
from services.storage.embedded_mongo import free_port
from tests.conftest import require

CHATS = 3
DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "docs", "grafana-dashboard.json")


@pytest.fixture
def metrics_port():
    return free_port()


@pytest.fixture
def config(config, metrics_port):
    """conftest's Parley settings, with /metrics on a listener of its own (--metrics-port)."""
    config.metrics_port = metrics_port
    return config


@pytest.fixture
def metrics_listener(services, metrics_port, io_loop):
    """What server.serve() listens on for --metrics-port: server.make_metrics_app on --metrics-host."""
    listener = server.make_metrics_app(services).listen(metrics_port, services.config.metrics_host)
    yield f"http://{services.config.metrics_host}:{metrics_port}"
    listener.stop()


@pytest.fixture
def prometheus(tmp_path, http_server, metrics_listener, metrics_port):
    """Start `prometheus` scraping the test's Parley every second; yields its base URL."""
    binary = shutil.which("prometheus")
    require(binary, "the `prometheus` binary is not installed (Debian package prometheus)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: parley\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


async def query(base, promql):
    """The value of an instant query with one series, or None (no answer yet, or no series)."""
    url = f"{base}/api/v1/query?query={urllib.parse.quote(promql)}"
    try:
        response = await AsyncHTTPClient().fetch(url, request_timeout=2)
    except (HTTPClientError, OSError):  # not listening yet
        return None
    body = json.loads(response.body)
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


async def until(base, promql, expected, timeout=60):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got = None
    while loop.time() < deadline:
        got = await query(base, promql)
        if got == expected:
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"{promql} was {got}, not {expected}, after {timeout} s")


@pytest.mark.gen_test(timeout=120)
async def test_prometheus_scrapes_parley(prometheus, connect, base_url, metrics_listener):
    await until(prometheus, 'up{job="parley"}', 1.0)
    # /metrics lives on its own listener only; that listener serves nothing else
    assert (await AsyncHTTPClient().fetch(base_url + "/metrics", raise_error=False)).code == 404
    assert (await AsyncHTTPClient().fetch(metrics_listener + "/healthz", raise_error=False)).code == 404
    c = await connect()
    for i in range(CHATS):
        ack = await c.say(f"chat {i}")
        await c.until_final(ack["data"]["reply_message_id"])
    await until(prometheus, 'parley_generations_finished_total{pipeline="default",status="completed"}',
                float(CHATS))
    await until(prometheus, 'parley_connections_open{pipeline="default"}', 1.0)
    await until(prometheus, 'sum(parley_generation_first_token_seconds_count{pipeline="default"})',
                float(CHATS))
    # a dashboard query (docs/operations.md) evaluates on the real data
    p99 = await query(prometheus, 'histogram_quantile(0.99, sum by (le) '
                                  '(parley_generation_first_token_seconds_bucket{pipeline="default"}))')
    assert p99 is not None and 0 < p99 <= 10
    # every panel of the shipped Grafana dashboard is a query this Prometheus accepts
    with open(DASHBOARD) as f:
        exprs = [t["expr"] for panel in json.load(f)["panels"] for t in panel["targets"]]
    assert exprs
    for expr in exprs:
        url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expr)}"
        body = json.loads((await AsyncHTTPClient().fetch(url, raise_error=False)).body)
        assert body["status"] == "success", (expr, body)


OPERATIONS = os.path.join(os.path.dirname(__file__), "..", "docs", "operations.md")


def documented_panels():
    """docs/operations.md "Dashboard queries": [(title, [query, ...]), ...] from its promql block."""
    with open(OPERATIONS) as f:
        section = f.read().split("### Dashboard queries", 1)[1]
    block = section.split("```promql\n", 1)[1].split("```", 1)[0]
    panels = []
    for line in block.splitlines():
        if line.startswith("# "):
            panels.append((line[2:], []))
        elif line.strip():
            panels[-1][1].append(line.strip())
    return panels


def dashboard_panels():
    with open(DASHBOARD) as f:
        return [(p["title"], [t["expr"] for t in p["targets"]]) for p in json.load(f)["panels"]]


def test_the_dashboard_has_exactly_the_documented_panels():
    assert len(documented_panels()) >= 9
    assert dashboard_panels() == documented_panels()


async def values(base, promql):
    url = f"{base}/api/v1/query?query={urllib.parse.quote(promql)}"
    body = json.loads((await AsyncHTTPClient().fetch(url, raise_error=False)).body)
    assert body["status"] == "success", (promql, body)
    return [float(r["value"][1]) for r in body["data"]["result"]]


@pytest.mark.gen_test(timeout=120)
async def test_every_documented_query_has_a_value_on_an_idle_server(prometheus):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # rate() needs two scrapes in its window; wait for three
        try:
            scrapes = await values(prometheus, 'count_over_time(up{job="parley"}[5m])')
        except OSError:  # Prometheus not listening yet
            scrapes = []
        if scrapes and scrapes[0] >= 3:
            break
        assert loop.time() < deadline, "Prometheus did not scrape Parley three times"
        await asyncio.sleep(0.5)
    for title, queries in documented_panels():
        for promql in queries:
            got = await values(prometheus, promql)
            assert got, f"panel {title!r}: {promql} returns no data on an idle server"
            if not promql.startswith("histogram_quantile"):  # a quantile of no observations is NaN
                assert all(v == 0 for v in got), (title, promql, got)
