"""Operations: /healthz, /readyz, /metrics (unauthenticated, cheap), and the access log + HTTP metrics hook.

/metrics is served on the main listener, or with --metrics-port only on a listener of its own (loopback by default):
the Prometheus convention, so what reaches the main port (the world, through a proxy) cannot scrape it.
"""
import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from handlers.base import BaseHandler
from services.operations.logs import scrub
from services.wire.codes import Code

access_log = logging.getLogger("tornado.access")

READY_TIMEOUT = 1.0  # seconds: a store slower than this is not ready for traffic


class OpsHandler(BaseHandler):
    """Probes: no credentials (balancers and Prometheus call them); successful answers are logged at DEBUG so
    they do not flood the access log."""

    public = True


class HealthHandler(OpsHandler):
    def get(self):
        self.ok({"status": "alive", "instance": self.services.instance_id})


class ReadyHandler(OpsHandler):
    async def get(self):
        if self.services.draining:
            return self.not_ready("the server is shutting down")
        try:
            await asyncio.wait_for(self.services.store.ping(), READY_TIMEOUT)
        except Exception as exc:  # any failure of the ping means the same thing: not ready
            return self.not_ready(f"the message store is not reachable ({type(exc).__name__})")
        self.ok({"status": "ready", "instance": self.services.instance_id})

    def not_ready(self, why):
        self.set_status(Code.NOT_READY.status)
        self.finish({"code": Code.NOT_READY, "message": why})


class MetricsHandler(OpsHandler):
    def get(self):
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.services.metrics.registry))


def log_function(metrics):
    """Tornado's `log_function` setting: the HTTP duration histogram and one access log line per request.

    The level follows the status (5xx error, 4xx warning, else info; probes that succeed at debug); the URL
    is scrubbed of `token=` values; WebSocket upgrades are logged once, at the handshake (101).
    """

    def log_request(handler):
        status = handler.get_status()
        seconds = handler.request.request_time()
        metrics.http_request(type(handler).__name__, status, seconds)
        if status >= 500:
            level = logging.ERROR
        elif status >= 400:
            level = logging.WARNING
        elif isinstance(handler, OpsHandler):
            level = logging.DEBUG
        else:
            level = logging.INFO
        if not access_log.isEnabledFor(level):
            return
        request = handler.request
        uri = scrub(request.uri)
        access_log.log(level, "%d %s %s (%s) %.2fms", status, request.method, uri, request.remote_ip,
                       seconds * 1000, extra={"status": status, "method": request.method, "uri": uri,
                                              "remote_ip": request.remote_ip,
                                              "duration_ms": round(seconds * 1000, 2)})

    return log_request


default_handlers = [
    (r"/healthz", HealthHandler),
    (r"/readyz", ReadyHandler),
]
# On the main listener, or alone on the --metrics-port one (server.make_metrics_app).
metrics_handlers = [
    (r"/metrics", MetricsHandler),
]
