"""The protocol's codes, one table each: error codes, reply error codes, close codes, reply statuses.

Everything else asks these tables: services/wire/errors.py's exceptions take their HTTP status and `retryable` from
their code, metrics their label values, handlers/ws.py its close codes; the web app and parley.js read
static/protocol.js, generated from here by `python -m services.wire.schema`; a test compares docs/protocol.md's tables
with them. Clients rely on every value: never rename one.

To add an error code: a row of `Code` (or `ReplyCode`) and a row in docs/protocol.md's table; raise it with
`BadRequest("…", code=Code.NEW_CODE)` (any ParleyError: the status comes from the row).
"""
from enum import IntEnum, StrEnum


class Code(StrEnum):
    """Request errors: an `error` frame's `code`, or a REST error body's. A member is its code (a str) and carries
    `status` (HTTP), `retryable` (the same request may succeed later: `"retryable": true` on the wire), `rest`
    (False: WebSocket only; its status then only picks the close code at connect) and `langbot` (a plain LangBot
    client, one that sends only LangBot's frames, may get it: a refused connect, a frame it cannot parse, a
    refused message, a stop; the others answer Parley's own frames and REST only)."""

    def __new__(cls, code, status, retryable, rest, langbot):
        member = str.__new__(cls, code)
        member._value_ = code
        member.status, member.retryable, member.rest, member.langbot = status, retryable, rest, langbot
        return member

    #                        code                      HTTP  retryable  REST   LangBot
    UNAUTHORIZED =          ("unauthorized",           401,  False,     True,  True)
    FORBIDDEN =             ("forbidden",              403,  False,     True,  False)
    INVALID_JSON =          ("invalid_json",           400,  False,     True,  True)
    CORS_FORBIDDEN =        ("cors_forbidden",         403,  False,     True,  False)
    INVALID_CURSOR =        ("invalid_cursor",         400,  False,     True,  False)
    INVALID_FRAME =         ("invalid_frame",          400,  False,     False, True)
    UNKNOWN_TYPE =          ("unknown_type",           400,  False,     False, True)
    INVALID_MESSAGE =       ("invalid_message",        400,  False,     True,  True)
    UNSUPPORTED_COMPONENT = ("unsupported_component",  400,  False,     True,  True)
    MESSAGE_TOO_LONG =      ("message_too_long",       400,  False,     True,  True)
    INVALID_IMAGE =         ("invalid_image",          400,  False,     True,  True)
    IMAGE_TOO_LARGE =       ("image_too_large",        413,  False,     True,  True)
    FILE_TOO_LARGE =        ("file_too_large",         413,  False,     True,  True)
    INVALID_FILE =          ("invalid_file",           400,  False,     True,  True)
    UNSUPPORTED_FILE_TYPE = ("unsupported_file_type",  400,  False,     True,  True)
    QUOTA_EXCEEDED =        ("quota_exceeded",         413,  False,     True,  True)
    BOT_NOT_FOUND =         ("bot_not_found",          404,  False,     True,  True)
    VISITOR_REQUIRED =      ("visitor_required",       401,  False,     True,  True)
    HUMAN_CHECK_REQUIRED =  ("human_check_required",   401,  False,     True,  True)
    HUMAN_CHECK_FAILED =    ("human_check_failed",     403,  False,     True,  True)
    HUMAN_CHECK_UNAVAILABLE = ("human_check_unavailable", 503, True,    True,  True)
    FILE_NOT_FOUND =        ("file_not_found",         404,  False,     True,  True)
    INVALID_REQUEST =       ("invalid_request",        400,  False,     True,  False)
    INVALID_PARAM =         ("invalid_param",          400,  False,     True,  True)
    INVALID_SESSION_TYPE =  ("invalid_session_type",   400,  False,     True,  True)
    PIPELINE_NOT_FOUND =    ("pipeline_not_found",     404,  False,     True,  True)
    SESSION_NOT_FOUND =     ("session_not_found",      404,  False,     True,  True)
    MESSAGE_NOT_FOUND =     ("message_not_found",      404,  False,     True,  False)
    INVALID_OFFSET =        ("invalid_offset",         400,  False,     False, False)
    SESSION_BUSY =          ("session_busy",           429,  True,      True,  True)
    RATE_LIMITED =          ("rate_limited",           429,  True,      True,  True)
    CAPACITY =              ("capacity",               503,  True,      False, True)
    DRAINING =              ("draining",               503,  True,      True,  True)
    NOT_READY =             ("not_ready",              503,  False,     True,  False)
    STORE_UNAVAILABLE =     ("store_unavailable",      503,  True,      True,  True)
    OVERLOADED =            ("overloaded",             503,  True,      True,  True)
    NOT_FOUND =             ("not_found",              404,  False,     True,  False)
    CONFLICT =              ("conflict",               409,  False,     True,  False)
    NOT_LATEST_REPLY =      ("not_latest_reply",       409,  False,     True,  False)
    REPLY_LIVE =            ("reply_live",             409,  False,     True,  False)
    TOO_MANY_MEMBERS =      ("too_many_members",       400,  False,     True,  False)
    TOO_MANY_SESSIONS =     ("too_many_sessions",      400,  False,     False, False)
    CROSS_ORIGIN =          ("cross_origin",           403,  False,     True,  False)
    HOST_NOT_ALLOWED =      ("host_not_allowed",       421,  False,     True,  True)
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, False,     True,  False)
    LENGTH_REQUIRED =       ("length_required",        411,  False,     True,  False)
    PAYLOAD_TOO_LARGE =     ("payload_too_large",      413,  False,     True,  False)
    METHOD_NOT_ALLOWED =    ("method_not_allowed",     405,  False,     True,  False)
    INTERNAL_ERROR =        ("internal_error",         500,  False,     True,  True)


