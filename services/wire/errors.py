"""Domain errors. Services raise them; handlers map them to an `error` frame or an HTTP status in one place.

An error's code is a row of services/wire/codes.py's `Code` table, which gives its HTTP status and whether it is
retryable: the class only picks a default code (and lets callers catch a kind: `except NotFound`).
"""
from services.wire.codes import Code


class ParleyError(Exception):
    code = Code.INTERNAL_ERROR

    def __init__(self, message, *, code=None, **extra):
        super().__init__(message)
        self.message = message
        if code:
            self.code = Code(code)  # a code outside the table is a bug: ValueError here, not a surprise on the wire
        self.extra = extra  # additional machine-readable fields, e.g. retry_after

    @property
    def http_status(self):
        return self.code.status

    @property
    def retryable(self):
        return self.code.retryable

    def to_dict(self):
        body = {"code": self.code, "message": self.message}
        if self.retryable:
            body["retryable"] = True
        body.update(self.extra)
        return body


class BadRequest(ParleyError):
    code = Code.INVALID_REQUEST


class NotFound(ParleyError):
    code = Code.NOT_FOUND


class Busy(ParleyError):
    code = Code.SESSION_BUSY


class Unavailable(ParleyError):
    code = Code.STORE_UNAVAILABLE


class Overloaded(ParleyError):
    code = Code.OVERLOADED


class Unauthorized(ParleyError):
    code = Code.UNAUTHORIZED


class Forbidden(ParleyError):
    code = Code.FORBIDDEN


class Capacity(ParleyError):
    code = Code.CAPACITY


class RateLimited(ParleyError):
    code = Code.RATE_LIMITED


class PayloadTooLarge(ParleyError):
    code = Code.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(ParleyError):
    code = Code.UNSUPPORTED_MEDIA_TYPE


class HostNotAllowed(ParleyError):
    code = Code.HOST_NOT_ALLOWED


class LengthRequired(ParleyError):
    code = Code.LENGTH_REQUIRED


class Conflict(ParleyError):
    code = Code.CONFLICT
