"""The web app's sign-in cookie (Jupyter's pattern): a Bearer credential posted once signs the browser in for every
tab; the cookie is HttpOnly and SameSite=Strict, verified like the credential it holds, and other sites can
neither write with it nor open a WebSocket with it; Sign out clears it."""
import json
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

import pytest
from tornado import httpclient
from tornado.websocket import websocket_connect

from tests.conftest import TEST_TOKEN, Client

pytestmark = pytest.mark.gen_test(timeout=30)


async def sign_in(fetch, token=TEST_TOKEN):
    code, body = await fetch("/api/v1/auth/cookie", "POST", token=token)
    return code, body


async def raw(http_client, base_url, path, method="GET", body=None, **headers):
    if method in ("POST", "PATCH") and body is None:
        body = ""
    response = await http_client.fetch(base_url + path, method=method, body=body, headers=headers,
                                       raise_error=False)
    return response.code, json.loads(response.body), response.headers


def cookie_of(headers):
    (line,) = [v for k, v in headers.get_all() if k.lower() == "set-cookie"]
    return line


async def test_a_bearer_credential_signs_the_browser_in_with_an_httponly_strict_cookie(
        http_client, base_url, fetch):
    code, _, headers = await raw(http_client, base_url, "/api/v1/auth/cookie", "POST",
                                 Authorization=f"Bearer {TEST_TOKEN}")
    assert code == 200
    line = cookie_of(headers)
    attributes = [a.strip().lower() for a in line.split(";")]
    assert line.startswith(f"parley_auth={TEST_TOKEN};")
    assert {"httponly", "samesite=strict", "path=/"} <= set(attributes)
    assert not any(a.startswith(("expires", "max-age")) for a in attributes)  # a session cookie (token mode)
    cookie = f"parley_auth={TEST_TOKEN}"

    # with the cookie alone: REST reads and same-origin writes work
    code, body, _ = await raw(http_client, base_url, "/api/v1/pipelines/default/sessions", Cookie=cookie)
    assert code == 200
    code, body, _ = await raw(http_client, base_url, "/api/v1/pipelines/default/sessions", "POST",
                              body="{}", Cookie=cookie, Origin=base_url, **{"Content-Type": "application/json"})
    assert code == 201, body
    # a write from another site carries it in vain
    code, body, _ = await raw(http_client, base_url, "/api/v1/pipelines/default/sessions", "POST",
                              body="{}", Cookie=cookie, Origin="https://evil.example",
                              **{"Content-Type": "application/json"})
    assert (code, body["code"]) == (403, "cross_origin")
    # a wrong or stale cookie (a new token after a restart) is refused like a wrong Bearer token
    code, body, _ = await raw(http_client, base_url, "/api/v1/pipelines/default/sessions",
                              Cookie="parley_auth=stale")
    assert (code, body["code"]) == (401, "unauthorized")
    code, body = await sign_in(fetch, token="wrong")
    assert (code, body["code"]) == (401, "unauthorized")


async def test_the_cookie_opens_a_same_origin_websocket_only(base_url):
    url = base_url.replace("http", "ws", 1) + "/api/v1/pipelines/default/ws/connect"
    cookie = f"parley_auth={TEST_TOKEN}"
    ws = await websocket_connect(httpclient.HTTPRequest(url, headers={"Cookie": cookie, "Origin": base_url}))
    c = Client(ws)
    assert (await c.recv())["type"] == "connected"
    c.close()
    with pytest.raises(httpclient.HTTPClientError) as refused:
        await websocket_connect(httpclient.HTTPRequest(url, headers={"Cookie": cookie,
                                                                     "Origin": "https://evil.example"}))
    assert refused.value.code == 403


async def test_sign_out_clears_the_cookie_without_credentials(http_client, base_url):
    code, body, headers = await raw(http_client, base_url, "/api/v1/auth/cookie", "DELETE")
    assert code == 200 and body["data"] == {"signed_out": True}
    line = cookie_of(headers).lower()
    assert line.startswith('parley_auth="";') or line.startswith("parley_auth=;")
    expires = next(a.split("=", 1)[1] for a in line.split("; ") if a.startswith("expires="))
    assert parsedate_to_datetime(expires) < datetime.now(timezone.utc)  # expired: the browser drops it
