"""Parley: chat with AI pipelines over WebSocket. `python server.py --help` lists the options.

config -> services -> make_app() -> listen -> graceful shutdown. With no MongoDB URL, an embedded nx-27017 is
started under --data-dir and stopped on exit.
"""
import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket

from pymongo import AsyncMongoClient
from tornado import web

from handlers import api, ops, ws
from handlers.base import NotFoundHandler
from services import logs
from services.auth import Authenticator
from services.chat import ChatService
from services.embedded_mongo import EmbeddedMongo
from services.hub import Hub
from services.limits import RateLimiter
from services.metrics import Metrics
from services.pipelines import PipelineConfigError, default_pipelines, load_pipelines
from services.reaper import Reaper
from services.resume import Resumer
from services.store import Store
from services.streams import StreamManager

log = logging.getLogger("parley")


@dataclasses.dataclass
class Config:
    host: str = "127.0.0.1"
    port: int = 8888
    mongo_url: str | None = None
    db_name: str = "parley"
    data_dir: str = "data"
    checkpoint_interval: float = 1.0   # seconds between partial-text writes of a streaming reply
    lease_seconds: float = 30.0
    max_queued: int = 8                # replies waiting per session before `session_busy`
    max_message_size: int = 64 * 1024
    outbox_limit: int = 1024 * 1024    # characters waiting for a slow reader before it is disconnected
    max_connections: int = 10_000
    max_connections_per_user: int = 32
    rate_limit: float = 5.0            # messages per second per user (sustained)
    rate_burst: int = 20
    ping_interval: float = 25.0
    ping_timeout: float = 10.0
    log_level: str = "info"
    auth: str = "token"                # token | jwt | none (docs: README "Authentication")
    token: str | None = None           # token mode: fixed token; None = a random one per start
    jwt_secret: str | None = None      # jwt mode, HS256
    jwt_public_key: str | None = None  # jwt mode, RS256 (PEM text)
    jwt_admin_claim: str = "role"
    jwt_admin_value: str = "admin"
    auth_timeout: float = 10.0         # seconds for a WebSocket to send its `authenticate` frame
    allowed_origins: tuple = ()        # extra origins allowed to open WebSockets ("*" = any)
    log_format: str = "text"           # or "json": one JSON object per line
    pipelines_file: str | None = None  # TOML; None = the built-in `default` demo pipeline
    on_last_viewer_gone: str = "continue"  # or "stop": end a session's replies when its last viewer leaves
    instance_id: str | None = None     # None: host name + port
    cluster: bool = False              # several instances on one shared store (needs change streams)
    trusted_proxies: tuple = ()        # peers whose X-Real-IP / X-Forwarded-For are believed (nginx)
    drain_timeout: float = 10.0        # SIGTERM: seconds live replies get to finish before they are interrupted


