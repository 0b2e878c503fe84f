"""Parley: chat with AI pipelines over WebSocket. `python server.py --help` lists the options.

config -> services -> make_app() -> listen -> graceful shutdown. With no MongoDB URL, an embedded nx-27017 is
started under --data-dir and stopped on exit.

One module of ~400 lines on purpose: it is the one composition root (docs/architecture.md, "The rooms"), where
every service is made, wired and closed in order, so that order is read in one place.
"""
import sys

if __name__ == "__main__":
    # `python server.py` (make run): the embedded store starts before the imports below, so its start-up (a
    # Python process of its own, ~0.5 s to listen) overlaps theirs (~0.5 s) instead of following them.
    from services.storage.embedded_mongo import start_early
    EARLY_STORE = start_early()

import asyncio
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import time

from pymongo import AsyncMongoClient
from tornado import web

from handlers import api, embed, files as files_api, ops, web as web_app, ws
from handlers.base import NotFoundHandler
from services.access.auth import Authenticator, check_jwt_secret
from services.access.limits import RateLimiter
from services.access.signing import Signer
from services.access.visitors import Visitors
from services.cluster.failover import Failover
from services.cluster.liveness import Liveness
from services.cluster.mongo_bus import MongoBus
from services.cluster.reaper import Reaper
from services.conversations.announcements import Announcements
from services.conversations.files import Files
from services.conversations.history import History
from services.conversations.numbers import Numbers
from services.conversations.sending import Sending
from services.conversations.sessions import Sessions
from services.delivery.bus import Bus, LocalBus
from services.delivery.fanout import FanOut
from services.delivery.hub import Hub
from services.delivery.keepalive import Keepalive
from services.delivery.resume import Resumer
from services.operations import logs, runtime, settings
from services.operations.metrics import Metrics
from services.operations.pipelines import PipelineConfigError, api_key, default_pipelines, load_pipelines
from services.replies.streams import StreamManager
from services.storage.batching import Admission
from services.storage.embedded_mongo import EmbeddedMongo, EmbeddedMongoError
from services.storage.store import Store
from services.wire import events
from services.wire.codes import Close

log = logging.getLogger("parley")

Config = settings.Config  # one attribute per option in services/operations/settings.py


@dataclasses.dataclass
class Services:
    config: Config
    client: AsyncMongoClient
    store: Store
    hub: Hub
    bus: Bus
    fanout: FanOut
    streams: StreamManager
    sessions: Sessions
    sending: Sending
    history: History
    announcements: Announcements
    files: Files
    visitors: Visitors
    resumer: Resumer
    reaper: Reaper
    liveness: Liveness | None
    pipelines: object
    auth: object
    instance_id: str
    metrics: Metrics
    keepalive: Keepalive
    draining: bool = False             # set when shutdown begins: /readyz answers 503


def parse_args(argv=None, environ=None):
    """Flags > PARLEY_* environment > --config TOML file > defaults (services/operations/settings.py declares them all).
    A bad value exits 2 with a message naming the option and the expected form."""
    try:
        config = settings.resolve(argv, environ)
        if config.auth == "jwt":
            try:
                check_jwt_secret(config.jwt_secret)
            except ValueError as exc:
                raise settings.SettingsError(f"option --jwt-secret: {exc}") from None
        return config
    except settings.SettingsError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def make_authenticator(config):
    return Authenticator(config.auth, token=config.token, jwt_secret=config.jwt_secret,
                         jwt_public_key=config.jwt_public_key, admin_claim=config.jwt_admin_claim,
                         admin_value=config.jwt_admin_value, host=config.host)


def make_pipelines(config):
    return load_pipelines(config.pipelines_file) if config.pipelines_file else default_pipelines()


