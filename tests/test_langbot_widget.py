"""LangBot's own embed widget (its `src/langbot/templates/embed/widget.js`), hosted by a site with its placeholders
filled in by hand, against Parley's routes in Chromium: it connects, chats, shows the history after a reload,
rates a reply and resets, and never shows an error.

LangBot's widget is not part of this repository: the test takes it from LangBot's own release on PyPI
(`langbot`, Apache-2.0: the wheel's langbot/templates/embed/widget.js, downloaded once into .venv), or from the
file PARLEY_LANGBOT_WIDGET names. tests/test_embed.py drives the same routes the same way without a browser.
"""
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pymongo import MongoClient

from services.storage.embedded_mongo import free_port
from tests.conftest import TEST_TOKEN, require
from tests.test_browser import Server, browser, new_page, shot  # noqa: F401 (fixtures)

LANGBOT = "4.11.2"  # the release whose widget this test drives (2026-10)
CACHE = Path(sys.prefix) / "parley-test-cache" / f"langbot-{LANGBOT}"


def langbot_widget():
    """The path of LangBot's widget.js: PARLEY_LANGBOT_WIDGET's, or the one in LangBot's wheel from PyPI."""
    if os.environ.get("PARLEY_LANGBOT_WIDGET"):
        return os.environ["PARLEY_LANGBOT_WIDGET"]
    widget = CACHE / "widget.js"
    if not widget.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", f"langbot=={LANGBOT}", "--no-deps",
                              "--only-binary", ":all:", "--quiet", "-d", str(CACHE)],
                             capture_output=True, text=True, timeout=600)
        wheels = list(CACHE.glob(f"langbot-{LANGBOT}-*.whl"))
        require(got.returncode == 0 and wheels, f"LangBot {LANGBOT} from PyPI (for its widget.js): "
                                                 f"{got.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = widget.with_suffix(".part")
            partial.write_bytes(wheel.read("langbot/templates/embed/widget.js"))
            partial.replace(widget)
        wheels[0].unlink()
    return str(widget)

PIPELINES = """
[pipelines.help]
provider = "demo"
options = {{ words = 40, rate = 100 }}
embed = {{ bot = "3f1c9a2e-0b7d-4c61-9f35-1d2e3c4b5a69", origins = ["{page}"] }}
"""
BOT = "3f1c9a2e-0b7d-4c61-9f35-1d2e3c4b5a69"
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>A site</title></head>
<body><h1>A site with LangBot's widget</h1><script src="/widget.js" data-title="Help"></script></body></html>"""


class Site(BaseHTTPRequestHandler):
    """The site: its page, and LangBot's widget as a site hosts it (placeholders filled in by hand)."""

    def do_GET(self):
        if self.path.startswith("/widget.js"):
            body, kind = self.server.widget, "application/javascript; charset=utf-8"
        else:
            body, kind = PAGE.encode(), "text/html; charset=utf-8"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory, mongo_url):
    port = free_port()
    page = f"http://localhost:{port}"
    parley = Server(tmp_path_factory.mktemp("lbwidget"), mongo_url, "--token", TEST_TOKEN)
    (parley.tmp / "pipelines.toml").write_text(PIPELINES.format(page=page))
    parley.start()
    with open(langbot_widget(), encoding="utf-8") as f:
        script = f.read()
    filled = (script.replace("__LANGBOT_BOT_UUID__", BOT).replace("__LANGBOT_BASE_URL__", parley.url)
              .replace("__LANGBOT_LOCALE__", "en_US").replace("__LANGBOT_TURNSTILE_SITE_KEY__", "")
              .replace("__LANGBOT_BUBBLE_ICON__", "logo").replace("__LANGBOT_PIPELINE_UUID__", BOT))
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Site)
    httpd.widget = filled.encode()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield page, parley
    httpd.shutdown()
    parley.stop()


def messages(parley):
    db = parley.args[parley.args.index("--db-name") + 1]
    with MongoClient(parley.args[parley.args.index("--mongo-url") + 1]) as client:
        return list(client[db].messages.find({"pipeline": "help"}).sort("seq", 1))


def metric(parley, name, labels):
    with urllib.request.urlopen(parley.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = re.escape(name) + r"\{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + r"\} ([0-9.]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def wait(condition, what, seconds=20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_langbots_widget_chats_reloads_rates_and_resets_against_parley(new_page, site):
    base, parley = site
    page = new_page()
    page.goto(base)
    page.click("button.lb-bubble")
    page.wait_for_selector(".lb-status-dot.lb-connected", state="attached")
    page.fill("textarea.lb-input", "Hello from LangBot's widget")
    page.press("textarea.lb-input", "Enter")
    page.wait_for_selector(".lb-msg-assistant .lb-msg-actions:not(.lb-msg-actions-hidden)", state="attached")
    reply = page.locator(".lb-msg-assistant .lb-msg-bubble").last.inner_text()
    assert 'You said "Hello from LangBot' in reply
    wait(lambda: [m["status"] for m in messages(parley)] == ["completed", "completed"], "the exchange is stored")
    # a reload: the same browser session's id (sessionStorage) brings the history back
    page.reload()
    page.click("button.lb-bubble")
    page.wait_for_selector(".lb-status-dot.lb-connected", state="attached")
    page.wait_for_function("() => document.querySelector('#langbot-widget-root').shadowRoot"
                           ".querySelectorAll('.lb-msg').length === 2")
    assert "Hello from LangBot's widget" in page.locator(".lb-msg-user").first.inner_text()
    shot(page, "langbot-widget")
    # a thumbs up: LangBot's widget names no visitor when it rates, so it is counted
    page.locator(".lb-msg-assistant .lb-act-btn").nth(1).click()
    wait(lambda: metric(parley, "parley_embed_feedback_total",
                        {"pipeline": "help", "rating": "like", "stored": "false"}) == 1.0, "the rating is counted")
    # reset: the conversation is gone from the store too
    page.get_by_role("button", name="Reset conversation").click()
    wait(lambda: messages(parley) == [], "the reset reached the store")
    assert page.locator(".lb-error").count() == 0  # LangBot's widget never showed an error
    assert page.errors == []
