"""Logging: one setup (JSON lines or text), chat context on every line, secrets scrubbed from every line.

Context: `bind(pipeline=..., session_id=..., message_id=..., conn_id=...)` stores the fields in a ContextVar;
`ContextFilter` copies them onto each record of the current task (a task inherits its creator's fields, so the
inbox worker of a connection carries its conn_id, and a generation task binds its own ids). `extra=` on one call
still wins over the bound value.

Scrubbing happens in the formatter, on the final text (tracebacks included): `token=` style query values,
`Bearer` credentials, and every secret registered with `redact()` (API keys read from the environment).
"""
import contextvars
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("pipeline", "session_id", "message_id", "conn_id")
_context = contextvars.ContextVar("parley_log_context", default={})
_secrets = set()

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


def redact(*values):
    """Never print these strings (e.g. an API key read from the environment)."""
    _secrets.update(v for v in values if v and len(v) >= 4)


def scrub(text):
    text = _QUERY_SECRET.sub(r"\1" + MASK, text)
    text = _BEARER.sub(r"\1" + MASK, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class ContextFilter(logging.Filter):
    def filter(self, record):
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

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

    def format(self, record):
        return scrub(super().format(record))


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