async def open_services(config, *, pipelines=None, provider_factory=None, auth=None):
    """Create every service inside the running loop (an AsyncMongoClient is bound to the loop it starts on).
    `auth` and `pipelines` made earlier (main validates them) are used as they are: each is built, and its
    warnings logged, once."""
    auth = auth or make_authenticator(config)
    if pipelines is None:
        pipelines = make_pipelines(config)
    logs.redact(auth.token, *(api_key(p) for p in pipelines))  # never logged
    metrics = Metrics(p.id for p in pipelines)
    client = make_client(config)
    store = Store(client, config.db_name, metrics=metrics)
    await store.create_indexes()
    instance_id = config.instance_id or f"{socket.gethostname()}:{config.port}"
    if config.cluster:
        await check_change_streams(store)
    hub = Hub()
    if config.cluster:  # events cross instances through the store; deltas only where viewed elsewhere
        bus = MongoBus(instance_id, store, metrics=metrics, viewed_sessions=lambda: hub.by_session.keys(),
                       live_replies=lambda session_id: streams.live(session_id),
                       online=lambda s: hub.online(s) if hub.session_type(s) == "group" else ())
    else:
        bus = LocalBus(instance_id, metrics=metrics)
    fanout = FanOut(hub, bus, metrics, store=store)
    extra = {"provider_factory": provider_factory} if provider_factory else {}
    streams = StreamManager(store, bus, pipelines, instance_id=instance_id,
                            checkpoint_interval=config.checkpoint_interval, lease_seconds=config.lease_seconds,
                            max_queued=config.max_queued, metrics=metrics, cluster=config.cluster, **extra)
    signer = Signer(await store.signing_key())
    files = Files(store, signer, max_image=config.max_image_size, max_document=config.max_document_size,
                  quota=config.file_quota, link_ttl=config.file_link_ttl, metrics=metrics)
    numbers = Numbers(local=not config.cluster)  # message numbers without a store round trip
    sessions = Sessions(store, hub, bus, pipelines, numbers, max_members=config.max_members)
    sending = Sending(store, hub, fanout, bus, streams, pipelines, numbers, files=files,
                      limiter=RateLimiter(config.rate_limit, config.rate_burst),
                      on_last_viewer_gone=config.on_last_viewer_gone, max_image_size=config.max_image_size,
                      max_document_size=config.max_document_size,
                      admission=Admission(config.send_concurrency, config.send_queue, config.store_timeout))
    history = History(store, bus, streams)
    announcements = Announcements(hub, bus)
    visitors = Visitors(signer, pipelines, store, config, metrics=metrics)
    resumer = Resumer(store, fanout, streams, sessions, metrics)
    # a cluster knows in seconds which instances are gone, so their replies end (or go on) without waiting out
    # each reply's lease
    liveness = Liveness(store, instance_id, timeout=config.liveness_timeout) if config.cluster else None
    failover = Failover(store, bus, streams, sending, pipelines, max_continuations=config.max_continuations,
                        metrics=metrics)
    reaper = Reaper(store, bus, streams, failover, lease_seconds=config.lease_seconds, liveness=liveness)
    await bus.start()
    await streams.warm_up()  # the first reply must not pay for imports and client set-up
    # replies a previous run of this instance left `streaming` end now, and others' whose lease expired
    await reaper.sweep(starting=True)
    if liveness is not None:
        liveness.on_change = reaper.wake
        await liveness.start()
    reaper.start()
    keepalive = Keepalive(hub, ping_interval=config.ping_interval, ping_timeout=config.ping_timeout)
    keepalive.start()
    visitors.start()
    return Services(config=config, client=client, store=store, hub=hub, bus=bus, fanout=fanout, streams=streams,
                    sessions=sessions, sending=sending, history=history, announcements=announcements, files=files,
                    visitors=visitors, resumer=resumer, reaper=reaper, liveness=liveness, pipelines=pipelines,
                    auth=auth, instance_id=instance_id, metrics=metrics, keepalive=keepalive)


def make_client(config):
    """Every store operation is bounded (--store-timeout, pymongo's client-side `timeoutMS`): a paused or dead
    store answers `store_unavailable` instead of holding requests and sockets."""
    ms = int(config.store_timeout * 1000)
    return AsyncMongoClient(config.mongo_url, tz_aware=True, timeoutMS=ms, serverSelectionTimeoutMS=ms,
                            connectTimeoutMS=ms)


class ClusterConfigError(RuntimeError):
    pass


class ListenError(RuntimeError):
    pass