@dataclasses.dataclass
class Services:
    config: Config
    client: AsyncMongoClient
    store: Store
    hub: Hub
    streams: StreamManager
    chat: ChatService
    resumer: Resumer
    reaper: Reaper
    pipelines: object
    auth: object
    instance_id: str
    metrics: Metrics
    draining: bool = False             # set when shutdown begins: /readyz answers 503


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="Parley: chat with AI pipelines over WebSocket")
    p.add_argument("--host", default=env("PARLEY_HOST", Config.host))
    p.add_argument("--port", type=int, default=int(env("PARLEY_PORT", Config.port)))
    p.add_argument("--mongo-url", default=env("PARLEY_MONGO_URL"),
                   help="MongoDB URL; without one an embedded nx-27017 runs with its data in --data-dir")
    p.add_argument("--db-name", default=env("PARLEY_DB_NAME", Config.db_name))
    p.add_argument("--data-dir", default=env("PARLEY_DATA_DIR", Config.data_dir))
    p.add_argument("--pipelines", default=env("PARLEY_PIPELINES"), metavar="FILE",
                   help="pipelines TOML file (see pipelines.example.toml); default: the offline demo pipeline")
    p.add_argument("--auth", choices=["token", "jwt", "none"], default=env("PARLEY_AUTH", Config.auth))
    p.add_argument("--token", default=env("PARLEY_TOKEN"), help="token mode: use this token instead of a random one")
    p.add_argument("--jwt-secret", default=env("PARLEY_JWT_SECRET"), help="jwt mode: HS256 shared secret")
    p.add_argument("--jwt-public-key", default=env("PARLEY_JWT_PUBLIC_KEY"), metavar="PEM_FILE",
                   help="jwt mode: RS256 public key file")
    p.add_argument("--jwt-admin-claim", default=Config.jwt_admin_claim)
    p.add_argument("--jwt-admin-value", default=Config.jwt_admin_value)
    p.add_argument("--allowed-origins", default=env("PARLEY_ALLOWED_ORIGINS", ""),
                   help="comma-separated origins (https://chat.example) allowed to open WebSockets besides "
                        "the server's own; * allows any")
    p.add_argument("--ping-interval", type=float, default=Config.ping_interval,
                   help="seconds between WebSocket pings (dead peers are found by them)")
    p.add_argument("--ping-timeout", type=float, default=Config.ping_timeout,
                   help="seconds to wait for a pong before closing the connection")
    p.add_argument("--max-connections", type=int, default=Config.max_connections)
    p.add_argument("--max-connections-per-user", type=int, default=Config.max_connections_per_user)
    p.add_argument("--rate-limit", type=float, default=Config.rate_limit, help="messages per second per user")
    p.add_argument("--rate-burst", type=int, default=Config.rate_burst)
    p.add_argument("--max-message-size", type=int, default=Config.max_message_size,
                   help="largest inbound WebSocket frame in bytes (larger: close 1009)")
    p.add_argument("--outbox-limit", type=int, default=Config.outbox_limit,
                   help="characters waiting for a slow reader before it is disconnected (close 4008)")
    p.add_argument("--checkpoint-interval", type=float, default=Config.checkpoint_interval)
    p.add_argument("--lease-seconds", type=float, default=Config.lease_seconds,
                   help="a reply whose instance stops renewing it for this long is marked interrupted")
    p.add_argument("--on-last-viewer-gone", choices=["continue", "stop"], default=Config.on_last_viewer_gone,
                   help="what a reply does when the last socket viewing its session closes")
    p.add_argument("--max-queued", type=int, default=Config.max_queued)
    p.add_argument("--instance-id", default=env("PARLEY_INSTANCE_ID"),
                   help="this instance's name in logs, metrics and the store (default: host name:port)")
    p.add_argument("--cluster", action="store_true", default=env("PARLEY_CLUSTER") == "1",
                   help="run as one of several instances sharing --mongo-url (a replica set: change streams)")
    p.add_argument("--drain-timeout", type=float, default=Config.drain_timeout,
                   help="on SIGTERM, seconds replies still generating get to finish before they end interrupted")
    p.add_argument("--trusted-proxies", default=env("PARLEY_TRUSTED_PROXIES", ""),
                   help="comma-separated addresses of proxies (nginx) whose X-Real-IP/X-Forwarded-For "
                        "name the client; from anyone else those headers are ignored")
    p.add_argument("--log-level", default=env("PARLEY_LOG_LEVEL", Config.log_level),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=env("PARLEY_LOG_FORMAT", Config.log_format), choices=["text", "json"])
    args = p.parse_args(argv)
    return Config(host=args.host, port=args.port, mongo_url=args.mongo_url, db_name=args.db_name,
                  data_dir=args.data_dir, checkpoint_interval=args.checkpoint_interval,
                  lease_seconds=args.lease_seconds, on_last_viewer_gone=args.on_last_viewer_gone,
                  max_queued=args.max_queued, log_level=args.log_level, log_format=args.log_format,
                  pipelines_file=args.pipelines,
                  auth=args.auth, token=args.token, jwt_secret=args.jwt_secret,
                  jwt_public_key=_read(args.jwt_public_key), jwt_admin_claim=args.jwt_admin_claim,
                  jwt_admin_value=args.jwt_admin_value,
                  max_connections=args.max_connections, max_connections_per_user=args.max_connections_per_user,
                  rate_limit=args.rate_limit, rate_burst=args.rate_burst, max_message_size=args.max_message_size,
                  outbox_limit=args.outbox_limit, ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
                  allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
                  instance_id=args.instance_id, cluster=args.cluster, drain_timeout=args.drain_timeout,
                  trusted_proxies=tuple(a.strip() for a in args.trusted_proxies.split(",") if a.strip()))


def _read(path):
    if not path:
        return None
    with open(path) as f:
        return f.read()


def make_authenticator(config):
    return Authenticator(config.auth, token=config.token, jwt_secret=config.jwt_secret,
                         jwt_public_key=config.jwt_public_key, admin_claim=config.jwt_admin_claim,
                         admin_value=config.jwt_admin_value, host=config.host)


