"""What every REST handler shares: services injected through initialize(), JSON in, JSON out, one error map."""
import json
import logging
from typing import Any, NamedTuple

from pymongo.errors import PyMongoError
from tornado import httputil, web

from services.access import guards, untrusted

from services.access.auth import require_admin
from services.access.forwarded import client_address
from services.operations import logs
from services.wire.codes import Code, for_http_status
from services.wire.schema import convert, to_builtins
from services.wire.errors import (BadRequest, Forbidden, LengthRequired, NotFound, ParleyError, PayloadTooLarge,
                             Unavailable)

log = logging.getLogger(__name__)


class Api(NamedTuple):
    """What one REST method declares (the @api decorator): GET /openapi.json is generated from these and the
    modules' route lists (services/wire/schema.py openapi)."""
    summary: str
    body: Any = None       # its request body's Struct (services/wire/schema.py), read by BaseHandler.body()
    status: int = 200      # its success status, answered by BaseHandler.ok()
    admin: bool = False    # admins only: refused in prepare(), before the method runs


def api(summary, *, body=None, status=200, admin=False):
    """Declare a REST method. To add a route: a handler whose methods carry this, and its entry in the module's
    `default_handlers`; the OpenAPI document follows (handlers/api.py serves it)."""
    def declare(method):
        method.api = Api(summary, body, status, admin)
        return method
    return declare

# CORS (--cors-origins): what a page on an allowed origin may send and read.
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
CORS_EXPOSE = "X-Request-Id, X-Parley-Instance, WWW-Authenticate"
CORS_MAX_AGE = "600"


def error_reason(status_code, write_error_kwargs):
    """The reason phrase of an error answer, from Tornado's public API: the HTTPError's own `reason`, else the
    standard phrase of the status (what Tornado keeps in its private `_reason`)."""
    error = write_error_kwargs.get("exc_info", (None, None, None))[1]
    return getattr(error, "reason", None) or httputil.responses.get(status_code, "Unknown")