async def check_change_streams(store):
    """--cluster carries events between instances through a change stream: refuse to start without one."""
    try:
        await store.check_change_streams()
    except Exception as exc:
        raise ClusterConfigError(
            "--cluster needs a MongoDB that supports change streams (a replica set; a single node is enough: "
            f"mongod --replSet rs0, then rs.initiate()): {exc}") from None


async def close_services(services):
    """Reverse order of creation: end every reply (persisted as interrupted), then the store."""
    services.keepalive.stop()
    await services.visitors.stop()
    await services.reaper.stop()
    await services.streams.shutdown()
    if services.liveness is not None:  # after our replies ended: the others need not wait to know we are gone
        await services.liveness.stop()
    await services.sending.close()
    await services.bus.close()
    await services.fanout.order.close()
    await services.store.close()  # the writes gathered for a bulk write land first
    await services.client.close()


def make_app(services):
    config = services.config
    deps = {"services": services}
    own = ops.metrics_handlers if config.metrics_port is None else []  # else on make_metrics_app's listener
    routes = web_app.default_handlers + [  # the browser's `/` comes before the API's JSON `/`
        (pattern, handler, deps)
        for pattern, handler in ws.default_handlers + api.default_handlers + files_api.default_handlers
        + embed.default_handlers + ops.default_handlers + own]
    return web.Application(
        routes, default_handler_class=NotFoundHandler, default_handler_args=deps,
        frame_ancestors=config.frame_ancestors,
        cross_origin_protection=True,  # cross-site REST writes: 403 (handlers/base.py check_trusted_origin)
        log_function=ops.log_function(services.metrics))


def make_metrics_app(services):
    """The --metrics-port listener's application: /metrics and nothing else."""
    deps = {"services": services}
    return web.Application([(pattern, handler, deps) for pattern, handler in ops.metrics_handlers],
                           default_handler_class=NotFoundHandler, default_handler_args=deps,
                           log_function=ops.log_function(services.metrics))


def listen(app, port, host, **options):
    try:
        return app.listen(port, host, **options)
    except OSError as exc:  # a port in use, an address not on this host: say so, no traceback
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def http_server_options(config):
    """Tornado HTTPServer limits: bodies over --max-body-size are refused before they are read, a client that
    sends its headers too slowly (slowloris) or idles is closed after --http-idle-timeout."""
    return {"max_body_size": config.max_body_size,
            "max_buffer_size": max(config.max_body_size, 4 * config.max_message_size) + 64 * 1024,
            "idle_connection_timeout": config.http_idle_timeout, "body_timeout": config.body_timeout,
            "max_header_size": 64 * 1024}


def banner(config, url):
    """The ready-to-use URL, on stdout (it carries the token, so it never goes to the log stream). In JSON mode
    it is one JSON line too, so every stream Parley writes parses line by line."""
    if config.log_format == "json":
        print(json.dumps({"time": logs.iso_time(time.time()), "level": "INFO", "logger": "parley",
                          "message": "Parley is running", "url": url}), flush=True)
    else:
        print(f"\n    Parley is running. Open, or connect clients with this token:\n\n        {url}\n", flush=True)


async def serve(config, **made):
    services = await open_services(config, **made)
    logs.bind_process(instance=services.instance_id)
    app = make_app(services)
    server = metrics_server = None
    try:
        server = listen(app, config.port, config.host, **http_server_options(config))
        if config.metrics_port is not None:
            metrics_server = listen(make_metrics_app(services), config.metrics_port, config.metrics_host)
    except ListenError:
        if server is not None:
            server.stop()
        await close_services(services)
        raise
    # Start-up's objects live as long as the process: frozen out of the cyclic collector (stream's fan-out and
    # relay runs, conn's idle connects: docs/performance.md)
    tune_gc()
    log.info("Parley listening on http://%s:%s/ (instance %s, auth %s)", config.host, config.port,
             services.instance_id, config.auth)
    if metrics_server is not None:
        log.info("metrics on http://%s:%s/metrics", config.metrics_host, config.metrics_port)
    if services.auth.mode == "token":
        banner(config, f"http://{config.host}:{config.port}/?token={services.auth.token}")
    found = None
    if not config.cluster:  # `make client` in this directory finds this server (and, in token mode, its token)
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        found = runtime.write(config.data_dir, f"http://{host}:{config.port}/", services.auth.token)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
        await drain(services, server)
        if metrics_server is not None:  # scraped to the end of the drain
            metrics_server.stop()
            await metrics_server.close_all_connections()
    finally:
        if found is not None:
            runtime.remove(found)


