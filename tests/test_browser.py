"""The web app in a real browser: Debian's Chromium driven by Python Playwright, against a real `server.py`.

Never a downloaded browser: Playwright launches /usr/bin/chromium (.ci/apt-packages). Without it (or without the
playwright package) these tests skip, and fail under PARLEY_REQUIRE_ALL=1. Screenshots of the main states go to
tests/artifacts/ (git-ignored).
"""
import asyncio
import base64
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jwt
import pytest

from services.storage.embedded_mongo import free_port
from tests.conftest import TEST_TOKEN, require
from tests.upstream import FakeUpstream, Script

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
JWT_SECRET = "browser-test-secret-0123456789abcdef"
WAIT = 20_000  # ms: generous, for a loaded machine; every wait is on a condition

PIPELINES = """
[pipelines.default]     # the demo's whole answer: Markdown with a list and a code block
name = "Demo"
provider = "demo"
options = { rate = 150 }

[pipelines.medium]      # ~3 s: time to reload or open a second tab mid-reply
provider = "demo"
options = { words = 150, rate = 50 }

[pipelines.slow]        # long: stopped long before its end
provider = "demo"
options = { words = 3000, rate = 30 }

[pipelines.thinker]
provider = "demo"
options = { words = 20, rate = 80, thinking = 12 }

[pipelines.instant]
provider = "demo"
options = { words = 3, rate = 0 }

[pipelines.keyless]     # fails at once: its key variable is not set
provider = "openai"
model = "m"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "PARLEY_BROWSER_TEST_UNSET_KEY"

[pipelines.hurried]     # times out: a long reply, half a second allowed
provider = "demo"
options = { words = 3000, rate = 30 }
timeouts = { total = 0.5 }

[pipelines.vision]      # an OpenAI-compatible model that takes images: the fake upstream of tests/upstream.py
provider = "openai"
model = "vm"
base_url = "{upstream}"
inputs = ["text", "image"]
"""
MAX_IMAGE = 48 * 1024   # the browser tests' --max-image-size: a modest photo must be shrunk to fit

XSS = '<img src=x onerror="window.__pwned=1"> [go](javascript:window.__pwned=2) <a href="javascript:window.__pwned=3">x</a>'


class Server:
    """A real `python server.py` process on a fixed port, restartable (same port, same database)."""

    def __init__(self, tmp, mongo_url, *args, upstream="http://127.0.0.1:9/v1"):
        self.tmp, self.port = tmp, free_port()
        self.args = ["--port", str(self.port), "--mongo-url", mongo_url, "--db-name", "b_" + uuid.uuid4().hex[:12],
                     "--pipelines", str(tmp / "pipelines.toml"), "--checkpoint-interval", "0.2",
                     "--drain-timeout", "0.2", "--rate-limit", "1000", "--rate-burst", "1000", "--max-queued", "64",
                     "--max-image-size", str(MAX_IMAGE), *args]
        (tmp / "pipelines.toml").write_text(PIPELINES.replace("{upstream}", upstream))
        self.proc = None
        self.starts = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        log = open(self.tmp / f"server-{self.port}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "server.py", *self.args], cwd=ROOT, env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def rest(self, path, method="GET", body=None, token=TEST_TOKEN):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def browser():
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e '.[test]')")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception:
        pw.stop()
        raise
    yield b
    b.close()
    pw.stop()


