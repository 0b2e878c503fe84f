"""The browser app: `GET /` (for a browser) and `/static/*`, outside the JSON API's base handler.

A browser (Accept names text/html and not application/json) gets static/index.html; every other client keeps
the JSON of handlers/api.py RootHandler on the same URL. The page needs no credentials: its script takes the
token from `?token=` (or a sign-in form), moves it out of the address bar and keeps it in sessionStorage.
Every answer carries a strict Content-Security-Policy: scripts and styles only from files of this origin,
connections only to this origin (HTTP and WebSocket).
"""
import os
import re

from tornado import routing, web

from handlers.base import error_reason
from parley import resource
from services.wire.codes import for_http_status

STATIC_DIR = str(resource("static"))
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
_ASSET = re.compile(r'(src|href)="/static/([^"?#]+)"')


def check_frame_ancestors(value):
    """--frame-ancestors goes into a header: CSP source expressions only, no second directive."""
    if not value or re.search(r"[;,\r\n\x00-\x1f]", value):
        raise ValueError("--frame-ancestors: expected CSP sources separated by spaces, e.g. 'self' "
                         f"https://portal.example (got {value!r})")


def content_security_policy(host, frame_ancestors):
    # 'self' covers ws(s): of this origin in CSP 3; older engines need it spelled out. A Host header that is
    # not a plain host[:port] is left out rather than copied into the header.
    sockets = f" ws://{host} wss://{host}" if _HOST.match(host or "") else ""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"font-src 'self'; connect-src 'self'{sockets}; manifest-src 'self'; base-uri 'none'; "
            f"form-action 'self'; frame-ancestors {frame_ancestors}")


def security_headers(handler):
    handler.set_header("Content-Security-Policy", content_security_policy(
        handler.request.host, handler.settings.get("frame_ancestors") or "'none'"))
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("Referrer-Policy", "no-referrer")  # the first request may carry ?token=
    handler.set_header("Cross-Origin-Opener-Policy", "same-origin")


class BrowserRoot(routing.Matcher):
    """Matches `/` when the client asks for HTML rather than JSON."""

    def match(self, request):
        if request.path != "/":
            return None
        accept = request.headers.get("Accept", "").lower()
        if "text/html" in accept and "application/json" not in accept:
            return {}
        return None


class IndexHandler(web.RequestHandler):
    _page = None  # (mtime, html)

    def set_default_headers(self):
        security_headers(self)
        self.set_header("Cache-Control", "no-cache")

    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(self.page())

    @classmethod
    def page(cls):
        """index.html with a content hash on each asset URL, so assets can be cached for good."""
        path = os.path.join(STATIC_DIR, "index.html")
        mtime = os.path.getmtime(path)
        if cls._page is None or cls._page[0] != mtime:
            with open(path, encoding="utf-8") as f:
                html = f.read()
            settings = {"static_path": STATIC_DIR}

            def versioned(m):
                version = web.StaticFileHandler.get_version(settings, m.group(2))
                return f'{m.group(1)}="/static/{m.group(2)}?v={version}"' if version else m.group(0)
            cls._page = (mtime, _ASSET.sub(versioned, html))
        return cls._page[1]


class StaticHandler(web.StaticFileHandler):
    """Tornado's file handler (ETag, If-None-Match, Range); a versioned URL (?v=hash) is cached for a year,
    an unversioned one revalidates every time."""

    def set_default_headers(self):
        security_headers(self)

    def get_cache_time(self, path, modified, mime_type):
        return 365 * 24 * 3600 if "v" in self.request.arguments else 0

    def set_extra_headers(self, path):
        if "v" not in self.request.arguments:
            self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish({"code": for_http_status(status_code), "message": error_reason(status_code, kwargs)})


default_handlers = [
    (BrowserRoot(), IndexHandler),
    (r"/static/(.*)", StaticHandler, {"path": STATIC_DIR}),
]