# Young collections every 7,000 container allocations instead of 700: a connect or a sent frame allocates
# dozens to hundreds of them, and each collection that reaches the older generations walks every live one.
GC_THRESHOLD = (7000, 10, 10)


def tune_gc():
    """Once listening: start-up's objects (modules, the app, the services: tens of thousands) are frozen out of
    the cyclic collector, which would otherwise walk them in every full collection, and young collections run
    less often. Measured: docs/performance.md (idle connects: a quarter of Parley's CPU per connection)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def drain(services, server):
    """Graceful shutdown: stop listening (a proxy sends new connections elsewhere; on connections already open
    /readyz and handshakes answer 503), connected clients are told to reconnect (they resume on another
    instance); in a cluster, live replies are handed over to the other instances (which go on with them);
    replies that cannot go on elsewhere get --drain-timeout to finish, the rest end `interrupted`."""
    services.draining = True
    server.stop()  # no new connections: nginx sends new clients to another instance
    await services.reaper.stop()  # (it would take up what this instance hands over)
    log.info("draining: telling %d clients to reconnect elsewhere", len(services.hub.connections))
    services.bus.publish(events.Reconnect(reason="server restarting"))  # this instance's connections only
    for conn in list(services.hub.connections.values()):
        conn.close(Close.RESTARTING, Close.RESTARTING.reason)
    if services.config.cluster:  # the others go on with what generates here (their reapers take it over now)
        pipelines = services.pipelines
        goes_on = lambda p: p in pipelines and pipelines.get(p).on_instance_lost == "continue"  # noqa: E731
        while await services.streams.hand_over(goes_on):
            pass  # (a send in progress as the sockets closed may have started another meanwhile)
    await services.streams.drain(services.config.drain_timeout)
    await close_services(services)  # what is still generating is checkpointed and ends `interrupted`
    await server.close_all_connections()


def fail(config, problem):
    """End start-up naming the problem: a JSON line in JSON mode (the stream stays parseable), else plain."""
    if config.log_format == "json":
        log.critical("parley: %s", problem)
        raise SystemExit(1)
    raise SystemExit(f"parley: {problem}")


def check_environment(pipelines):
    """Exit 2, as for a bad option, when a PARLEY_* variable is no option (nor a pipeline's key variable)."""
    keys = [name + suffix for p in pipelines if (name := p.api_key_env) for suffix in ("", "_FILE")]
    try:
        settings.check_environment(os.environ, also=keys)
    except settings.SettingsError as exc:
        print(f"parley: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def configure(argv=None):
    """The options, logging, and everything checked before anything starts (exits naming a problem)."""
    config = parse_args(argv)
    logs.setup(level=config.log_level, fmt=config.log_format)
    try:
        made = {"auth": make_authenticator(config), "pipelines": make_pipelines(config)}
        check_environment(made["pipelines"])
        web_app.check_frame_ancestors(config.frame_ancestors)
        if config.cluster and not config.mongo_url:
            raise ValueError("--cluster needs --mongo-url: every instance must share one MongoDB (a replica set)")
    except (PipelineConfigError, ValueError) as exc:
        fail(config, exc)
    return config, made


def main(argv=None, early_store=None):
    """`early_store`: the embedded store start_early() spawned for these same options, or None."""
    embedded = early_store
    try:
        config, made = configure(argv)
        if not config.mongo_url:
            os.umask(0o077)  # the data dir and everything in it are private to this user (docs/security.md)
            embedded = embedded or EmbeddedMongo(os.path.join(config.data_dir, "mongo")).spawn()
            embedded.wait_ready().supervise()
            config.mongo_url = embedded.url
        asyncio.run(serve(config, **made))
    except (ClusterConfigError, ListenError, EmbeddedMongoError) as exc:
        fail(config, exc)
    finally:
        if embedded:
            embedded.stop()
            log.info("embedded MongoDB stopped")


if __name__ == "__main__":
    main(early_store=EARLY_STORE)
