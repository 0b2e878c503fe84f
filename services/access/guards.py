"""Checks on an HTTP request (REST or WebSocket handshake) before credentials or a body are looked at.

- Host (DNS rebinding): a page on evil.example whose name is re-pointed at 127.0.0.1 reaches a local server with
  `Host: evil.example`. With `--auth none` (or when `--allowed-hosts` is set) only loopback names and the
  allow-list are served: 421 `host_not_allowed`.
- Cross-site writes (CSRF) are refused by Tornado's `cross_origin_protection` (Sec-Fetch-Site / Origin; see
  BaseHandler.check_trusted_origin): 403 `cross_origin`. As a second line, a body must be `application/json`
  (a cross-site form or `text/plain` POST cannot set that without a CORS preflight): 415.
"""
from urllib.parse import urlsplit

from services.access.auth import is_loopback
from services.wire.errors import HostNotAllowed, UnsupportedMediaType

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(host_header):
    try:
        return (urlsplit("//" + host_header).hostname or "").lower()
    except ValueError:
        return ""


def check_host(request, config):
    allowed = config.allowed_hosts
    if config.auth != "none" and not allowed:
        return  # credentials protect the API; a rebinding page has none
    if "*" in allowed:
        return
    name = host_name(request.host or "")
    if is_loopback(name) or name.endswith(".localhost") or name in allowed:
        return
    raise HostNotAllowed(f"this server does not answer to the host name {name!r} (see --allowed-hosts)")


def check_json_body(request, media_types=("application/json",)):
    """A non-empty body must say it is JSON (or, on an upload route, multipart/form-data: those need
    credentials a cross-site form cannot send, and Tornado's cross-origin check)."""
    if request.method in SAFE_METHODS:
        return
    length = request.headers.get("Content-Length", "0")
    if length == "0" and "Transfer-Encoding" not in request.headers:
        return
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media not in media_types:
        raise UnsupportedMediaType(f"a request body must be {' or '.join(media_types)} (Content-Type)")