async def open_services(config, *, pipelines=None, provider_factory=None):
    """Create every service inside the running loop (an AsyncMongoClient is bound to the loop it starts on)."""
    auth = make_authenticator(config)
    if pipelines is None:
        pipelines = load_pipelines(config.pipelines_file) if config.pipelines_file else default_pipelines()
    logs.redact(auth.token, *(os.environ.get(p.api_key_env) for p in pipelines if p.api_key_env))  # never logged
    metrics = Metrics(p.id for p in pipelines)
    client = AsyncMongoClient(config.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
    store = Store(client, config.db_name, metrics=metrics)
    await store.create_indexes()
    instance_id = config.instance_id or f"{socket.gethostname()}:{config.port}"
    if config.cluster:
        await check_change_streams(store)
    hub = Hub()
    extra = {"provider_factory": provider_factory} if provider_factory else {}
    streams = StreamManager(store, hub, pipelines, instance_id=instance_id,
                            checkpoint_interval=config.checkpoint_interval, lease_seconds=config.lease_seconds,
                            max_queued=config.max_queued, metrics=metrics, cluster=config.cluster, **extra)
    chat = ChatService(store, hub, streams, pipelines, limiter=RateLimiter(config.rate_limit, config.rate_burst),
                       on_last_viewer_gone=config.on_last_viewer_gone)
    resumer = Resumer(store, hub, streams, chat, metrics)
    reaper = Reaper(store, hub, streams, lease_seconds=config.lease_seconds)
    await reaper.sweep()  # replies a previous run left `streaming` end now, if their lease has expired
    reaper.start()
    return Services(config=config, client=client, store=store, hub=hub, streams=streams, chat=chat,
                    resumer=resumer, reaper=reaper, pipelines=pipelines, auth=auth, instance_id=instance_id,
                    metrics=metrics)


class ClusterConfigError(RuntimeError):
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
    await services.reaper.stop()
    await services.streams.shutdown()
    await services.chat.close()
    await services.client.close()


def make_app(services):
    config = services.config
    deps = {"services": services}
    routes = [(pattern, handler, deps)
              for pattern, handler in ws.default_handlers + api.default_handlers + ops.default_handlers]
    return web.Application(
        routes, default_handler_class=NotFoundHandler, default_handler_args=deps,
        websocket_ping_interval=config.ping_interval, websocket_ping_timeout=config.ping_timeout,
        websocket_max_message_size=config.max_message_size,
        log_function=ops.log_function(services.metrics))


async def serve(config):
    services = await open_services(config)
    app = make_app(services)
    server = app.listen(config.port, config.host)
    log.info("Parley listening on http://%s:%s/ (instance %s, auth %s)", config.host, config.port,
             services.instance_id, config.auth)
    if services.auth.mode == "token":
        url = f"http://{config.host}:{config.port}/?token={services.auth.token}"
        print(f"\n    Parley is running. Open, or connect clients with this token:\n\n        {url}\n", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await drain(services, server)


async def drain(services, server):
    """Graceful shutdown: /readyz and new WebSockets answer 503, connected clients are told to reconnect (they
    resume on another instance), replies get --drain-timeout to finish, the rest end `interrupted`."""
    services.draining = True
    log.info("draining: telling %d clients to reconnect elsewhere", len(services.hub.connections))
    server.stop()  # no new connections: nginx sends new clients to another instance
    for conn in list(services.hub.connections.values()):
        conn.send({"type": "reconnect", "reason": "server restarting"})
        conn.close(1012, "server restarting")
    await services.streams.drain(services.config.drain_timeout)
    await close_services(services)  # what is still generating is checkpointed and ends `interrupted`
    await server.close_all_connections()


def main(argv=None):
    config = parse_args(argv)
    logs.setup(level=config.log_level, fmt=config.log_format)
    try:  # fail before anything starts, with a message that names the problem
        make_authenticator(config)
        if config.pipelines_file:
            load_pipelines(config.pipelines_file)
        if config.cluster and not config.mongo_url:
            raise ValueError("--cluster needs --mongo-url: every instance must share one MongoDB (a replica set)")
    except (PipelineConfigError, ValueError) as exc:
        raise SystemExit(f"parley: {exc}") from None
    embedded = None
    if not config.mongo_url:
        embedded = EmbeddedMongo(os.path.join(config.data_dir, "mongo")).start()
        config.mongo_url = embedded.url
    try:
        asyncio.run(serve(config))
    except ClusterConfigError as exc:
        raise SystemExit(f"parley: {exc}") from None
    finally:
        if embedded:
            embedded.stop()
            log.info("embedded MongoDB stopped")


if __name__ == "__main__":
    main()
