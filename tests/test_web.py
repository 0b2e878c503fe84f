"""handlers/web.py over HTTP: the page for browsers, JSON for everyone else, static files with ETags and a
strict Content-Security-Policy. (The app itself runs in a real browser in tests/test_browser.py.)"""
import json
import re

import pytest

import server
from handlers.web import check_frame_ancestors, content_security_policy

pytestmark = pytest.mark.gen_test(timeout=20)
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


async def get(http_client, base_url, path, **headers):
    return await http_client.fetch(base_url + path, headers=headers, raise_error=False)


def assert_strict(response):
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "style-src 'self';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_a_browser_gets_the_app_and_needs_no_token(http_client, base_url):
    r = await get(http_client, base_url, "/", **BROWSER)
    assert r.code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert_strict(r)
    html = r.body.decode()
    assert '<script src="/static/app.js?v=' in html and "<script>" not in html and "style=" not in html
    port = base_url.rsplit(":", 1)[1]
    assert f"connect-src 'self' ws://127.0.0.1:{port} wss://127.0.0.1:{port};" in r.headers["Content-Security-Policy"]


async def test_an_api_client_keeps_the_json_root(http_client, base_url):
    for accept in ({}, {"Accept": "application/json"}, {"Accept": "*/*"}, {"Accept": "text/html, application/json"}):
        r = await get(http_client, base_url, "/", Authorization="Bearer test-token-0123456789", **accept)
        assert r.code == 200 and r.headers["Content-Type"].startswith("application/json"), accept
        assert json.loads(r.body)["data"]["name"] == "Parley"
    r = await get(http_client, base_url, "/", Accept="application/json")
    assert r.code == 401 and json.loads(r.body)["code"] == "unauthorized"


async def test_static_files_have_etags_and_versioned_urls_are_cached(http_client, base_url):
    page = (await get(http_client, base_url, "/", **BROWSER)).body.decode()
    versioned = re.search(r'src="(/static/parley\.js\?v=[0-9a-f]+)"', page).group(1)
    r = await get(http_client, base_url, versioned)
    assert r.code == 200 and "javascript" in r.headers["Content-Type"]
    assert_strict(r)
    assert "max-age=31536000" in r.headers["Cache-Control"]
    plain = await get(http_client, base_url, "/static/parley.js")
    assert plain.headers["Cache-Control"] == "no-cache" and plain.body == r.body
    again = await get(http_client, base_url, "/static/parley.js", **{"If-None-Match": plain.headers["Etag"]})
    assert again.code == 304
    missing = await get(http_client, base_url, "/static/nope.js")
    assert missing.code == 404 and json.loads(missing.body)["code"] == "not_found"
    escape = await get(http_client, base_url, "/static/../server.py")
    assert escape.code in (403, 404)
    for name in ("vendor/marked.umd.js", "vendor/purify.min.js", "app.css", "token.js", "favicon.svg"):
        assert (await get(http_client, base_url, "/static/" + name)).code == 200, name


async def test_frame_ancestors_is_an_option(services):
    services.config.frame_ancestors = "'self' https://portal.example"
    app = server.make_app(services)
    assert app.settings["frame_ancestors"] == "'self' https://portal.example"
    assert "frame-ancestors 'self' https://portal.example" in content_security_policy("h:1", "'self' https://portal.example")
    config = server.parse_args(["--frame-ancestors", "'self'"])
    assert config.frame_ancestors == "'self'"
    for bad in ("'self'; script-src *", "x\r\nSet-Cookie: a=b", ""):
        with pytest.raises(ValueError):
            check_frame_ancestors(bad)
    assert "ws://" not in content_security_policy("evil.example\r\nX: y", "'none'")


def test_a_bad_frame_ancestors_stops_start_up():
    with pytest.raises(SystemExit) as exc:
        server.main(["--frame-ancestors", "'self'; script-src *"])
    assert "--frame-ancestors" in str(exc.value)
