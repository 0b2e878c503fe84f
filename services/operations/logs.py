"""Logging: one setup (JSON lines or text), chat context on every line, secrets scrubbed from every line.

Context: `bind(pipeline=..., session_id=..., message_id=..., conn_id=...)` stores the fields in a ContextVar;
`ContextFilter` copies them onto each record of the current task (a task inherits its creator's fields, so the
inbox worker of a connection carries its conn_id, and a generation task binds its own ids). `extra=` on one call
still wins over the bound value.

Scrubbing happens in the formatter, on the final text (tracebacks included): `token=` style query values,
`Bearer` credentials, and every secret registered with `redact()` (API keys read from the environment). Text
with `%` escapes is percent-decoded first (`?%74oken=` is `?token=`), so an encoded name cannot slip through.

JSON lines: one object per line, `time` ISO-8601 UTC with milliseconds (`2026-11-29T06:00:00.123Z`), `level`,
`logger`, `message`, the instance, and the bound context fields.
"""
import contextvars
import datetime
import logging
import re
import sys
import uuid

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("request_id", "pipeline", "session_id", "message_id", "conn_id")
_context = contextvars.ContextVar("parley_log_context", default={})
_secrets = set()
_static = {}  # fields on every line of this process (the instance id)

_QUERY_SECRET = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key|password)=)[^&#\s\"']*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
MASK = "***"


def bind(**fields):
    """Set log context fields for the current task (and the tasks it starts from now on). None removes one."""
    current = dict(_context.get())
    for key, value in fields.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    _context.set(current)


def bind_process(**fields):
    """Fields on every line the process logs from now on, whatever the task (e.g. instance=...)."""
    _static.update({k: v for k, v in fields.items() if v is not None})


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(given=None):
    """A caller's X-Request-Id when it is a sane token (so a proxy's id follows the request), else a new one."""
    return given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


def redact(*values):
    """Never print these strings (e.g. an API key read from the environment)."""
    _secrets.update(v for v in values if v and len(v) >= 4)


_PRINTABLE_ESCAPE = re.compile(r"%(2[1-9A-Fa-f]|[3-6][0-9A-Fa-f]|7[0-9A-Ea-e])")


def _decoded(text):
    """Percent-decode printable ASCII only (a `%0A` stays escaped: decoding must not forge a new log line)."""
    for _ in range(3):  # double-encoded (%2574oken) too; bounded
        if "%" not in text:
            break
        decoded = _PRINTABLE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
        if decoded == text:
            break
        text = decoded
    return text


def scrub(text):
    text = _decoded(text)
    text = _QUERY_SECRET.sub(r"\1" + MASK, text)
    text = _BEARER.sub(r"\1" + MASK, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ContextFilter(logging.Filter):
    def filter(self, record):
        for key, value in _static.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def iso_time(created):
    """ISO-8601, UTC, milliseconds: 2026-11-29T06:00:00.123Z."""
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record, datefmt=None):
        return iso_time(record.created)

    def format(self, record):
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None))
        if context:
            first, sep, rest = line.partition("\n")  # keep a traceback below the line it belongs to
            line = f"{first} [{context}]{sep}{rest}"
        return scrub(line)


class JsonLineFormatter(JsonFormatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})

    def formatTime(self, record, datefmt=None):
        return iso_time(record.created)

    def process_log_record(self, log_data):
        # Scrub each value before serializing: decoding `%22` inside the finished JSON text would break it.
        return _scrub_values(log_data)


def _scrub_values(value):
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_values(v) for v in value]
    return value


def make_handler(fmt="text", stream=None):
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def setup(*, level="info", fmt="text", stream=None):
    """Configure the root logger once (server.main). Returns the handler."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per upstream request is noise
    return handler