class ThreadedUpstream:
    """tests/upstream.py's fake Chat Completions server on its own event loop in a thread (these tests are
    synchronous): what the `vision` pipeline's model receives."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = FakeUpstream()
        self.run(self.upstream.start())
        self.plan(Script(content=["A ", "small ", "picture."]))

    def plan(self, *scripts):
        self.loop.call_soon_threadsafe(self.upstream.plan, "vm", *scripts)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def calls(self):
        return self.run(self._calls())

    async def _calls(self):
        return list(self.upstream.calls)

    def close(self):
        self.run(self.upstream.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def upstream():
    u = ThreadedUpstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, mongo_url, upstream):
    s = Server(tmp_path_factory.mktemp("web"), mongo_url, "--token", TEST_TOKEN, upstream=upstream.upstream.base_url)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory, mongo_url):
    s = Server(tmp_path_factory.mktemp("webjwt"), mongo_url, "--auth", "jwt", "--jwt-secret", JWT_SECRET)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def new_page(browser):
    """Pages in fresh contexts (each its own sessionStorage: like separate browser windows)."""
    contexts = []

    def make(**options):
        context = browser.new_context(**options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT)
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        return page

    yield make
    for c in contexts:
        c.close()


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def open_app(page, server, fragment="", token=TEST_TOKEN):
    response = page.goto(f"{server.url}/?token={token}#/{fragment}")
    page.wait_for_selector("#conn[data-state=open]")
    return response


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def new_chat(page):
    """Click "New chat" and wait until the new, empty conversation is open and connected."""
    before = page.evaluate("() => location.hash")
    page.click("#new-chat")
    page.wait_for_function("before => location.hash !== before && location.hash.split('/').length === 3", arg=before)
    page.wait_for_selector("#conn[data-state=open]")
    assert page.locator(".msg").count() == 0


def session_id(page):
    return page.evaluate("location.hash").split("/")[2]


def stored_messages(server, page, pipeline, token=TEST_TOKEN):
    status, body = server.rest(f"/api/v1/pipelines/{pipeline}/sessions/{session_id(page)}/messages?limit=500",
                               token=token)
    assert status == 200, body
    return body["data"]["messages"]


def last_reply(page):
    return page.locator(".msg.assistant").last


def body_text(locator):
    return locator.locator(".body").inner_text().strip()


def shows(reply, content):
    """The reply's body is exactly `content` rendered (the page's own marked + DOMPurify), copy buttons aside."""
    return reply.evaluate("""(el, content) => {
        const shown = el.querySelector('.body').cloneNode(true);
        shown.querySelectorAll('button.copy').forEach((b) => b.remove());
        const fresh = document.createElement('div');
        fresh.append(window.ParleyApp.renderMarkdown(content));
        return shown.innerHTML === fresh.innerHTML;
    }""", content)


def test_start_up_url_signs_in_and_leaves_the_address_bar(new_page, server):
    page = new_page()
    response = open_app(page, server)
    assert "token" not in page.url
    # the token became the sign-in cookie: HttpOnly (no script reads it), SameSite=Strict; the page keeps nothing
    assert page.evaluate("sessionStorage.getItem('parley.token')") is None and page.evaluate("document.cookie") == ""
    (cookie,) = page.context.cookies()
    assert (cookie["name"], cookie["value"], cookie["httpOnly"], cookie["sameSite"]) == (
        "parley_auth", TEST_TOKEN, True, "Strict")
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self';" in csp and "style-src 'self';" in csp and "frame-ancestors 'none'" in csp
    assert f"connect-src 'self' ws://127.0.0.1:{server.port}" in csp and "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    assert page.inner_text("#whoami") == "local"
    assert page.locator("#pipeline option").count() == 8
    # an API client on the same URL keeps the JSON answer
    status, body = server.rest("/")
    assert status == 200 and body["data"]["name"] == "Parley"
    shot(page, "signed-in")
    # a reload keeps the tab signed in, and so is a second tab opened on the bare address
    page.reload()
    page.wait_for_selector("#conn[data-state=open]")
    other = page.context.new_page()
    other.goto(server.url + "/")
    other.wait_for_selector("#conn[data-state=open]")
    assert other.inner_text("#whoami") == "local"
    # Sign out in one tab ends it in every tab
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    other.wait_for_selector("#signin:not([hidden])")
    assert page.context.cookies() == []
    other.reload()
    other.wait_for_selector("#signin:not([hidden])")
    assert page.errors == []


def test_a_bad_token_shows_the_sign_in_form_and_a_good_one_gets_in(new_page, server):
    page = new_page()
    page.goto(f"{server.url}/?token=wrong-token")
    page.wait_for_selector("#signin-error:not([hidden])")
    assert "not accepted" in page.inner_text("#signin-error")
    assert "token" not in page.url
    page.fill("#signin-token", TEST_TOKEN)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#conn[data-state=open]")
    page.click("#signout")
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.getItem('parley.token')") is None


def test_reply_streams_with_a_caret_then_stop_and_retry(new_page, server):
    page = new_page()
    open_app(page, server, "slow")
    new_chat(page)
    send(page, "tell me a long story")
    page.wait_for_selector(".msg.user:not(.pending) >> text=tell me a long story")
    reply = last_reply(page)
    page.wait_for_function("() => document.querySelector('.msg.assistant.streaming .body')?.innerText.length > 20")
    first = len(body_text(reply))
    page.wait_for_function(f"() => document.querySelector('.msg.assistant.streaming .body').innerText.length > {first}")
    assert reply.get_attribute("aria-busy") == "true"
    caret = reply.evaluate("el => { const b = el.querySelector('.body'); "
                           "return getComputedStyle(b.lastElementChild || b, '::after').content; }")
    assert caret == '"▍"'
    assert page.locator("#log").get_attribute("aria-live") == "polite"
    shot(page, "streaming")
    assert page.is_visible("#stop")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-status=stopped]")
    assert reply.locator(".badge").inner_text() == "Stopped"
    assert not page.is_visible("#stop") and "streaming" not in reply.get_attribute("class")
    stored = [m for m in stored_messages(server, page, "slow") if m["role"] == "assistant"]
    assert stored[-1]["status"] == "stopped" and shows(reply, stored[-1]["content"])
    shot(page, "stopped")
    # Retry regenerates: a new reply to the same message, shown in place of this one; Esc stops that one too
    reply.locator("button.retry").click()
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2")
    page.wait_for_selector(".msg.assistant.streaming")
    page.keyboard.press("Escape")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-status=stopped]').length === 2")
    assert distance_from_end(page) < 80  # the new reply was followed, through Retry and Esc
    stored = stored_messages(server, page, "slow")
    assert [m["content"] for m in stored if m["role"] == "user"] == ["tell me a long story"]  # not sent again
    first, second = [m for m in stored if m["role"] == "assistant"]
    assert first["superseded_by"] == second["message_id"] and first["reply_to"] == second["reply_to"]
    visible = page.locator(".msg.assistant:visible")
    assert visible.count() == 1 and visible.get_attribute("data-id") == second["message_id"]
    assert visible.locator(".versions .count").inner_text() == "2 / 2"
    assert visible.locator("button.retry").is_visible()
    shot(page, "regenerated")
    visible.locator(".versions .prev").click()  # page back to the earlier version: it no longer offers Retry
    visible = page.locator(".msg.assistant:visible")
    assert visible.get_attribute("data-id") == first["message_id"]
    assert visible.locator(".versions .count").inner_text() == "1 / 2" and not visible.locator("button.retry").is_visible()
    assert shows(visible, first["content"])


def test_shift_enter_is_a_new_line_and_thinking_collapses(new_page, server):
    page = new_page()
    open_app(page, server, "thinker")
    new_chat(page)
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two"
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    assert page.input_value("#input") == ""
    assert page.locator(".msg.user .body").inner_text() == "line one\nline two"
    # a new conversation is named after its first line, in the list too
    page.wait_for_selector("#session-title >> text=line one")
    page.wait_for_selector("#sessions button[aria-current=true] >> text=line one")
    thinking = page.locator(".msg.assistant details.thinking")
    assert thinking.is_visible() and thinking.get_attribute("open") is None  # collapsed once the answer came
    stored = [m for m in stored_messages(server, page, "thinker") if m["role"] == "assistant"][-1]
    thinking.locator("summary").click()
    assert thinking.locator(".thinking-text").inner_text() == stored["thinking"]


def test_model_output_is_sanitized_and_code_can_be_copied(new_page, server):
    page = new_page(permissions=["clipboard-read", "clipboard-write"])
    open_app(page, server, "default")
    new_chat(page)
    send(page, XSS)
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    stored = [m for m in stored_messages(server, page, "default") if m["role"] == "assistant"][-1]
    assert 'onerror="window.__pwned=1"' in stored["content"] and "javascript:" in stored["content"]  # it was there
    assert page.evaluate("window.__pwned") is None
    assert page.locator("[onerror]").count() == 0
    links = page.locator(".msg.assistant .body a")
    assert links.count() == 2
    for i in range(links.count()):
        href = links.nth(i).get_attribute("href")
        assert href is None or not href.strip().lower().startswith("javascript:")
    # the user's own text is shown as text
    assert page.locator(".msg.user .body").inner_text() == XSS
    reply = last_reply(page)
    assert shows(reply, stored["content"])
    # Markdown: the demo's answer has a list and a code block, which has a copy button
    assert reply.locator("li").count() == 3 and reply.locator("pre code").count() == 1
    reply.locator("pre button.copy").click()
    page.wait_for_selector("pre button.copy >> text=Copied")
    copied = page.evaluate("() => navigator.clipboard.readText()")
    assert copied == reply.locator("pre code").inner_text() and "def explain(topic):" in copied
    shot(page, "sanitized")
    assert page.errors == []


def test_reload_mid_reply_resumes_to_the_stored_text(new_page, server):
    page = new_page()
    open_app(page, server, "medium")
    new_chat(page)
    send(page, "resume me")
    page.wait_for_function("() => document.querySelector('.msg.assistant.streaming .body')?.innerText.length > 30")
    page.reload()
    page.wait_for_selector("#conn[data-state=open]")
    page.wait_for_selector(".msg.assistant.streaming")  # picked up mid-reply, still streaming
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    stored = [m for m in stored_messages(server, page, "medium") if m["role"] == "assistant"]
    assert len(stored) == 1 and stored[0]["status"] == "completed"
    assert shows(last_reply(page), stored[0]["content"])
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1


def distance_from_end(page):
    return page.locator("#log").evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight")


def test_two_tabs_on_one_session_stay_in_sync(new_page, server):
    a = new_page()
    open_app(a, server, "medium")
    new_chat(a)
    b = new_page(viewport={"width": 900, "height": 420})  # short: the reply overflows it
    open_app(b, server, f"medium/{session_id(a)}")
    send(a, "from tab a")
    b.wait_for_selector(".msg.user >> text=from tab a")
    b.wait_for_selector(".msg.assistant.streaming")  # b watches it stream too
    a.wait_for_selector(".msg.assistant[data-status=completed]")
    b.wait_for_selector(".msg.assistant[data-status=completed]")
    assert body_text(last_reply(a)) == body_text(last_reply(b)) != ""
    # b followed the reply to its end (it was at the end when the reply began)
    assert b.locator("#log").evaluate("el => el.scrollHeight > el.clientHeight + 200")
    assert distance_from_end(b) < 80
    send(b, "from tab b")
    a.wait_for_selector(".msg.user >> text=from tab b")
    a.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-status=completed]').length === 2")
    b.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-status=completed]').length === 2")
    assert a.locator(".msg .body").all_inner_texts() == b.locator(".msg .body").all_inner_texts()
    # a reset in one tab empties the other; it asks first, in the app's own dialog (never the browser's confirm)
    a.on("dialog", lambda d: pytest.fail(f"a browser dialog was used: {d.message}"))
    a.click("#reset")
    a.wait_for_selector("#dialog[open] >> text=Delete every message of this conversation?")
    assert a.locator("#dialog-name").is_hidden() and a.locator("#dialog-members").is_hidden()
    shot(a, "reset-dialog")
    a.click("#dialog-ok")
    b.wait_for_function("() => document.querySelectorAll('.msg').length === 0")
    a.wait_for_function("() => document.querySelectorAll('.msg').length === 0")
    send(b, "after the reset")
    a.wait_for_selector(".msg.user >> text=after the reset")
    b.wait_for_selector(".msg.assistant[data-status=completed]")
    assert b.locator(".msg").count() == 2


def test_history_loads_as_you_scroll_up(new_page, server):
    status, body = server.rest("/api/v1/pipelines/instant/sessions", "POST", {"session_type": "person", "title": "Long"})
    assert status == 201
    sid = body["data"]["session_id"]
    for i in range(25):  # 50 messages: more than one page (30)
        status, ack = server.rest(f"/api/v1/pipelines/instant/sessions/{sid}/messages", "POST",
                                  {"message": [{"type": "Plain", "text": f"note {i}"}]})
        assert status == 202, ack
    deadline = time.monotonic() + 30
    while [m["status"] for m in server.rest(f"/api/v1/pipelines/instant/sessions/{sid}/messages?limit=500")[1]
           ["data"]["messages"]].count("completed") < 50:
        assert time.monotonic() < deadline, "replies did not finish"
        time.sleep(0.1)
    page = new_page()
    open_app(page, server, f"instant/{sid}")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 30")
    assert page.locator(".msg.user .body").first.inner_text() == "note 10"
    page.locator("#log").evaluate("el => { el.scrollTop = 0; }")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 50")
    assert page.locator(".msg.user .body").first.inner_text() == "note 0"
    assert page.inner_text("#history-top") == "Start of the conversation"
    page.locator("#log").evaluate("el => { el.scrollTop = 0; }")  # all of it shows, under the header, not below it
    top, log, first = page.evaluate("['history-top', 'log'].map((id) => document.getElementById(id)"
                                    ".getBoundingClientRect().toJSON()).concat(document.querySelector('.msg')"
                                    ".getBoundingClientRect().toJSON())")
    assert log["top"] <= top["top"] and top["bottom"] <= first["top"]
    assert page.inner_text("#session-title") == "Long"


def test_the_conversation_list_pages(new_page, server):
    for i in range(55):
        status, body = server.rest("/api/v1/pipelines/instant/sessions", "POST", {"title": f"bulk {i}"})
        assert status == 201, body
    total, cursor = 0, None
    for _ in range(20):
        # the same pages the app asks for (limit=50)
        body = server.rest("/api/v1/pipelines/instant/sessions?limit=50" + (f"&cursor={cursor}" if cursor else ""))[1]
        total += len(body["data"]["sessions"])
        cursor = body["data"]["next_cursor"]
        if not cursor:
            break
    page = new_page()
    open_app(page, server, "instant")
    assert page.locator("#sessions button[data-session]").count() == 50
    page.click("#sessions button.more")
    page.wait_for_function(f"() => document.querySelectorAll('#sessions button[data-session]').length === {total}")
    assert page.locator("#sessions button.more").count() == 0
    # a conversation beyond the first page opens from its address
    oldest = page.locator("#sessions button[data-session]").last.get_attribute("data-session")
    page.goto(f"{server.url}/#/instant/{oldest}")
    page.wait_for_selector("#conn[data-state=open]")
    assert session_id(page) == oldest


def test_rename_reset_and_notices(new_page, server):
    page = new_page()
    open_app(page, server, "instant")
    new_chat(page)
    page.click("#rename")
    page.fill("#dialog-name", "Groceries")
    page.click("#dialog-ok")
    page.wait_for_selector("#session-title >> text=Groceries")
    page.wait_for_selector("#sessions button[aria-current=true] >> text=Groceries")
    status, body = server.rest(f"/api/v1/pipelines/instant/sessions/{session_id(page)}")
    assert body["data"]["title"] == "Groceries"
    send(page, "milk")
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    page.click("#reset")
    page.click("#dialog-cancel")  # a second thought: nothing is deleted
    assert page.locator(".msg").count() == 2 and len(stored_messages(server, page, "instant")) == 2
    page.click("#reset")
    page.click("#dialog-ok")
    page.wait_for_function("() => document.querySelectorAll('.msg').length === 0")
    assert stored_messages(server, page, "instant") == []
    page.wait_for_selector("#conn[data-state=open]")  # the conversation reopened after the reset
    # broadcasts and pushes arrive as notices, dismissable
    status, body = server.rest("/api/v1/broadcast", "POST", {"message": "maintenance at <b>18:00</b>"})
    assert status == 200 and body["data"]["delivered"] >= 1, body
    status, body = server.rest("/api/v1/users/local/push", "POST", {"message": "build finished"})
    assert status == 200 and body["data"]["delivered"] >= 1, body
    page.wait_for_selector(".notice >> text=maintenance at <b>18:00</b>")
    page.wait_for_selector(".notice >> text=build finished")
    assert page.locator(".notice b").count() == 0
    shot(page, "notices")
    page.locator(".notice", has_text="build finished").get_by_role("button", name="Dismiss").click()
    page.wait_for_function("() => document.querySelectorAll('.notice').length === 1")


def test_phone_layout_and_dark_theme(new_page, server):
    page = new_page(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True, has_touch=True)
    open_app(page, server, "default")
    assert not page.is_visible("#new-chat") or page.locator("#sidebar").bounding_box()["x"] < 0
    page.click("#toggle-sidebar")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    page.click("#toggle-sidebar")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    light_page = new_page(color_scheme="light")
    open_app(light_page, server, "default")
    assert dark != light_page.evaluate("getComputedStyle(document.body).backgroundColor")
    send(page, "hello from a phone")
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing overflows sideways
    shot(page, "phone-dark")


def test_failed_and_timed_out_replies_say_why_and_offer_retry(new_page, server):
    page = new_page()
    open_app(page, server, "keyless")
    new_chat(page)
    send(page, "hello")
    page.wait_for_selector(".msg.assistant[data-status=failed]")
    reply = last_reply(page)
    assert reply.locator(".badge").inner_text() == "Failed"
    stored = [m for m in stored_messages(server, page, "keyless") if m["role"] == "assistant"][-1]
    assert stored["status"] == "failed" and reply.locator(".reason").inner_text() != ""
    assert reply.locator("button.retry").is_visible()
    shot(page, "failed")
    reply.locator("button.retry").click()
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant[data-status=failed]').length === 2")
    page.select_option("#pipeline", "hurried")
    page.wait_for_function("() => location.hash.startsWith('#/hurried/')")
    page.wait_for_selector("#conn[data-state=open]")
    new_chat(page)
    send(page, "a long one please")
    page.wait_for_selector(".msg.assistant[data-status=timeout]")
    reply = last_reply(page)
    assert reply.locator(".badge").inner_text() == "Timed out" and reply.locator(".reason").inner_text() != ""
    assert reply.locator("button.retry").is_visible() and not page.is_visible("#stop")


def test_reconnecting_indicator_while_the_server_restarts(new_page, server):
    page = new_page()
    open_app(page, server, "slow")
    new_chat(page)
    send(page, "a reply the restart interrupts")
    page.wait_for_selector(".msg.assistant.streaming")
    server.stop()
    page.wait_for_selector("#conn[data-state=reconnecting]")
    # a countdown to the next attempt (the server stays down until started again)
    page.wait_for_function("() => /^Reconnecting in \\d+ s…$/.test(document.getElementById('conn-text').textContent)")
    assert page.is_visible("#conn-retry")
    shot(page, "reconnecting")
    server.start()
    page.wait_for_selector("#conn[data-state=open]", timeout=60_000)
    reply = last_reply(page)
    page.wait_for_selector(".msg.assistant[data-status=interrupted]")  # the reply that was cut says so
    assert reply.locator(".badge").inner_text() == "Interrupted" and reply.locator("button.retry").is_visible()
    stored = [m for m in stored_messages(server, page, "slow") if m["role"] == "assistant"][-1]
    assert stored["status"] == "interrupted" and shows(reply, stored["content"])
    send(page, "back again")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length === 2")
    page.wait_for_selector(".msg.assistant.streaming")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-status=stopped]")


def test_group_session_with_two_users(new_page, jwt_server):
    def token(user):
        return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")

    ann, bo = new_page(), new_page()
    open_app(ann, jwt_server, "default", token=token("ann"))
    ann.click("#new-group")
    ann.fill("#dialog-name", "Trip")
    ann.fill("#dialog-members", "bo")
    widths = ann.evaluate("['dialog-name', 'dialog-members'].map((id) => "
                          "document.getElementById(id).getBoundingClientRect().width)")
    assert widths[0] == widths[1] > 200  # the members field as wide as the title field
    ann.click("#dialog-ok")
    ann.wait_for_selector("#session-title >> text=Trip")
    ann.click("#toggle-members")
    ann.wait_for_selector("#member-list li[data-user=ann].is-online")
    open_app(bo, jwt_server, "default", token=token("bo"))
    bo.click("#sessions button >> text=Trip")
    bo.wait_for_selector("#session-title >> text=Trip")
    ann.wait_for_selector("#member-list li[data-user=bo].is-online")  # presence
    send(bo, "where shall we go?")
    ann.wait_for_selector(".msg.user .meta >> text=bo")
    ann.wait_for_selector(".msg.assistant[data-status=completed]")
    bo.wait_for_selector(".msg.assistant[data-status=completed]")
    assert body_text(last_reply(ann)) == body_text(last_reply(bo))
    shot(ann, "group")
    # only the owner sees member controls; removing bo takes the group away from bo's screen
    bo.click("#toggle-members")
    assert bo.locator("#add-member").is_hidden() and bo.locator("#member-list button").count() == 0
    ann.fill("#add-member-id", "cy")
    ann.press("#add-member-id", "Enter")
    ann.wait_for_selector("#member-list li[data-user=cy]:not(.is-online)")
    # bo's open panel follows the change as it happens (session.members), with no reload or refetch
    bo.wait_for_selector("#member-list li[data-user=cy]:not(.is-online)")
    cy = new_page()  # cy comes online in the group: every viewer sees it
    open_app(cy, jwt_server, "default", token=token("cy"))
    cy.click("#sessions button >> text=Trip")
    ann.wait_for_selector("#member-list li[data-user=cy].is-online")
    bo.wait_for_selector("#member-list li[data-user=cy].is-online")
    cy.click("#toggle-members")
    cy.wait_for_selector("#member-list li[data-user=bo]")
    ann.get_by_role("button", name="Remove bo").click()
    bo.wait_for_selector(".notice >> text=removed from this group")
    ann.wait_for_selector("#member-list li[data-user=bo]", state="detached")
    cy.wait_for_selector("#member-list li[data-user=bo]", state="detached")  # another member's view follows
    status, body = jwt_server.rest(f"/api/v1/pipelines/default/sessions/{session_id(ann)}", token=token("bo"))
    assert status == 404
    # a group bo is added to shows in bo's list when bo comes back to the tab
    status, body = jwt_server.rest("/api/v1/pipelines/default/sessions", "POST",
                                   {"session_type": "group", "title": "Dinner", "members": ["bo"]}, token=token("ann"))
    assert status == 201, body
    bo.evaluate("() => document.dispatchEvent(new Event('visibilitychange'))")
    bo.wait_for_selector("#sessions button >> text=Dinner")


def test_an_expired_jwt_leads_back_to_sign_in(new_page, jwt_server):
    expires = int(time.time()) + 4
    page = new_page()
    open_app(page, jwt_server, "default",
             token=jwt.encode({"sub": "dee", "exp": expires}, JWT_SECRET, algorithm="HS256"))
    while time.time() < expires + 1.5:  # bounded: a few seconds
        time.sleep(0.25)
    jwt_server.stop()  # the connection drops; the reconnect presents the expired JWT and is refused (4401)
    jwt_server.start()
    page.wait_for_selector("#signin:not([hidden])", timeout=60_000)
    assert "sign in again" in page.inner_text("#signin-error")
    assert page.evaluate("() => sessionStorage.getItem('parley.token')") is None
    # a fresh JWT typed into the form gets back in, as the same user
    fresh = jwt.encode({"sub": "dee", "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256")
    page.fill("#signin-token", fresh)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#conn[data-state=open]")
    assert page.inner_text("#whoami") == "dee"


def png(width, height, pixel):
    """A PNG (8-bit RGB) whose pixel (x, y) is pixel(x, y) -> (r, g, b)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + b"".join(bytes(pixel(x, y)) for x in range(width)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def image_parts(upstream, count):
    """The image_url parts of the last user turn the upstream got, once it has had `count` requests."""
    deadline = time.monotonic() + WAIT / 1000
    while len(upstream.calls()) < count:
        assert time.monotonic() < deadline, "the model was never asked"
        time.sleep(0.1)
    content = upstream.calls()[count - 1].body["messages"][-1]["content"]
    assert isinstance(content, list), content
    return content[0], [p["image_url"]["url"] for p in content[1:] if p["type"] == "image_url"]


def test_an_image_attached_reaches_a_pipeline_that_takes_images(new_page, server, upstream):
    dot = png(8, 8, lambda x, y: (200, 40 + 20 * x, 20 * y))
    page = new_page()
    open_app(page, server, "vision")
    new_chat(page)
    page.wait_for_selector("#attach:not([hidden])")
    assert page.get_attribute("#attach", "aria-label") == "Attach images"
    # preview, then remove before sending
    page.set_input_files("#attach-file", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": dot}])
    page.wait_for_selector("#attachments .attachment img")
    page.get_by_role("button", name="Remove dot.png").click()
    page.wait_for_selector("#attachments", state="hidden")
    # pasting an image into the message box attaches it too
    page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
        document.getElementById('input').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""", base64.b64encode(dot).decode())
    page.wait_for_selector("#attachments .attachment >> text=pasted.png")
    page.get_by_role("button", name="Remove pasted.png").click()
    page.wait_for_selector("#attachments", state="hidden")
    # a type the models do not take is refused with a clear message
    page.set_input_files("#attach-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}])
    page.wait_for_selector(".notice >> text=notes.txt: only PNG, JPEG, GIF or WebP images can be attached.")
    page.set_input_files("#attach-file", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": dot}])
    page.wait_for_selector("#attachments .attachment img")
    assert page.locator("#attachments .attachment").count() == 1
    shot(page, "image-attached")
    calls = len(upstream.calls())
    send(page, "what is this?")
    page.wait_for_selector("#attachments", state="hidden")
    text, urls = image_parts(upstream, calls + 1)
    expected = "data:image/png;base64," + base64.b64encode(dot).decode()
    assert text == {"type": "text", "text": "what is this?"} and urls == [expected]
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    assert body_text(last_reply(page)) == "A small picture."
    user = page.locator(".msg.user:not(.pending)")
    # the message names the uploaded file; the page shows it by fetching it with its token
    shown = "() => { const i = document.querySelector('.msg.user:not(.pending) .images img'); " \
            "return i && i.src.startsWith('blob:') && i.complete && i.naturalWidth === 8; }"
    page.wait_for_function(shown)
    assert user.locator(".body").inner_text() == "what is this?"
    stored = [m for m in stored_messages(server, page, "vision") if m["role"] == "user"]
    assert stored[-1]["message_chain"][0] == {"type": "Plain", "text": "what is this?"}
    assert set(stored[-1]["message_chain"][1]) == {"type", "path"}
    shot(page, "image-sent")
    # history shows it after a reload
    page.reload()
    page.wait_for_selector("#conn[data-state=open]")
    page.wait_for_function(shown)
    # a pipeline that does not take images shows no attach control
    page.select_option("#pipeline", "default")
    page.wait_for_function("() => location.hash.startsWith('#/default/')")
    page.wait_for_selector("#conn[data-state=open]")
    assert page.locator("#attach").is_hidden() and page.locator("#attachments").is_hidden()
    assert page.errors == []


def test_a_large_photo_is_shrunk_to_fit_and_a_refused_image_says_why(new_page, server, upstream):
    rng = random.Random(7)
    noise = png(400, 300, lambda x, y: (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    assert len(noise) > MAX_IMAGE
    page = new_page()
    open_app(page, server, "vision")
    new_chat(page)
    page.set_input_files("#attach-file", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": noise}])
    page.wait_for_selector("#attachments .attachment img")
    upstream.plan(Script(status=400), Script(content=["Noise."]))  # the first answer fails
    calls = len(upstream.calls())
    page.press("#input", "Enter")  # an image alone may be sent
    _, urls = image_parts(upstream, calls + 1)
    assert len(urls) == 1 and urls[0].startswith("data:image/jpeg;base64,")
    assert len(base64.b64decode(urls[0].split(",", 1)[1])) <= MAX_IMAGE
    page.wait_for_selector(".msg.assistant[data-status=failed]")
    last_reply(page).locator("button.retry").click()  # Retry sends the image again
    _, again = image_parts(upstream, calls + 2)
    assert again == urls
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    assert body_text(last_reply(page)) == "Noise."
    assert page.locator(".msg.user .images img").count() == 1  # the same message, answered again
    upstream.plan(Script(content=["A ", "small ", "picture."]))
    # labelled PNG, but not an image: the server refuses it, the page says why and keeps it to send again
    page.set_input_files("#attach-file", files=[{"name": "fake.png", "mimeType": "image/png", "buffer": b"not a png"}])
    page.wait_for_selector("#attachments .attachment img")
    send(page, "and this?")
    page.wait_for_selector(".notice >> text=an image must be PNG, JPEG, GIF or WebP")
    page.wait_for_selector("#attachments .attachment")
    assert page.input_value("#input") == "and this?"
    assert len(upstream.calls()) == calls + 2
    assert page.errors == []


def unlabelled_controls(page):
    """Visible controls without an accessible name (label, aria-label, aria-labelledby, text or title)."""
    return page.evaluate("""() => [...document.querySelectorAll('button, input, select, textarea, [tabindex]')]
        .filter((e) => e.offsetParent !== null || e.getClientRects().length)
        .filter((e) => !(e.getAttribute('aria-label') || e.getAttribute('aria-labelledby') ||
                         (e.labels && e.labels.length) || (e.tagName === 'BUTTON' && e.textContent.trim()) || e.title))
        .map((e) => e.outerHTML.slice(0, 120))""")


def test_offline_then_online_and_every_control_has_a_name(new_page, server):
    page = new_page()
    open_app(page, server, "vision")
    new_chat(page)
    assert unlabelled_controls(page) == []
    assert page.get_attribute("#conn", "role") == "status"
    page.context.set_offline(True)
    page.wait_for_selector("#conn[data-state=offline]")
    assert page.inner_text("#conn-text") == "Offline"
    shot(page, "offline")
    page.context.set_offline(False)
    page.wait_for_selector("#conn[data-state=open]")
    assert page.inner_text("#conn-text") == "Connected"
    send(page, "still there?")
    page.wait_for_selector(".msg.assistant[data-status=completed]")
    # on a phone too, with the conversation list open
    phone = new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    open_app(phone, server, "vision")
    phone.click("#toggle-sidebar")
    phone.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().x >= 0")
    assert unlabelled_controls(phone) == []
    phone.click("#toggle-sidebar")
    phone.set_input_files("#attach-file", files=[{"name": "a-long-file-name.png", "mimeType": "image/png",
                                                  "buffer": png(4, 4, lambda x, y: (0, 90, 200))}])
    phone.wait_for_selector("#attachments .attachment img")
    phone.fill("#input", "an image from a phone")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    shot(phone, "phone-attach")
    assert page.errors == [] and phone.errors == []


STREAMING_CASES = [  # what a reply cut mid-stream shows: open emphasis and code closed, a bare opener left out
    ("- **How to try", "- **How to try**"),
    ("**bold** and *it", "**bold** and *it*"),
    ("a **b *c", "a **b *c***"),
    ("~~gone", "~~gone~~"),
    ("call `make ru", "call `make ru`"),
    ("```python\ndef f():\n    return 1", "```python\ndef f():\n    return 1\n```"),
    ("```\ndone\n```\nthen **more", "```\ndone\n```\nthen **more**"),
    ("text **", "text"),
    ("snake_case and 2 * 3", "snake_case and 2 * 3"),
    ("* a list item", "* a list item"),
    ("closed **bold** text", "closed **bold** text"),
]


def test_a_streaming_reply_never_shows_raw_markdown_markers(new_page, server):
    page = new_page()
    open_app(page, server, "slow")
    shown = page.evaluate("(cases) => cases.map(([text]) => window.ParleyApp.closeOpenMarkdown(text))",
                          STREAMING_CASES)
    assert shown == [want for _, want in STREAMING_CASES]
    new_chat(page)
    # every state the streaming reply's body shows: never a `**` the renderer left as text
    page.evaluate("""() => {
        window.__raw = [];
        new MutationObserver(() => {
            const body = document.querySelector('.msg.assistant.streaming .body');
            if (body && body.innerText.includes('**')) window.__raw.push(body.innerText.slice(-80));
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "how to try streaming")
    page.wait_for_function("() => document.querySelector('.msg.assistant.streaming .body strong')")
    page.wait_for_function("() => document.querySelector('.msg.assistant.streaming .body')?.innerText.includes("
                           "'How to try it')")  # past the demo's bold list items
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-status=stopped]")
    assert page.evaluate("window.__raw") == []
    assert page.errors == []


def test_emoji_render_in_colour(new_page, server):
    require(os.path.exists("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
            "no colour emoji font (Debian package fonts-noto-color-emoji, .ci/apt-packages)")
    page = new_page()
    open_app(page, server, "instant")
    families = page.evaluate("getComputedStyle(document.body).fontFamily")
    assert "Noto Color Emoji" in families  # the page declares emoji fonts as the last fallback
    # drawn with the page's own font, 🙂 has colour (a missing glyph is a grey or black box)
    coloured = page.evaluate("""() => {
        const canvas = document.createElement('canvas');
        canvas.width = canvas.height = 64;
        const ctx = canvas.getContext('2d');
        ctx.font = '40px ' + getComputedStyle(document.body).fontFamily;
        ctx.fillText('🙂', 4, 48);
        const px = ctx.getImageData(0, 0, 64, 64).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
            const [r, g, b, a] = [px[i], px[i + 1], px[i + 2], px[i + 3]];
            if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) n++;
        }
        return n;
    }""")
    assert coloured > 50