class ReplyStatus(StrEnum):
    """A reply's status (stored, and on `status`, `response`, `resumed` and `connected` frames). `live`: it may
    still change (queued: waiting its turn; streaming: generating); the others are terminal, reached once."""

    def __new__(cls, status, live):
        member = str.__new__(cls, status)
        member._value_ = status
        member.live = live
        return member

    QUEUED = "queued", True
    STREAMING = "streaming", True
    COMPLETED = "completed", False
    STOPPED = "stopped", False
    FAILED = "failed", False
    TIMEOUT = "timeout", False
    INTERRUPTED = "interrupted", False


LIVE = tuple(s for s in ReplyStatus if s.live)
TERMINAL = tuple(s for s in ReplyStatus if not s.live)


class ReplyCode(StrEnum):
    """Reply errors: `error.code` of a reply that ended `failed`, `timeout` or `interrupted` (its final frame,
    and the stored message). A member carries the `status` the reply ends with."""

    def __new__(cls, code, status):
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        return member

    FIRST_TOKEN_TIMEOUT = "first_token_timeout", ReplyStatus.TIMEOUT
    STALL_TIMEOUT = "stall_timeout", ReplyStatus.TIMEOUT
    TOTAL_TIMEOUT = "total_timeout", ReplyStatus.TIMEOUT
    EMPTY_COMPLETION = "empty_completion", ReplyStatus.FAILED
    MISSING_API_KEY = "missing_api_key", ReplyStatus.FAILED
    UPSTREAM_UNAUTHORIZED = "upstream_unauthorized", ReplyStatus.FAILED
    UPSTREAM_MODEL_NOT_FOUND = "upstream_model_not_found", ReplyStatus.FAILED
    UPSTREAM_BAD_REQUEST = "upstream_bad_request", ReplyStatus.FAILED
    UPSTREAM_RATE_LIMITED = "upstream_rate_limited", ReplyStatus.FAILED
    UPSTREAM_ERROR = "upstream_error", ReplyStatus.FAILED
    UPSTREAM_UNREACHABLE = "upstream_unreachable", ReplyStatus.FAILED
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error", ReplyStatus.FAILED
    INTERNAL_ERROR = "internal_error", ReplyStatus.FAILED
    INSTANCE_LOST = "instance_lost", ReplyStatus.INTERRUPTED
    CONTINUATION_REFUSED = "continuation_refused", ReplyStatus.INTERRUPTED


class RewindReason(StrEnum):
    """Why a `rewind` takes text back (docs/protocol.md): it was streamed after the reply's last stored point by an
    instance that was then lost (another took the reply over, or it ended `interrupted`), or that was paused past
    its lease and fenced."""
    INSTANCE_LOST = "instance_lost"
    FENCED = "fenced"


class Close(IntEnum):
    """WebSocket close codes the server sends. A member carries `reason` (the close frame's reason, when it is
    always the same), `disconnect` (its parley_ws_disconnects_total reason) and `retry` (a client should
    reconnect and `resume`; False: not until something changes: credentials, parameters, or it closed itself)."""

    def __new__(cls, code, reason, disconnect, retry):
        member = int.__new__(cls, code)
        member._value_ = code
        member.reason, member.disconnect, member.retry = reason, disconnect, retry
        return member

    #                   code  reason                disconnect     retry
    NORMAL =           (1000, "client disconnect",  None,          False)
    GOING_AWAY =       (1001, None,                 "shutdown",    True)
    MESSAGE_TOO_BIG =  (1009, "message_too_big",    "oversize",    True)
    UNAVAILABLE =      (1011, None,                 "unavailable", True)
    RESTARTING =       (1012, "server restarting",  "shutdown",    True)
    CAPACITY =         (1013, None,                 "capacity",    True)
    SLOW_CONSUMER =    (4008, "slow_consumer",      "slow",        True)
    INVALID =          (4400, None,                 "invalid",     False)
    UNAUTHORIZED =     (4401, None,                 "auth",        False)
    FORBIDDEN =        (4403, None,                 "auth",        False)
    NOT_FOUND =        (4404, None,                 "invalid",     False)


TOKEN_EXPIRED = "token_expired"  # the reason of `reconnect`, then of the close (4401), when a JWT's `exp` passes
PING_TIMEOUT = "ping_timeout"  # the close reason (1011) of a peer that left a ping unanswered: its own disconnect
                               # reason too (the peer never sees it)

# A refused connect closes with the close code of its error's HTTP status (capacity: its own).
CLOSE_FOR_STATUS = {400: Close.INVALID, 401: Close.UNAUTHORIZED, 403: Close.FORBIDDEN, 404: Close.NOT_FOUND,
                    503: Close.UNAVAILABLE}
CLOSE_FOR_CODE = {Code.CAPACITY: Close.CAPACITY}


def for_http_status(status):
    """The code answering an HTTP error Tornado raised itself (a bad request line, a method the route lacks...)."""
    return {400: Code.INVALID_REQUEST, 404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(
        status, Code.INTERNAL_ERROR if status >= 500 else Code.INVALID_REQUEST)
