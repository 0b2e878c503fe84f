"""Parley's embed widget in a real browser (Debian's Chromium through Playwright), on a page of another origin:
a shop's page at http://localhost:<port> loads one <script> tag from Parley at http://127.0.0.1:<port>.

Bubble, chat in Markdown, Stop, a reload mid-reply that resumes, the page's dark theme, ratings: what the issue
asks of the widget, each checked against the store. Screenshots go to tests/artifacts/ (docs/widget.png is one).
"""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from pymongo import MongoClient

from services.storage.embedded_mongo import free_port
from tests.conftest import TEST_TOKEN
from tests.test_browser import XSS, Server, browser, new_page, shot  # noqa: F401 (fixtures)

PIPELINES = """
[pipelines.shop]          # the demo's whole answer: Markdown with a list and a code block
name = "Shop help"
provider = "demo"
options = {{ rate = 150 }}
embed = {{ bot = "shop", origins = ["{page}"], name = "Shop help" }}

[pipelines.slowshop]      # long: stopped long before its end
provider = "demo"
options = {{ words = 3000, rate = 30 }}
embed = {{ bot = "slowshop", origins = ["{page}"] }}

[pipelines.mediumshop]    # ~3 s: time to reload mid-reply
provider = "demo"
options = {{ words = 150, rate = 50 }}
embed = {{ bot = "mediumshop", origins = ["{page}"] }}
"""

PAGE = """<!doctype html>
<html lang="en"{html}><head><meta charset="utf-8"><title>Ye Olde Shop</title>
<style>body {{ font-family: Georgia, serif; margin: 0; padding: 48px; {body} }}
.card {{ max-width: 520px; padding: 24px; border-radius: 12px; border: 1px solid #8884; }}</style></head>
<body><div class="card"><h1>Ye Olde Shop</h1><p>Hand-made teapots since 1987. Questions about an order?
Ask in the chat, bottom right.</p></div>
<script src="{parley}/api/v1/embed/{bot}/widget.js" async></script></body></html>"""


class ShopPage(BaseHTTPRequestHandler):
    """Another site's page: http://localhost:<port>/?bot=…&theme=light|dark."""

    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        dark = query.get("theme", ["light"])[0] == "dark"
        body = PAGE.format(html=' data-theme="dark"' if dark else "", body="background:#15171a;color:#ddd;" if dark
                           else "background:#fbf8f1;color:#222;", parley=self.server.parley,
                           bot=query.get("bot", ["shop"])[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory, mongo_url):
    """(the shop page's base URL, the Parley server)."""
    port = free_port()
    page = f"http://localhost:{port}"
    parley = Server(tmp_path_factory.mktemp("widget"), mongo_url, "--token", TEST_TOKEN)
    (parley.tmp / "pipelines.toml").write_text(PIPELINES.format(page=page))
    parley.start()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), ShopPage)
    httpd.parley = parley.url
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield page, parley
    httpd.shutdown()
    parley.stop()


def stored(parley, **query):
    db = parley.args[parley.args.index("--db-name") + 1]
    with MongoClient(parley.args[parley.args.index("--mongo-url") + 1]) as client:
        return list(client[db].messages.find(query).sort("seq", 1))


def open_widget(page, site, bot="shop", theme="light"):
    base, _ = site
    page.goto(f"{base}/?bot={bot}&theme={theme}")
    page.click("button.bubble")  # Playwright's selectors pierce the widget's (open) shadow root
    page.wait_for_selector(".panel.open .dot.on")


def say(page, text):
    page.fill("textarea", text)
    page.press("textarea", "Enter")


def replies(page):
    return page.locator(".msg.assistant")


def theme(page):
    return page.evaluate("() => [document.querySelector('[id^=parley-widget-]').getAttribute('data-theme'), "
                         "getComputedStyle(document.querySelector('[id^=parley-widget-]').shadowRoot"
                         ".querySelector('.panel')).backgroundColor]")


