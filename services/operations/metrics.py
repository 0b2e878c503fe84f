"""Prometheus metrics: one Metrics object per app, owning its own CollectorRegistry (docs/operations.md).

Names follow `parley_<noun>_<verb>_<unit>`. Every label value is created at start-up from a closed list (pipeline
ids from the configuration, statuses, codes), so a dashboard sees zeros instead of gaps and no label can grow
with traffic: never a user, session, message or connection id. Codes outside a list are counted as `other`; a
pipeline that is not configured gets no series at all (nothing is recorded for it). Store operations are the
exception to pre-creation: an operation's latency series appear when it first runs (27 operations x buckets
would be most of an idle server's series). `_created` series are off: an idle server with one pipeline exports
a few hundred series (docs/operations.md; tests/test_metrics.py keeps the count).

Services record through small methods here (`generation_finished(gen)`, ...) so the instrumented code stays one
line per event. Times are `time.monotonic()` seconds, the clock of the asyncio loop.
"""
import functools
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from pymongo.errors import DuplicateKeyError

from services.wire import events, schema
from services.wire.codes import LIVE, PING_TIMEOUT, TERMINAL, Close, ReplyCode, ReplyStatus
from services.wire.errors import ParleyError

# label values from the tables they count (services/wire/codes.py, services/wire/schema.py), plus what a value outside
# them counts as
GENERATION_STATES = LIVE
PROVIDER_ERRORS = (*(c for c in ReplyCode if c.status in (ReplyStatus.FAILED, ReplyStatus.TIMEOUT)), "other")
# frame types, as services/wire/schema.py declares them (plus what a frame that is none of them counts as)
CLIENT_FRAMES = (*schema.CLIENT_TYPES, "unknown", "invalid")
SERVER_FRAMES = (*schema.SERVER_TYPES, "other")
CLOSE_REASONS = ("client", "server", "lost")
# Server-initiated disconnects: each close code's (services/wire/codes.py Close), a ping timeout's, else other.
DISCONNECT_REASONS = (*dict.fromkeys(c.disconnect for c in Close if c.disconnect), PING_TIMEOUT, "other")
STOP_OUTCOMES = ("local", "forwarded", "noop")
RESUME_SOURCES = ("live", "store", "finished")
# services/cluster/failover.py: why a reply changed hands, and what became of it
HANDOVER_REASONS = ("instance_lost", "drain")
HANDOVER_OUTCOMES = ("continued", "adopted", "stopped", "interrupted")
# the events a cluster bus carries (services/wire/events.py; only --cluster writes or reads any)
BUS_EVENTS = (*events.CROSSING, "other")
STREAMED_KINDS = ("text", "thinking")
TOKEN_KINDS = ("prompt", "completion")
FILE_KINDS = ("image", "document")
FILE_SOURCES = ("upload", "inline")   # a multipart upload, or base64 in a message (stored as a file)
FILE_ACCESS = ("member", "link")      # read with credentials (owner, member, admin), or by a signed link
RATINGS = ("like", "dislike", "cancel")
VISITOR_LIMITS = ("connections", "messages", "sessions", "capacity", "human_check")

disable_created_metrics()  # a `_created` twin for every counter and histogram doubles the series for no query

# Store methods decorated with @timed register their operation name here at import, so their label values
# exist before the first query.
STORE_OPERATIONS = []

