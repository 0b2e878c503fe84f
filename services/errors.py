"""Domain errors. Services raise them; handlers map them to an `error` frame or an HTTP status in one place.

Every code here is listed in docs/protocol.md; clients may rely on them, so never rename one.
"""


class ParleyError(Exception):
    code = "internal_error"
    http_status = 500
    retryable = False

    def __init__(self, message, *, code=None, **extra):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.extra = extra  # additional machine-readable fields, e.g. retry_after

    def to_dict(self):
        body = {"code": self.code, "message": self.message}
        if self.retryable:
            body["retryable"] = True
        body.update(self.extra)
        return body


class BadRequest(ParleyError):
    code = "invalid_request"
    http_status = 400


class NotFound(ParleyError):
    code = "not_found"
    http_status = 404


class Busy(ParleyError):
    code = "session_busy"
    http_status = 429
    retryable = True


class Unavailable(ParleyError):
    code = "store_unavailable"
    http_status = 503
    retryable = True


class Overloaded(ParleyError):
    code = "overloaded"
    http_status = 503
    retryable = True


class Unauthorized(ParleyError):
    code = "unauthorized"
    http_status = 401


class Forbidden(ParleyError):
    code = "forbidden"
    http_status = 403


class Conflict(ParleyError):
    code = "conflict"
    http_status = 409


class Capacity(ParleyError):
    code = "capacity"
    http_status = 503
    retryable = True


class RateLimited(ParleyError):
    code = "rate_limited"
    http_status = 429
    retryable = True


class PayloadTooLarge(ParleyError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ParleyError):
    code = "unsupported_media_type"
    http_status = 415


class HostNotAllowed(ParleyError):
    code = "host_not_allowed"
    http_status = 421


class LengthRequired(ParleyError):
    code = "length_required"
    http_status = 411