def test_a_visitor_chats_on_another_sites_page_in_markdown_and_rates(new_page, site):
    page = new_page()
    base, parley = site
    page.goto(f"{base}/?bot=shop")
    page.wait_for_selector("button.bubble")
    assert page.locator(".panel.open").count() == 0
    shot(page, "widget-closed")
    page.click("button.bubble")
    page.wait_for_selector(".panel.open .dot.on")
    say(page, "Where is my teapot?")
    page.wait_for_selector(".msg.assistant .rate")  # a final reply gets its rating buttons
    reply = replies(page).last
    assert reply.inner_text().startswith('You said "Where is my teapot?"')
    assert reply.locator("li").count() >= 2 and reply.locator("pre code").count() == 1  # rendered Markdown
    assert page.locator(".msg.user").last.inner_text() == "Where is my teapot?"
    assert theme(page) == ["light", "rgb(255, 255, 255)"]
    shot(page, "widget-light")
    reply.get_by_role("button", name="Good answer").click()
    deadline = time.monotonic() + 10
    while not [m for m in stored(parley, pipeline="shop", role="assistant") if m.get("feedback")]:
        assert time.monotonic() < deadline, "the rating was not stored"
        time.sleep(0.1)
    assert stored(parley, pipeline="shop", role="assistant")[-1]["feedback"]["rating"] == "like"
    # what a model says is text, never markup the page runs
    say(page, XSS)
    page.wait_for_function("() => document.querySelector('[id^=parley-widget-]').shadowRoot"
                           ".querySelectorAll('.msg.assistant .rate').length === 2")
    assert page.evaluate("window.__pwned") is None
    assert "onerror" in replies(page).last.inner_text()
    assert replies(page).last.locator("img").count() == 0
    assert replies(page).last.locator("a[href^=javascript]").count() == 0
    # the page's origin and Parley's differ: the widget reached Parley from another site
    assert page.evaluate("location.origin") != parley.url
    assert page.errors == []


def test_stop_ends_the_reply_where_it_was(new_page, site):
    page = new_page()
    _, parley = site
    open_widget(page, site, "slowshop")
    say(page, "tell me everything")
    page.wait_for_function("() => { const m = document.querySelector('[id^=parley-widget-]').shadowRoot"
                           ".querySelector('.msg.assistant'); return m && m.textContent.length > 40; }")
    page.get_by_role("button", name="Stop the answer").click()
    page.wait_for_selector(".msg.assistant .rate")
    assert page.get_by_role("button", name="Send").is_visible()
    deadline = time.monotonic() + 10
    while stored(parley, pipeline="slowshop", role="assistant")[-1]["status"] != "stopped":
        assert time.monotonic() < deadline, "the reply was not stopped"
        time.sleep(0.1)
    final = stored(parley, pipeline="slowshop", role="assistant")[-1]
    assert len(final["content"].split()) < 3000
    assert replies(page).last.inner_text().startswith(final["content"].split("\n")[0])
    assert page.errors == []


def test_a_reload_mid_reply_reopens_and_follows_it_to_the_end(new_page, site):
    page = new_page()
    _, parley = site
    open_widget(page, site, "mediumshop")
    say(page, "a medium answer please")
    page.wait_for_function("() => { const m = document.querySelector('[id^=parley-widget-]').shadowRoot"
                           ".querySelector('.msg.assistant'); return m && m.textContent.length > 20; }")
    page.reload()
    page.wait_for_selector(".panel.open")  # it was open: it opens again, with the conversation
    page.wait_for_selector(".msg.user >> text=a medium answer please")
    page.wait_for_selector(".msg.assistant .rate", timeout=30_000)
    final = stored(parley, pipeline="mediumshop", role="assistant")[-1]
    assert final["status"] == "completed"
    shown = replies(page).last.inner_text()
    assert final["content"].split()[-1].strip("`.*") in shown and len(shown) >= len(final["content"]) * 0.8
    assert replies(page).count() == 1  # one reply, not its start and a second copy
    assert page.errors == []


def test_the_widget_follows_the_pages_dark_theme(new_page, site):
    page = new_page()
    open_widget(page, site, theme="dark")
    assert theme(page) == ["dark", "rgb(30, 33, 38)"]
    say(page, "dark mode?")
    page.wait_for_selector(".msg.assistant .rate")
    shot(page, "widget-dark")
    page.evaluate("document.documentElement.dataset.theme = 'light'")  # the page switches: the widget follows
    page.wait_for_function("() => document.querySelector('[id^=parley-widget-]').getAttribute('data-theme') === "
                           "'light'")
    # a page that says nothing of its theme: the system's
    system = new_page(color_scheme="dark")
    system.set_content("<p>no theme here</p>")
    assert system.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
    base, _ = site
    system.goto(f"{base}/?bot=shop")
    system.evaluate("document.body.style.background = 'transparent'; document.documentElement.style.background = "
                    "'transparent'")
    system.wait_for_function("() => document.querySelector('[id^=parley-widget-]')?.getAttribute('data-theme') === "
                             "'dark'")
    assert page.errors == [] and system.errors == []