# Seconds. Time to first token and store latency live mostly under a second; generations run for tens of seconds.
FAST_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
STORE_BUCKETS = (.001, .005, .025, .1, .5, 2.5)
SLOW_BUCKETS = (.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, pipeline_ids=()):
        self.registry = r = _Registry(self.flush)
        self._pending_sent = {}     # frame type -> frames sent since the last flush (the per-viewer path)
        self._pending_bytes = 0
        self._pending_encoded = 0
        self.pipelines = set(pipeline_ids)
        self._pending_streamed = {pid: [0, 0] for pid in self.pipelines}  # characters: text, thinking (per chunk)
        p = ("pipeline",)

        self.connections_open = Gauge("parley_connections_open", "WebSocket connections open now", p, registry=r)
        self.connections_opened = Counter("parley_connections_opened", "WebSocket connections accepted", p,
                                          registry=r)
        self.connections_closed = Counter(
            "parley_connections_closed", "WebSocket connections ended, by who ended them "
            "(client: close frame from the client; server: Parley closed it; lost: no close frame)",
            ("pipeline", "reason"), registry=r)
        self.connection_duration = Histogram("parley_connection_duration_seconds", "Lifetime of a connection",
                                             p, buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
                                             registry=r)
        self.frames_received = Counter("parley_ws_frames_received", "WebSocket frames from clients, by type",
                                       ("type",), registry=r)
        self.frames_sent = Counter("parley_ws_frames_sent", "WebSocket frames to clients, by type", ("type",),
                                   registry=r)
        self.bytes_sent = Counter("parley_ws_sent_bytes", "UTF-8 bytes of WebSocket frames sent", registry=r)
        self.disconnects = Counter("parley_ws_disconnects", "Connections closed or refused by the server, by reason",
                                   ("reason",), registry=r)

        self.generations_started = Counter("parley_generations_started", "Replies accepted (queued)", p,
                                           registry=r)
        self.generations_finished = Counter("parley_generations_finished", "Replies ended, by terminal status",
                                            ("pipeline", "status"), registry=r)
        self.generations_active = Gauge("parley_generations_active", "Replies queued or streaming now",
                                        ("pipeline", "state"), registry=r)
        self.queue_wait = Histogram("parley_generation_queue_wait_seconds",
                                    "From accepted to streaming (waiting behind earlier replies of the session)",
                                    p, buckets=FAST_BUCKETS + (30, 60), registry=r)
        self.first_token = Histogram("parley_generation_first_token_seconds",
                                     "From streaming start to the first text or thinking character", p,
                                     buckets=FAST_BUCKETS + (30,), registry=r)
        self.generation_duration = Histogram("parley_generation_duration_seconds",
                                             "From streaming start to the terminal state", ("pipeline", "status"),
                                             buckets=SLOW_BUCKETS, registry=r)
        self.streamed_chars = Counter("parley_generation_streamed_characters",
                                      "Characters streamed to viewers (code points), text or thinking",
                                      ("pipeline", "kind"), registry=r)
        self.tokens = Counter("parley_generation_tokens", "Tokens the provider reported in its usage",
                              ("pipeline", "kind"), registry=r)
        self.provider_errors = Counter("parley_provider_errors", "Replies that failed or timed out, by code",
                                       ("pipeline", "code"), registry=r)
        self.sessions_busy = Counter("parley_sessions_busy_rejections",
                                     "Messages refused with session_busy (too many replies waiting)", p,
                                     registry=r)

        self.stop_requests = Counter("parley_stop_requests", "Stop requests, by where they were carried out "
                                     "(local: here; forwarded: to another instance; noop: nothing to stop)",
                                     ("outcome",), registry=r)
        self.stop_latency = Histogram("parley_stop_latency_seconds",
                                      "From a stop request to the stopped reply's terminal frame", p,
                                      buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                      registry=r)
        self.resumes = Counter("parley_resumes", "Resume requests served, by where the text came from",
                               ("pipeline", "source"), registry=r)
        self.resume_replayed = Counter("parley_resume_replayed_characters",
                                       "Characters re-sent to resuming clients", p, registry=r)

        self.store_duration = Histogram("parley_store_operation_duration_seconds",
                                        "MongoDB operations (services/storage/store.py methods)", ("operation",),
                                        buckets=STORE_BUCKETS, registry=r)
        self.store_errors = Counter("parley_store_operation_errors", "MongoDB operations that raised",
                                    ("operation",), registry=r)
        self.checkpoint_lag = Histogram("parley_checkpoint_lag_seconds",
                                        "Age of the oldest streamed character not yet in MongoDB, when its "
                                        "checkpoint lands", p, buckets=FAST_BUCKETS, registry=r)
        self.frames_encoded = Counter("parley_frames_encoded", "Distinct frames the fan-out JSON-encoded (each "
                                      "written to every connection that gets the same bytes)", registry=r)
        self.bus_published = Counter("parley_bus_events_published", "Cluster bus events sent", ("event",),
                                     registry=r)
        self.bus_received = Counter("parley_bus_events_received", "Cluster bus events received from other "
                                    "instances", ("event",), registry=r)
        self.bus_lag = Histogram("parley_bus_lag_seconds", "From publish on one instance to receipt on another",
                                 ("event",), buckets=FAST_BUCKETS, registry=r)
        self.continuations = Counter("parley_failover_replies", "Live replies of a lost or draining instance taken "
                                     "up here, by why and by what became of them (continued here, adopted while "
                                     "queued, ended stopped or interrupted)", ("reason", "outcome"), registry=r)
        self.handover_seconds = Histogram("parley_failover_first_token_seconds", "From taking a reply over to its "
                                          "first continued token", registry=r,
                                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30))
        self.rewound = Counter("parley_rewound_characters", "Characters viewers here were sent and then told to "
                               "drop (streamed after the last checkpoint of an instance that was lost)", registry=r)
        self.fenced_writes = Counter("parley_fenced_writes_refused", "Checkpoint or final writes the store refused "
                                     "because another instance had ended the reply (stale owner)", registry=r)
        self.store_batch = Histogram("parley_store_batch_size", "Writes gathered into one bulk write (group "
                                     "commit, services/storage/batching.py), by operation", ("operation",),
                                     buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500), registry=r)
        self.followed_replies = Gauge("parley_followed_replies", "Replies generating on another instance that "
                                      "connections here view (their deltas cross the bus)", registry=r)

        self.files_stored = Counter("parley_files_stored", "Files stored (each once: the same bytes of one owner "
                                    "again are the same file), by kind and how they came", ("kind", "source"),
                                    registry=r)
        self.file_bytes = Counter("parley_files_stored_bytes", "Bytes of the files stored", ("kind",), registry=r)
        self.files_served = Counter("parley_files_served", "File downloads answered, by kind and access",
                                    ("kind", "access"), registry=r)

        self.feedback_given = Counter("parley_embed_feedback", "Widget ratings of replies, by pipeline, rating and "
                                      "whether it could be stored with its reply (LangBot's widget names no "
                                      "visitor when it rates: counted only)", ("pipeline", "rating", "stored"),
                                      registry=r)
        self.visitors_refused = Counter("parley_visitors_refused", "Widget visitors refused by a limit (a reply "
                                        "saying why)", ("limit",), registry=r)
        self.visitor_sessions_forgotten = Counter("parley_visitor_sessions_expired", "Widget conversations "
                                                  "forgotten after --visitor-session-ttl unused", registry=r)

        self.http_duration = Histogram("parley_http_request_duration_seconds",
                                       "HTTP requests (WebSocket upgrades included), by handler class and status",
                                       ("handler", "status"), buckets=FAST_BUCKETS, registry=r)

        self._create_label_values()
        # Children bound once for the per-frame and per-chunk paths.
        self._sent = {kind: self.frames_sent.labels(kind) for kind in SERVER_FRAMES}
        self._received = {kind: self.frames_received.labels(kind) for kind in CLIENT_FRAMES}
        self._streamed = {pid: tuple(self.streamed_chars.labels(pid, kind) for kind in STREAMED_KINDS)
                          for pid in self.pipelines}

    def _create_label_values(self):
        for pid in self.pipelines:
            for m in (self.connections_open, self.connections_opened, self.connection_duration,
                      self.generations_started, self.queue_wait, self.first_token, self.sessions_busy,
                      self.stop_latency, self.resume_replayed, self.checkpoint_lag):
                m.labels(pid)
            for reason in CLOSE_REASONS:
                self.connections_closed.labels(pid, reason)
            for status in TERMINAL:
                self.generations_finished.labels(pid, status)
                self.generation_duration.labels(pid, status)
            for state in GENERATION_STATES:
                self.generations_active.labels(pid, state)
            for kind in STREAMED_KINDS:
                self.streamed_chars.labels(pid, kind)
            for kind in TOKEN_KINDS:
                self.tokens.labels(pid, kind)
            for code in PROVIDER_ERRORS:
                self.provider_errors.labels(pid, code)
            for source in RESUME_SOURCES:
                self.resumes.labels(pid, source)
        for kind in CLIENT_FRAMES:
            self.frames_received.labels(kind)
        for kind in SERVER_FRAMES:
            self.frames_sent.labels(kind)
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(reason)
        for outcome in STOP_OUTCOMES:
            self.stop_requests.labels(outcome)
        # (parley_failover_replies_total's 8 series appear with the first failover: rare, and an idle server's
        # series are kept under a budget, tests/test_metrics.py)
        for event in BUS_EVENTS:
            self.bus_published.labels(event)
            self.bus_received.labels(event)
        for op in STORE_OPERATIONS:
            self.store_errors.labels(op)
        for pid in self.pipelines:
            for rating in RATINGS:
                for stored in ("true", "false"):
                    self.feedback_given.labels(pid, rating, stored)
        for limit in VISITOR_LIMITS:
            self.visitors_refused.labels(limit)
        for kind in FILE_KINDS:
            self.file_bytes.labels(kind)
            for source in FILE_SOURCES:
                self.files_stored.labels(kind, source)
            for access in FILE_ACCESS:
                self.files_served.labels(kind, access)

    def pipeline(self, pipeline_id):
        """The label for a configured pipeline; None (record nothing) for any other."""
        return pipeline_id if pipeline_id in self.pipelines else None

    # connections (handlers/ws.py, services/delivery/hub.py)

    def connection_opened(self, conn):
        pid = self.pipeline(conn.pipeline)
        if pid is None:
            return
        self.connections_opened.labels(pid).inc()
        self.connections_open.labels(pid).inc()

    def connection_closed(self, conn, reason):
        pid = self.pipeline(conn.pipeline)
        if pid is None:
            return
        self.connections_open.labels(pid).dec()
        self.connections_closed.labels(pid, _known(reason, CLOSE_REASONS, "lost")).inc()
        self.connection_duration.labels(pid).observe(time.time() - conn.created_at)

    def frame_received(self, kind):
        self._received.get(kind, self._received["unknown"]).inc()

    def frame_encoded(self):
        self._pending_encoded += 1

    def frame_sent(self, kind, size):
        # Once per frame per viewer: counted in plain ints, added to the counters when they are read (flush).
        # `kind`: the frame's Struct class (its `type` is looked up then) or its type.
        pending = self._pending_sent
        pending[kind] = pending.get(kind, 0) + 1
        self._pending_bytes += size

    def flush(self):
        """Add the per-frame counts kept since the last read to their counters (the registry calls this)."""
        pending, self._pending_sent = self._pending_sent, {}
        for kind, n in pending.items():
            self._sent.get(schema.TYPE_OF.get(kind, kind), self._sent["other"]).inc(n)
        if self._pending_bytes:
            self.bytes_sent.inc(self._pending_bytes)
            self._pending_bytes = 0
        if self._pending_encoded:
            self.frames_encoded.inc(self._pending_encoded)
            self._pending_encoded = 0
        for pid, counts in self._pending_streamed.items():
            for child, i in zip(self._streamed[pid], (0, 1)):
                if counts[i]:
                    child.inc(counts[i])
                    counts[i] = 0

    def file_stored(self, kind, source, size):
        self.files_stored.labels(kind, source).inc()
        self.file_bytes.labels(kind).inc(size)

    def feedback(self, pipeline_id, rating, stored):
        pid = self.pipeline(pipeline_id)
        if pid is not None:
            self.feedback_given.labels(pid, rating, "true" if stored else "false").inc()

    def visitor_refused(self, limit):
        self.visitors_refused.labels(_known(limit, VISITOR_LIMITS, "capacity")).inc()

    def visitor_sessions_expired(self, count):
        self.visitor_sessions_forgotten.inc(count)

    def file_served(self, kind, access):
        self.files_served.labels(kind, access).inc()

    def disconnected(self, reason):
        self.disconnects.labels(_known(reason, DISCONNECT_REASONS, "other")).inc()

    # generations (services/replies/streams.py)

    def generation_accepted(self, gen):
        pid = self.pipeline(gen.pipeline_id)
        if pid is None:
            return
        self.generations_started.labels(pid).inc()
        self.generations_active.labels(pid, "queued").inc()

    def generation_streaming(self, gen):
        pid = self.pipeline(gen.pipeline_id)
        gen.started_at = time.monotonic()
        if pid is None:
            return
        self.generations_active.labels(pid, "queued").dec()
        self.generations_active.labels(pid, "streaming").inc()
        self.queue_wait.labels(pid).observe(gen.started_at - gen.accepted_at)

    def streamed(self, gen, text, thinking):
        # Once per chunk: counted in plain ints, added to the counter when it is read (flush).
        counts = self._pending_streamed.get(gen.pipeline_id)  # None: not a configured pipeline
        if gen.first_token_at is None and gen.started_at is not None:
            gen.first_token_at = time.monotonic()
            if gen.taken_over_at is not None:
                self.handover_seconds.observe(gen.first_token_at - gen.taken_over_at)
            if counts is None:
                return
            self.first_token.labels(gen.pipeline_id).observe(gen.first_token_at - gen.started_at)
        if counts is None:
            return
        counts[0] += len(text)
        counts[1] += len(thinking)

    def generation_finished(self, gen):
        """After the terminal frame went out: the status is final."""
        pid = self.pipeline(gen.pipeline_id)
        if pid is None:
            return
        now = time.monotonic()
        state = "queued" if gen.started_at is None else "streaming"
        self.generations_active.labels(pid, state).dec()
        status = _known(gen.status, TERMINAL, "failed")
        self.generations_finished.labels(pid, status).inc()
        if gen.started_at is not None:
            self.generation_duration.labels(pid, status).observe(now - gen.started_at)
        if gen.error and status in (ReplyStatus.FAILED, ReplyStatus.TIMEOUT):
            self.provider_errors.labels(pid, _known(gen.error.get("code"), PROVIDER_ERRORS, "other")).inc()
        for kind in TOKEN_KINDS:
            count = (gen.usage or {}).get(f"{kind}_tokens")
            if isinstance(count, int) and count > 0:
                self.tokens.labels(pid, kind).inc(count)
        if gen.stop_requested_at is not None and status == "stopped":
            self.stop_latency.labels(pid).observe(now - gen.stop_requested_at)

    def session_busy(self, pipeline_id):
        if (pid := self.pipeline(pipeline_id)) is not None:
            self.sessions_busy.labels(pid).inc()

    def stop_requested(self, outcome, count=1):
        self.stop_requests.labels(_known(outcome, STOP_OUTCOMES, "noop")).inc(count)

    def checkpointed(self, gen, dirty_since):
        if (pid := self.pipeline(gen.pipeline_id)) is not None:
            self.checkpoint_lag.labels(pid).observe(time.monotonic() - dirty_since)

    # resume and the cluster bus: recorded by the code those issues add

    def resumed(self, pipeline_id, source, replayed_chars):
        pid = self.pipeline(pipeline_id)
        if pid is None:
            return
        self.resumes.labels(pid, _known(source, RESUME_SOURCES, "live")).inc()
        self.resume_replayed.labels(pid).inc(replayed_chars)

    def bus_event_published(self, event):
        self.bus_published.labels(_known(event, BUS_EVENTS, "other")).inc()

    def store_batched(self, operation, size):
        self.store_batch.labels(operation).observe(size)

    def continuation(self, reason, outcome):
        self.continuations.labels(_known(reason, HANDOVER_REASONS, "instance_lost"),
                                  _known(outcome, HANDOVER_OUTCOMES, "interrupted")).inc()

    def fenced_write_refused(self):
        self.fenced_writes.inc()

    def bus_event_received(self, event, lag_seconds):
        event = _known(event, BUS_EVENTS, "other")
        self.bus_received.labels(event).inc()
        self.bus_lag.labels(event).observe(max(0.0, lag_seconds))

    # HTTP (handlers/ops.py log_function)

    def http_request(self, handler_name, status, seconds):
        self.http_duration.labels(handler_name, str(status)).observe(seconds)


def _known(value, allowed, fallback):
    return value if value in allowed else fallback


class _Registry(CollectorRegistry):
    """A registry that first has the per-frame counts kept in plain ints added to their counters: whoever reads
    it (/metrics, a test) sees every frame sent so far, and sending one costs no lock."""

    def __init__(self, flush):
        super().__init__()
        self._flush = flush

    def collect(self):
        self._flush()
        return super().collect()


def timed(method):
    """Decorate an async Store method: its latency (and failures) go to parley_store_operation_*{operation}.

    The instance needs a `metrics` attribute; the operation label is the method name.
    """
    name = method.__name__
    STORE_OPERATIONS.append(name)

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        start = time.monotonic()
        try:
            return await method(self, *args, **kwargs)
        except (DuplicateKeyError, ParleyError):  # expected answers (not found, idempotency), not faults
            raise
        except Exception:
            self.metrics.store_errors.labels(name).inc()
            raise
        finally:
            self.metrics.store_duration.labels(name).observe(time.monotonic() - start)

    return wrapper