@web.stream_request_body  # prepare() runs on the headers: Host, origin, credentials and size before any body
class BaseHandler(web.RequestHandler):
    public = False  # True: no credentials needed (health checks, metrics)
    body_types = ("application/json",)  # what a request body may be (handlers/files.py: multipart uploads)

    def body_limit(self):
        """The largest body this route takes (--max-body-size; an upload route: its file's limit)."""
        return self.services.config.max_body_size

    def initialize(self, services):
        self.services = services
        self.identity = None
        self.raw_body = bytearray()  # filled by data_received (stream_request_body)
        self.set_header("X-Parley-Instance", services.instance_id)
        self._cors_headers()

    def _cors_origin(self):
        """The request's Origin when --cors-origins allows it, else None."""
        allowed = self.services.config.cors_origins
        origin = self.request.headers.get("Origin")
        return origin if origin and allowed and ("*" in allowed or origin in allowed) else None

    def _cors_headers(self):
        if not self.services.config.cors_origins:
            return
        self.set_header("Vary", "Origin")  # the answer depends on the Origin: caches must key on it
        if origin := self._cors_origin():
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Expose-Headers", CORS_EXPOSE)

    def options(self, *args, **kwargs):
        """CORS preflight: no credentials needed (browsers send none), answered before any route logic."""
        if self._cors_origin() is None:
            raise Forbidden("this origin may not call the API (see --cors-origins)", code=Code.CORS_FORBIDDEN)
        methods = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                   if getattr(type(self), m.lower()) is not getattr(web.RequestHandler, m.lower())]
        self.set_header("Access-Control-Allow-Methods", ", ".join(methods + ["OPTIONS"]))
        self.set_header("Access-Control-Allow-Headers", CORS_HEADERS)
        self.set_header("Access-Control-Max-Age", CORS_MAX_AGE)
        self.set_status(204)
        self.finish()

    def prepare(self):
        self.request.remote_ip = client_address(self.request, self.services.config.trusted_proxies)
        # Each request runs in its own task: these log fields stay with this request.
        rid = self._request_id = logs.request_id(self.request.headers.get("X-Request-Id"))
        self.set_header("X-Request-Id", rid)
        logs.bind(request_id=rid, pipeline=self.path_kwargs.get("pipeline"), session_id=self.path_kwargs.get("session_id"))
        config = self.services.config
        guards.check_host(self.request, config)
        if not self.public and self.request.method != "OPTIONS":
            self.identity = self.services.auth.identify(self.request)
            if (declared := self.declared()) is not None and declared.admin:
                require_admin(self.identity)
        guards.check_json_body(self.request, self.body_types)
        if "Transfer-Encoding" in self.request.headers:  # so the size is known before the body is read
            raise LengthRequired("send the request body with a Content-Length")
        limit = self.body_limit()
        length = self.request.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        if limit > config.max_body_size:  # the server's own cap is --max-body-size: this route reads more
            self.request.connection.set_max_body_size(limit)

    def check_trusted_origin(self, origin):
        """Tornado's cross_origin_protection asks this for a write that looks cross-origin."""
        config = self.services.config
        allowed = (*config.allowed_origins, *config.cors_origins)
        return "*" in allowed or origin in allowed

    def data_received(self, chunk):
        # Tornado delivers no more than the Content-Length that prepare() accepted.
        self.raw_body += chunk

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        if (services := getattr(self, "services", None)) is not None:  # (Tornado calls this before initialize)
            self.set_header("X-Parley-Instance", services.instance_id)  # which backend answered (behind nginx)
            self._cors_headers()  # an error answer (clear() resets headers) must stay readable cross-origin
            if rid := getattr(self, "_request_id", None):
                self.set_header("X-Request-Id", rid)

    def declared(self):
        """The @api declaration of the method answering this request (None: not part of the REST API)."""
        return getattr(getattr(self, self.request.method.lower(), None), "api", None)

    def ok(self, data, status=None):
        """LangBot's envelope, which Parley keeps for every success. `data` may hold Structs (services/wire/schema.py).
        `status`: the method's declared one unless given."""
        if status is None:
            status = declared.status if (declared := self.declared()) is not None else 200
        self.set_status(status)
        self.finish(json.dumps({"code": 0, "msg": "ok", "data": data}, default=to_builtins))

    def json_body(self):
        if not self.raw_body:
            return {}
        body = untrusted.loads(self.raw_body, what="the request body")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", code=Code.INVALID_JSON)
        return body

    def body(self):
        """The JSON body validated against the method's declared body (@api: a services/wire/schema.py Struct); unknown
        fields dropped."""
        return convert(self.json_body(), self.declared().body)

    def int_arg(self, name, default, *, low, high):
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BadRequest(f"{name} must be an integer", code=Code.INVALID_PARAM) from None
        if not low <= value <= high:
            raise BadRequest(f"{name} must be between {low} and {high}", code=Code.INVALID_PARAM)
        return value

    def log_exception(self, typ, value, tb):
        if isinstance(value, ParleyError):  # an expected answer, not a server fault
            log.debug("%s %s -> %s", self.request.method, self.request.path, value.code)
        elif isinstance(value, PyMongoError):
            log.error("store error on %s %s: %s", self.request.method, self.request.path, value)
        else:
            super().log_exception(typ, value, tb)

    def write_error(self, status_code, **kwargs):
        """Always JSON `{"code", "message"}`: domain errors map to their status here, once; never a traceback."""
        err = kwargs.get("exc_info", (None, None))[1]
        if isinstance(err, PyMongoError):
            err = Unavailable("the message store is unavailable, try again")
        elif status_code == 403 and isinstance(err, web.HTTPError):  # Tornado's cross_origin_protection
            err = Forbidden(f"cross-origin write refused: {err.log_message}", code=Code.CROSS_ORIGIN)
        if isinstance(err, ParleyError):
            self.set_status(err.http_status)
            if err.http_status == 401:  # RFC 6750: say which scheme, and whether a token was sent but refused
                sent = "Authorization" in self.request.headers or "token" in self.request.query_arguments
                self.set_header("WWW-Authenticate", 'Bearer realm="parley"' + (', error="invalid_token"' if sent
                                                                               else ""))
            self.finish(json.dumps(err.to_dict()))
            return
        self.finish(json.dumps({"code": for_http_status(status_code), "message": error_reason(status_code, kwargs)}))


class NotFoundHandler(BaseHandler):
    public = True

    def prepare(self):
        raise NotFound(f"no route for {self.request.path}")
