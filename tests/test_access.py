"""Who may do what, in JWT mode: user A vs user B vs admin, for every REST route and WebSocket frame."""
import dataclasses
import json
import time

import jwt
import pytest
from tornado.websocket import websocket_connect

from tests.conftest import ws_request

pytestmark = pytest.mark.gen_test(timeout=30)
SECRET = "x" * 32


def token(sub, **claims):
    # minted when the suite is collected: valid for all of it (it ran 14 min on a loaded machine; 10 min expired)
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 86400, **claims}, SECRET, algorithm="HS256")


ALICE, BOB, CAROL, ROOT = token("alice"), token("bob"), token("carol"), token("root", role="admin")


@pytest.fixture
def config(config):
    return dataclasses.replace(config, auth="jwt", jwt_secret=SECRET, token=None)


@pytest.fixture
def world(io_loop, fetch):
    return io_loop.run_sync(lambda: make_world(fetch))


async def make_world(fetch):
    """Alice owns a person session and a group session with Carol."""
    code, body = await fetch("/api/v1/pipelines/slow/sessions", "POST", body={"title": "mine"}, token=ALICE)
    assert code == 201
    person = body["data"]["session_id"]
    code, body = await fetch("/api/v1/pipelines/slow/sessions", "POST", token=ALICE,
                             body={"session_type": "group", "members": ["carol"]})
    group = body["data"]["session_id"]
    return {"person": person, "group": group}


# (method, path template, body) -> expected status for (alice, bob, carol, root)
SESSION_ROUTES = [
    ("GET", "/api/v1/pipelines/slow/sessions/{person}", None, (200, 404, 404, 200)),
    ("GET", "/api/v1/pipelines/slow/sessions/{person}/messages", None, (200, 404, 404, 200)),
    ("POST", "/api/v1/pipelines/slow/sessions/{person}/stop", {}, (200, 404, 404, 200)),
    ("POST", "/api/v1/pipelines/slow/sessions/{person}/reset", {}, (200, 404, 404, 200)),
    ("POST", "/api/v1/pipelines/slow/sessions/{person}/messages",
     {"message": [{"type": "Plain", "text": "hi"}], "stream": False}, (202, 404, 404, 202)),
    ("GET", "/api/v1/pipelines/slow/sessions/{group}", None, (200, 404, 200, 200)),
    ("GET", "/api/v1/pipelines/slow/sessions/{group}/messages", None, (200, 404, 200, 200)),
    ("POST", "/api/v1/pipelines/slow/sessions/{group}/stop", {}, (200, 404, 200, 200)),
    ("POST", "/api/v1/pipelines/slow/sessions/{group}/messages",  # any member may send
     {"message": [{"type": "Plain", "text": "hi"}], "stream": False}, (202, 404, 202, 202)),
    ("POST", "/api/v1/pipelines/slow/sessions/{group}/members", {"add": ["dan"]}, (200, 404, 403, 200)),
    ("GET", "/api/v1/pipelines/slow/ws/connections", None, (403, 403, 403, 200)),
    ("POST", "/api/v1/pipelines/slow/ws/broadcast", {"message": "hello"}, (403, 403, 403, 200)),
    ("POST", "/api/v1/broadcast", {"message": "hello"}, (403, 403, 403, 200)),
    ("POST", "/api/v1/users/alice/push", {"message": "ping"}, (403, 403, 403, 200)),
]


@pytest.mark.parametrize("method,path,body,expected", SESSION_ROUTES)
async def test_rest_access_matrix(fetch, world, method, path, body, expected):
    url = path.format(**world)
    got = []
    for who in (ALICE, BOB, CAROL, ROOT):
        code, answer = await fetch(url, method, body=body, token=who)
        got.append(code)
        if code >= 400:
            assert answer["code"] in ("session_not_found", "forbidden")
    assert tuple(got) == expected
    for missing in (None, "garbage", token("alice", exp=int(time.time()) - 5)):
        code, answer = await fetch(url, method, body=body, token=missing)
        assert (code, answer["code"]) == (401, "unauthorized")


async def test_sessions_list_and_implicit_sessions_are_per_user(fetch, world, connect):
    code, body = await fetch("/api/v1/pipelines/slow/sessions", token=BOB)
    assert body["data"]["sessions"] == []
    code, body = await fetch("/api/v1/pipelines/slow/sessions", token=CAROL)
    assert [s["session_id"] for s in body["data"]["sessions"]] == [world["group"]]
    a = await connect(token=ALICE)
    b = await connect(token=BOB)
    assert a.connected["session_id"] != b.connected["session_id"]
    ack = await a.say("alice's secret")
    await a.until_final(ack["data"]["reply_message_id"])
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person", token=BOB)
    assert body["data"]["messages"] == []
    code, body = await fetch("/api/v1/pipelines/default/ws/reset/person", "POST", token=BOB)
    assert body["data"]["deleted"] == 0
    code, body = await fetch("/api/v1/pipelines/default/ws/messages/person", token=ALICE)
    assert [m["content"] for m in body["data"]["messages"]][0] == "alice's secret"


