"""Files, not inline blobs (issue 24): multipart upload -> key -> a message naming it -> the model gets the image;
history and fan-out carry a reference whatever the image weighs; only those who may read a file get it."""
import base64
import dataclasses
import json
import time
import uuid

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.testing import bind_unused_port
from tornado.websocket import websocket_connect

import server
from services.operations.pipelines import Pipeline, Pipelines, Timeouts
from tests.conftest import Client, ws_request
from tests.upstream import Script

pytestmark = pytest.mark.gen_test(timeout=30)
SECRET = "s" * 32
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def token(sub, **claims):
    # minted when the suite is collected: valid for all of it (it ran 14 min on a loaded machine; 10 min expired)
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 86400, **claims}, SECRET, algorithm="HS256")


ALICE, BOB, CAROL, ROOT = token("alice"), token("bob"), token("carol"), token("root", role="admin")


def big_png(size):
    """A PNG signature followed by `size` bytes: an image by its magic bytes, of any weight."""
    return PNG[:8] + bytes(size - 8)


def multipart(filename, data, content_type="application/octet-stream", field="file"):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture
def gateway(io_loop, config, upstream):
    """JWT auth; `gpt` takes images inline (data: URLs), `linked` hands the upstream signed links instead."""
    config = dataclasses.replace(config, auth="jwt", jwt_secret=SECRET, token=None, file_quota=2_000_000,
                                 max_document_size=100_000)
    sock, port = bind_unused_port()
    fast = Timeouts(first_token=5, stall=2, total=20)
    pipelines = Pipelines([
        Pipeline(id="gpt", provider="openai", model="m", base_url=upstream.base_url, inputs=("text", "image", "file"),
                 history_messages=0, timeouts=fast),
        Pipeline(id="linked", provider="openai", model="m", base_url=upstream.base_url, inputs=("text", "image"),
                 history_messages=0, timeouts=fast, files_url=f"http://127.0.0.1:{port}"),
    ])
    svc = io_loop.run_sync(lambda: server.open_services(config, pipelines=pipelines))
    http = HTTPServer(server.make_app(svc))
    http.add_sockets([sock])
    clients = []

    async def connect(who=ALICE, pipeline="gpt", **query):
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        ws = await websocket_connect(ws_request(f"ws://127.0.0.1:{port}/api/v1/pipelines/{pipeline}/ws/connect?{qs}",
                                                token=who))
        c = Client(ws)
        c.connected = await c.recv()
        clients.append(c)
        return c

    async def request(path, method="GET", body=None, who=ALICE, headers=None, raw=False):
        headers = dict(headers or {})
        if who is not None:
            headers["Authorization"] = f"Bearer {who}"
        if body is not None and not isinstance(body, bytes):
            body, headers["Content-Type"] = json.dumps(body), "application/json"
        r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}{path}", method=method, body=body,
                                          headers=headers, raise_error=False)
        return r if raw else (r.code, json.loads(r.body))

    async def upload(data, filename="photo.png", kind="images", who=ALICE):
        body, ctype = multipart(filename, data)
        return await request(f"/api/v1/files/{kind}", "POST", body, who, {"Content-Type": ctype})

    connect.services, connect.port, connect.request, connect.upload = svc, port, request, upload
    upstream.plan("m", Script(content=["Seen."]))
    yield connect
    for c in clients:
        c.close()
    http.stop()
    io_loop.run_sync(lambda: server.close_services(svc), timeout=20)


async def send_and_finish(c, chain):
    await c.send({"type": "message", "message": chain})
    ack = await c.recv_type("ack", "error")
    assert ack["type"] == "ack", ack
    final = (await c.until_final(ack["data"]["reply_message_id"]))[-1]["data"]
    assert final["status"] == "completed", final
    return ack


async def test_an_uploaded_image_goes_by_key_to_the_model_and_history_stays_small(gateway, upstream):
    image = big_png(400_000)
    code, body = await gateway.upload(image)
    assert code == 200 and body["code"] == 0, body
    key = body["data"]["file_key"]  # LangBot's dashboard shape
    assert body["data"]["type"] == "image/png" and body["data"]["size"] == len(image)
    c = await gateway()
    other_tab = await gateway()
    ack = await send_and_finish(c, [{"type": "Plain", "text": "what is it?"}, {"type": "Image", "path": key}])
    parts = upstream.calls[-1].body["messages"][-1]["content"]
    assert parts[1] == {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(image).decode()}}
    # the fan-out carries the reference, not the bytes
    echo = await other_tab.recv_type("user_message")
    assert echo["data"]["message_chain"][1] == {"type": "Image", "path": key}
    small = await send_and_finish(c, [{"type": "Plain", "text": "and this?"},
                                      {"type": "Image", "base64": base64.b64encode(PNG).decode()}])
    sid = c.connected["session_id"]
    r = await gateway.request(f"/api/v1/pipelines/gpt/sessions/{sid}/messages", raw=True)
    page = json.loads(r.body)["data"]["messages"]
    assert [m["seq"] for m in page] == [1, 2, 3, 4]
    sizes = [len(json.dumps(m)) for m in page]
    assert len(r.body) < 4000 and abs(sizes[0] - sizes[2]) < 200, sizes  # a 400 KB image and a 70 B one alike
    inline = page[2]["message_chain"][1]
    assert set(inline) == {"type", "path"} and inline["path"] != key  # the inline image is a stored file too
    assert small["data"]["seq"] == 3


