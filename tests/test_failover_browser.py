"""The web app through make cluster's nginx while the instance serving it is killed mid-reply (issues 21, 23):
it says at once what happened (no blinking caret, no Stop while away), reconnects elsewhere, and the same bubble
goes on to the whole answer — no second bubble, nothing erased but the unsaved tail."""
import os
import time
import urllib.request

import pytest

from tests.cluster import cluster, demo_text, token  # noqa: F401 (a fixture)
from tests.conftest import require
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT, send

QUESTION = "keep going when the server dies"


@pytest.fixture
def page():
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed (pip install -e '.[test]')")
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        p = browser.new_context().new_page()
        p.set_default_timeout(WAIT)
        p.errors = []
        p.on("pageerror", lambda exc: p.errors.append(str(exc)))
        yield p
    finally:
        browser.close()
        pw.stop()


def serving(cluster):
    """The instance nginx sends this machine's browser to (it connects from 127.0.0.1: ip_hash is stable)."""
    with urllib.request.urlopen(cluster.url + "/healthz", timeout=30) as r:
        return cluster.by_id(r.headers["X-Parley-Instance"])


def test_the_web_app_shows_a_reply_going_on_after_its_server_is_killed(page, cluster, tmp_path):
    page.goto(f"{cluster.url}/?token={token('webfail')}#/medium")
    page.wait_for_selector("#conn[data-state=open]")
    send(page, QUESTION)
    bubble = page.locator(".msg.assistant")
    page.wait_for_function("() => (document.querySelector('.msg.assistant .body') || {}).textContent?.length > 150")
    owner = serving(cluster)
    owner.proc.kill()
    owner.proc.wait()
    try:
        # it says so at once: no caret, no Stop, a line saying why; the text stays
        page.wait_for_selector(".msg.assistant.paused .live-note:not([hidden])")
        assert page.locator("#stop").is_hidden()
        assert len(bubble.locator(".body").inner_text()) > 100
        page.screenshot(path=str(tmp_path / "failover-away.png"))
        # back through another instance, the same bubble goes on, and ends with the whole answer
        page.wait_for_selector("#conn[data-state=open]", timeout=60_000)
        page.wait_for_selector(".msg.assistant[data-status=completed]", timeout=60_000)
        page.screenshot(path=str(tmp_path / "failover-done.png"))
        assert bubble.count() == 1, "a second bubble for the same reply"
        _, answer = demo_text("medium", QUESTION)
        # Markdown is rendered (code fences become blocks with a Copy button): compare the words
        shown = [w for w in bubble.locator(".body").inner_text().split() if w != "Copy"]
        words = [w.lstrip("-*`").rstrip("*`") for w in answer.split() if not w.startswith("```")]
        words = [w for w in words if w]
        assert [w.strip("*`") for w in shown[-6:]] == words[-6:], shown[-20:]
        assert len(shown) >= len(words) - 10  # all of it
        assert page.locator(".msg.assistant .live-note").is_hidden()
        assert not page.errors
    finally:
        owner.start()
        owner.wait_ready()
        time.sleep(0.5)