async def test_websocket_access(connect, ws_url, world, services):
    # Bob cannot open, join, address, or stop Alice's session
    ws = await websocket_connect(ws_request(ws_url("slow", session_id=world["person"]), BOB))
    assert json.loads(await ws.read_message())["code"] == "session_not_found"
    assert await ws.read_message() is None and ws.close_code == 4404

    alice = await connect("slow", token=ALICE, session_id=world["person"])
    ack = await alice.say("long story")
    reply = ack["data"]["reply_message_id"]
    await alice.recv_type("response")

    bob = await connect("slow", token=BOB)
    await bob.send({"type": "session.join", "session_id": world["person"]})
    assert (await bob.recv_type("error", "session.joined"))["code"] == "session_not_found"
    await bob.send({"type": "stop", "message_id": reply})
    assert (await bob.recv_type("stop_ack"))["data"]["stopped"] == []
    await bob.send({"type": "message", "session_id": world["person"], "message": [{"type": "Plain", "text": "x"}]})
    assert (await bob.recv_type("error"))["code"] == "session_not_found"
    await bob.send({"type": "presence", "session_id": world["person"]})
    assert (await bob.recv_type("error"))["code"] == "session_not_found"
    assert reply in services.streams.generations  # untouched by all of that

    # an admin may join and stop it
    root = await connect("slow", token=ROOT)
    await root.send({"type": "session.join", "session_id": world["person"]})
    assert (await root.recv_type("session.joined"))["data"]["session_id"] == world["person"]
    await root.send({"type": "stop", "session_id": world["person"]})
    assert (await root.recv_type("stop_ack"))["data"]["stopped"] == [reply]
    assert (await alice.until_final(reply))[-1]["data"]["status"] == "stopped"


async def test_member_removed_stops_viewing(connect, fetch, world):
    carol = await connect("slow", token=CAROL, session_id=world["group"])
    alice = await connect("slow", token=ALICE, session_id=world["group"])
    code, _ = await fetch(f"/api/v1/pipelines/slow/sessions/{world['group']}/members", "POST",
                          body={"add": ["dave"], "remove": ["carol"]}, token=ALICE)
    assert code == 200
    left = await carol.recv_type("session.left")
    assert left["data"] == {"session_id": world["group"], "reason": "removed"}
    # the members still viewing it learn the new list; the removed one does not get it
    members = (await alice.recv_type("session.members"))["data"]
    assert (members["session_id"], members["added"], members["removed"], members["by"]) == \
        (world["group"], ["dave"], ["carol"], "alice")
    assert sorted(members["members"]) == ["alice", "dave"]
    await carol.send({"type": "ping"})  # frames are in order: whatever carol got before the pong, no members
    while (frame := await carol.recv(5.0))["type"] != "pong":
        assert frame["type"] != "session.members", frame
    code, body = await fetch(f"/api/v1/pipelines/slow/sessions/{world['group']}", token=CAROL)
    assert code == 404


async def test_a_jwt_signs_the_browser_in_until_it_expires(http_client, base_url):
    from email.utils import parsedate_to_datetime
    response = await http_client.fetch(base_url + "/api/v1/auth/cookie", method="POST", body="",
                                       headers={"Authorization": f"Bearer {ALICE}"})
    assert json.loads(response.body)["data"]["user_id"] == "alice"
    attributes = dict(a.split("=", 1) for a in response.headers["Set-Cookie"].split("; ") if "=" in a)
    assert attributes["parley_auth"] == ALICE
    exp = jwt.decode(ALICE, options={"verify_signature": False})["exp"]
    assert parsedate_to_datetime(attributes["expires"]).timestamp() == exp
    # the cookie is that user, nobody else
    response = await http_client.fetch(base_url + "/", headers={"Cookie": f"parley_auth={ALICE}",
                                                               "Accept": "application/json"})
    assert json.loads(response.body)["data"]["user_id"] == "alice"


async def test_the_visitor_column_a_widget_visitor_reaches_only_its_widget(fetch, world, http_client, base_url):
    """A widget visitor (bot `widget`): its visitor token is refused by every API route; the API's credentials,
    an admin's included, open no visitor's conversation through the widget's routes."""
    headers = {"Origin": "https://shop.example"}
    r = await http_client.fetch(f"{base_url}/api/v1/embed/widget/turnstile/verify", method="POST", body="{}",
                                headers={**headers, "Content-Type": "application/json"})
    visitor = json.loads(r.body)["data"]["token"]
    for method, path, body, _ in SESSION_ROUTES:
        code, answer = await fetch(path.format(**world), method, body=body, token=visitor)
        assert (code, answer["code"]) == (401, "unauthorized"), path
    key = "visitor-key-0123456789"
    r = await http_client.fetch(f"{base_url}/api/v1/embed/widget/messages/person?session_id={key}", headers=headers)
    assert json.loads(r.body)["data"]["messages"] == []
    for who in (ALICE, ROOT):
        r = await http_client.fetch(f"{base_url}/api/v1/embed/widget/messages/person?session_id={key}",
                                    headers={**headers, "Authorization": f"Bearer {who}"}, raise_error=False)
        assert (r.code, json.loads(r.body)["code"]) == (401, "unauthorized")