async def test_only_who_may_read_a_file_gets_it(gateway):
    code, body = await gateway.upload(big_png(3000))
    key = body["data"]["file_key"]
    url = f"/api/v1/files/image/{key}"
    r = await gateway.request(url, raw=True)
    assert r.code == 200 and r.body == big_png(3000) and r.headers["Content-Type"] == "image/png"
    assert "private" in r.headers["Cache-Control"] and r.headers["X-Content-Type-Options"] == "nosniff"
    assert (await gateway.request(url, headers={"If-None-Match": r.headers["ETag"]}, raw=True)).code == 304
    # not shown in any session yet: bob and carol get what a missing file gets
    for who in (BOB, CAROL):
        assert await gateway.request(url, who=who) == (404, {"code": "file_not_found", "message": f"no image {key!r}"})
    code, body = await gateway.request(url, who=None)
    assert (code, body["code"]) == (401, "unauthorized")
    # shown in a group with carol: carol may read it, bob still may not
    code, body = await gateway.request("/api/v1/pipelines/gpt/sessions", "POST",
                                       {"session_type": "group", "members": ["carol"]})
    group = body["data"]["session_id"]
    c = await gateway(session_id=group)
    await send_and_finish(c, [{"type": "Image", "path": key}])
    assert (await gateway.request(url, who=CAROL, raw=True)).code == 200
    assert (await gateway.request(url, who=ROOT, raw=True)).code == 200
    assert (await gateway.request(url, who=BOB))[0] == 404
    # nor can bob send it as his own: a key is not a capability
    bob = await gateway(BOB)
    await bob.send({"type": "message", "message": [{"type": "Image", "path": key}]})
    err = await bob.recv_type("error")
    assert err["code"] == "file_not_found"


async def test_a_signed_link_is_what_an_upstream_gets_for_a_linked_pipeline(gateway, upstream):
    code, body = await gateway.upload(big_png(5000))
    key = body["data"]["file_key"]
    c = await gateway(pipeline="linked")
    await send_and_finish(c, [{"type": "Plain", "text": "see"}, {"type": "Image", "path": key}])
    link = upstream.calls[-1].body["messages"][-1]["content"][1]["image_url"]["url"]
    prefix = f"http://127.0.0.1:{gateway.port}/api/v1/files/image/{key}?exp="
    assert link.startswith(prefix)
    path = link[len(f"http://127.0.0.1:{gateway.port}"):]
    r = await gateway.request(path, who=None, raw=True)  # what the upstream does: no credentials
    assert r.code == 200 and r.body == big_png(5000) and r.headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    for bad in (path[:-2] + ("AA" if not path.endswith("AA") else "BB"), path.replace("exp=", "exp=1")):
        code, body = await gateway.request(bad, who=None)
        assert (code, body["code"]) == (404, "file_not_found")


async def test_documents_are_checked_by_type_and_size_and_quota(gateway):
    code, body = await gateway.upload(b"%PDF-1.7\n...", "report.pdf", "documents")
    assert code == 200 and body["data"]["type"] == "application/pdf", body
    doc_key = body["data"]["file_id"]  # LangBot's dashboard shape for documents
    r = await gateway.request(f"/api/v1/files/document/{doc_key}", raw=True)
    assert r.code == 200 and r.headers["Content-Disposition"].startswith("attachment")
    for name, data, code_ in [("page.html", b"<script>alert(1)</script>", "unsupported_file_type"),
                              ("fake.pdf", b"MZ\x90\x00", "unsupported_file_type"),
                              ("notes.txt", b"\xff\xfe\x00bin", "unsupported_file_type")]:
        code, body = await gateway.upload(data, name, "documents")
        assert (code, body["code"]) == (400, code_), (name, body)
    code, body = await gateway.upload(b"a" * 100_001, "big.txt", "documents")
    assert (code, body["code"]) == (413, "file_too_large")
    code, body = await gateway.upload(b"GIF89a" + bytes(10), "x.png")  # an image is what its bytes say
    assert code == 200 and body["data"]["type"] == "image/gif"
    code, body = await gateway.upload(b"<svg onload=alert(1)>", "x.png")
    assert (code, body["code"]) == (400, "invalid_image")
    # a File component naming a document reaches the model as its name; the same bytes twice are one file
    c = await gateway()
    await send_and_finish(c, [{"type": "File", "path": doc_key, "name": "report.pdf"}])
    again = await gateway.upload(b"%PDF-1.7\n...", "report.pdf", "documents")
    assert again[1]["data"]["file_id"] == doc_key
    # the quota counts every stored byte of a user (2,000,000 here)
    for i in range(4):
        code, body = await gateway.upload(big_png(450_000 + i))
        assert code == 200, body
    code, body = await gateway.upload(big_png(450_100))
    assert (code, body["code"]) == (413, "quota_exceeded")
    code, body = await gateway.upload(big_png(450_100), who=BOB)  # another user's quota is their own
    assert code == 200


async def test_uploads_refuse_bad_requests_with_a_code(gateway):
    body, ctype = multipart("a.png", PNG, field="other")
    code, answer = await gateway.request("/api/v1/files/images", "POST", body, ALICE, {"Content-Type": ctype})
    assert (code, answer["code"]) == (400, "invalid_param")
    code, answer = await gateway.request("/api/v1/files/images", "POST", {"file": "x"})
    assert (code, answer["code"]) == (415, "unsupported_media_type")
    code, answer = await gateway.upload(PNG, who=None)
    assert (code, answer["code"]) == (401, "unauthorized")
    code, answer = await gateway.upload(big_png(gateway.services.config.max_image_size + 1))
    assert (code, answer["code"]) == (413, "image_too_large")
