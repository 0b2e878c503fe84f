"""REST lists page with `limit` + an opaque cursor; CORS with a real preflight; 401 says `WWW-Authenticate: Bearer`."""
import json

import pytest

from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.gen_test(timeout=30)
S = "/api/v1/pipelines/default/sessions"


async def all_pages(fetch, path, key, limit):
    """Follow next_cursor to the end; returns the pages (lists of items)."""
    pages, cursor = [], None
    for _ in range(50):  # bounded
        sep = "&" if "?" in path else "?"
        code, body = await fetch(f"{path}{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
        assert code == 200, body
        pages.append(body["data"][key])
        cursor = body["data"]["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("next_cursor never ended")


async def test_sessions_page_newest_first_without_repeats(fetch):
    created = []
    for i in range(7):
        code, body = await fetch(S, "POST", body={"title": f"s{i}"})
        assert code == 201
        created.append(body["data"]["session_id"])
    pages = await all_pages(fetch, S, "sessions", 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    listed = [s["session_id"] for p in pages for s in p]
    assert sorted(listed) == sorted(created)
    stamps = [(s["updated_at"], s["session_id"]) for p in pages for s in p]
    assert stamps == sorted(stamps, reverse=True)
    code, body = await fetch(S + "?limit=7")  # exactly the rest: no further page
    assert len(body["data"]["sessions"]) == 7 and body["data"]["next_cursor"] is None


async def test_messages_members_and_connections_page_too(fetch, connect):
    c = await connect()
    for i in range(3):
        ack = await c.say(f"m{i}")
        await c.until_final(ack["data"]["reply_message_id"])
    sid = c.connected["session_id"]
    pages = await all_pages(fetch, f"{S}/{sid}/messages", "messages", 4)
    assert [len(p) for p in pages] == [4, 2]
    assert [m["seq"] for p in pages for m in p] == list(range(1, 7))
    legacy = await all_pages(fetch, "/api/v1/pipelines/default/ws/messages/person", "messages", 5)
    assert [len(p) for p in legacy] == [5, 1]

    code, body = await fetch(S, "POST", body={"session_type": "group", "members": ["d", "a", "c", "b"]})
    group = body["data"]["session_id"]
    pages = await all_pages(fetch, f"{S}/{group}/members", "members", 2)
    assert pages == [["a", "b"], ["c", "d"], ["local"]]

    await connect()
    await connect()
    pages = await all_pages(fetch, "/api/v1/pipelines/default/ws/connections", "connections", 2)
    assert [len(p) for p in pages] == [2, 1]
    ids = [x["connection_id"] for p in pages for x in p]
    assert len(set(ids)) == 3 and c.connected["connection_id"] in ids


async def test_a_bad_or_foreign_cursor_is_refused(fetch, connect):
    for cursor in ("not-a-cursor!", "eyJrIjoxfQ"):
        code, body = await fetch(f"{S}?cursor={cursor}")
        assert (code, body["code"]) == (400, "invalid_cursor")
    for _ in range(2):
        await fetch(S, "POST", body={})
    code, body = await fetch(S + "?limit=1")
    sessions_cursor = body["data"]["next_cursor"]
    assert sessions_cursor
    c = await connect()
    code, body = await fetch(f"{S}/{c.connected['session_id']}/messages?cursor={sessions_cursor}")
    assert (code, body["code"]) == (400, "invalid_cursor")  # a cursor belongs to its list
    code, body = await fetch(f"/api/v1/pipelines/slow/sessions?cursor={sessions_cursor}")
    assert (code, body["code"]) == (400, "invalid_cursor")


async def test_401_says_bearer(fetch, http_client, base_url):
    code, body = await fetch(S, token=None)
    assert code == 401 and body["code"] == "unauthorized"
    r = await http_client.fetch(base_url + S, raise_error=False)
    assert r.code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="parley"'
    r = await http_client.fetch(base_url + S, raise_error=False, headers={"Authorization": "Bearer wrong-token"})
    assert r.code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="parley", error="invalid_token"'
    r = await http_client.fetch(base_url + S, raise_error=False, headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    assert r.code == 200 and "WWW-Authenticate" not in r.headers


@pytest.fixture
def cors(services):
    services.config.cors_origins = ("https://app.example",)


async def preflight(http_client, base_url, origin, method="POST", path=S):
    return await http_client.fetch(base_url + path, method="OPTIONS", raise_error=False, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type"})


async def test_cors_preflight_and_answers_for_an_allowed_origin(cors, http_client, base_url):
    r = await preflight(http_client, base_url, "https://app.example")
    assert r.code == 204 and r.body == b""
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert r.headers["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    allowed_headers = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed_headers
    assert "Origin" in r.headers.get_list("Vary") and int(r.headers["Access-Control-Max-Age"]) > 0

    r = await http_client.fetch(base_url + S, headers={"Origin": "https://app.example",
                                                       "Authorization": f"Bearer {TEST_TOKEN}"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-Request-Id" in r.headers["Access-Control-Expose-Headers"]
    assert "Origin" in r.headers.get_list("Vary")
    # an error answer stays readable by the page, with its request id
    r = await http_client.fetch(base_url + S, headers={"Origin": "https://app.example"}, raise_error=False)
    assert r.code == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert r.headers["WWW-Authenticate"].startswith("Bearer") and r.headers["X-Request-Id"]


async def test_cors_refuses_other_origins_and_is_off_by_default(cors, services, http_client, base_url):
    r = await preflight(http_client, base_url, "https://evil.example")
    assert r.code == 403 and json.loads(r.body)["code"] == "cors_forbidden"
    r = await http_client.fetch(base_url + S, headers={"Origin": "https://evil.example",
                                                       "Authorization": f"Bearer {TEST_TOKEN}"})
    assert "Access-Control-Allow-Origin" not in r.headers and "Origin" in r.headers.get_list("Vary")
    services.config.cors_origins = ()
    r = await preflight(http_client, base_url, "https://app.example")
    assert r.code == 403 and "Access-Control-Allow-Origin" not in r.headers


async def test_sessions_paging_never_drops_one_at_a_page_boundary(fetch):
    """41 sessions touched in quick succession (many share a millisecond; nx-27017 keeps sub-millisecond times
    that a millisecond cursor cannot name), pages of 7: every session exactly once, in the listed order."""
    created = []
    for i in range(41):
        code, body = await fetch(S, "POST", body={"title": f"s{i}"})
        assert code == 201
        created.append(body["data"]["session_id"])
    for sid in created:  # a rename stamps updated_at with the server's clock ($currentDate)
        code, _ = await fetch(f"{S}/{sid}", "PATCH", body={"title": "renamed"})
        assert code == 200
    pages = await all_pages(fetch, S, "sessions", 7)
    listed = [s["session_id"] for p in pages for s in p]
    assert len(listed) == len(set(listed)), "a session was listed twice"
    assert sorted(listed) == sorted(created), f"{len(created) - len(set(listed))} sessions never listed"
    assert [len(p) for p in pages] == [7] * 5 + [6]
    stamps = [(s["updated_at"], s["session_id"]) for p in pages for s in p]
    assert stamps == sorted(stamps, reverse=True)
