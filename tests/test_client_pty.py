"""The terminal client under a real pseudo-terminal, as a person types into it: local commands never reach the
model, a missing token is explained at once, and a reply streams to the screen."""
import asyncio
import os
import pty
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.gen_test(timeout=60)
ROOT = Path(__file__).resolve().parent.parent


class Terminal:
    """A child process on a pty: `expect` reads the screen until a pattern shows (bounded), `type` types a line."""

    def __init__(self, *args, env=None, argv=None, cwd=None):
        self.master, slave = pty.openpty()
        cwd = cwd or tempfile.mkdtemp()  # not the repository: a `make run` there (data/server.json) must not help
        if argv is None:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}, **(env or {})}
        argv = argv or [sys.executable, str(ROOT / "client.py"), *args]
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        os.set_blocking(self.master, False)
        self.screen = ""
        self.transcript = ""  # everything shown, expects or not

    @classmethod
    def command(cls, argv, *, cwd, env):
        """Any program (e.g. `make client`) on a pty, with exactly this environment."""
        return cls(argv=argv, cwd=cwd, env=env)

    def _found(self, pattern):
        self._read()
        found = re.search(pattern, self.screen, re.S)
        if found:
            self.screen = self.screen[found.end():]
        return found

    def _late(self, pattern):
        return f"{pattern!r} did not appear; screen: {self.screen[-2000:]!r}"

    async def expect(self, pattern, timeout=20):
        """Wait until `pattern` (a regex) appears on the screen after what earlier expects consumed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (found := self._found(pattern)):
            assert loop.time() < deadline, self._late(pattern)
            await asyncio.sleep(0.02)
        return found

    def expect_sync(self, pattern, timeout=30):
        """`expect` for a test without an event loop (the server is another process)."""
        deadline = time.monotonic() + timeout
        while not (found := self._found(pattern)):
            assert time.monotonic() < deadline, self._late(pattern)
            time.sleep(0.02)
        return found

    def wait_sync(self, timeout=30):
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self._read()
            assert time.monotonic() < deadline, "the program did not exit"
            time.sleep(0.02)
        self._read()
        return self.proc.returncode

    def _read(self):
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (BlockingIOError, OSError):  # nothing yet, or the child closed its side (EIO)
                return
            if not chunk:
                return
            text = chunk.decode(errors="replace").replace("\r\n", "\n")
            self.screen += text
            self.transcript += text

    def type(self, line):
        os.write(self.master, (line + "\n").encode())

    async def exit_code(self, timeout=20):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None:
            self._read()
            assert loop.time() < deadline, "the client did not exit"
            await asyncio.sleep(0.02)
        self._read()
        return self.proc.returncode

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    opened = []

    def start(*args, **kw):
        t = Terminal(*args, **kw)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


async def user_messages(services):
    return [d["content"] async for d in services.store.messages.find({"role": "user"}).sort("created_at", 1)]


async def test_local_commands_never_reach_the_model(terminal, base_url, services):
    t = terminal("default", "--url", base_url, env={"PARLEY_TOKEN": TEST_TOKEN})
    await t.expect(r"connected to default \(session \w+\); type /help")
    t.type("/help")
    for command in ("/stop", "/resume", "/sessions", "/quit"):
        await t.expect(re.escape(command))
    t.type("/nonsense")
    await t.expect(r"unknown command /nonsense")
    t.type("hello there")
    await t.expect(r"\[completed\]")
    t.type("/sessions")
    await t.expect(r"\* \w+\s+person\s+2 messages\s+hello there")  # named after its first message
    t.type("/resume")  # the reply is complete: the server confirms we have all of it
    await t.expect(r"\[resuming \w+ at \d+: completed\]")
    t.type("/stop")
    t.type("//slash is text")
    await t.expect(r"\[completed\]")
    t.type("/quit")
    assert await t.exit_code() == 0
    assert await user_messages(services) == ["hello there", "/slash is text"]


async def test_a_reply_streams_onto_the_screen(terminal, base_url, services):
    t = terminal("--url", base_url.replace("http", "ws", 1) + "/?token=" + TEST_TOKEN)  # the URL make run prints
    await t.expect(r"connected to default")
    t.type("what is a resumable stream?")
    shown = (await t.expect(r"stream\?\n(.*)\n\[completed\]")).group(1)  # after the echo of the line we typed
    t.type("/quit")
    assert await t.exit_code() == 0
    reply = (await services.store.messages.find_one({"role": "assistant"}))["content"]
    assert shown.strip() == reply.strip() and len(reply) > 20


async def test_stop_from_the_terminal_stops_the_reply(terminal, base_url, services):
    t = terminal("slow", "--url", base_url, "--token", TEST_TOKEN)
    await t.expect(r"connected to slow")
    t.type("write a lot")
    await t.expect(r"write a lot\n[^\n]{20,}")  # past the echo of what we typed: the reply is streaming
    t.type("/stop")
    await t.expect(r"\[stopped\]")
    t.type("/quit")
    assert await t.exit_code() == 0
    assert await user_messages(services) == ["write a lot"]
    assert (await services.store.messages.find_one({"role": "assistant"}))["status"] == "stopped"


async def test_without_a_token_the_client_says_what_to_do_at_once(terminal, base_url, services):
    t = terminal("--url", base_url)
    await t.expect(r"needs a token\. Pass --token TOKEN .*PARLEY_TOKEN.*make run")
    assert await t.exit_code() == 1
    assert services.hub.connections == {}  # it never opened a socket to wait on the server's auth timeout


async def test_a_wrong_pipeline_or_a_dead_server_is_explained(terminal, base_url, services):
    t = terminal("nope", "--url", base_url, "--token", TEST_TOKEN)
    await t.expect(r"no pipeline 'nope' on this server; it has: default")
    assert await t.exit_code() == 1
    from services.storage.embedded_mongo import free_port
    t = terminal("--url", f"ws://127.0.0.1:{free_port()}", "--token", TEST_TOKEN)
    await t.expect(r"cannot reach Parley at http://127\.0\.0\.1:\d+ .*make run")
    assert await t.exit_code() == 1


def test_without_its_dependencies_client_py_says_how_to_run_it(tmp_path):
    # A Python without Tornado: the system interpreter in isolated mode, with the repository not on its path.
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", "import tornado"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("this interpreter has Tornado even with site-packages off")
    out = subprocess.run([sys.executable, "-I", "-S", str(ROOT / "client.py"), "--help"], capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "make client" in out.stderr and ".venv/bin/parley-client" in out.stderr


class PacedServer:
    """A real server (embedded store, one paced demo pipeline) that a test starts, kills and starts again on one
    port; `history()` waits until it answers and returns the session's messages."""

    def __init__(self, tmp_path, *extra):
        from services.storage.embedded_mongo import free_port
        self.tmp_path, self.extra, self.port, self.proc = tmp_path, extra, free_port(), None
        self.pipelines = tmp_path / "pipelines.toml"
        self.pipelines.write_text('[pipelines.paced]\nprovider = "demo"\nmodel = "demo"\n'
                                  '[pipelines.paced.options]\nwords = 400\nrate = 80\n')

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        with open(self.tmp_path / "server.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "server.py", "--port", str(self.port), "--data-dir",
                                          str(self.tmp_path), "--token", TEST_TOKEN, "--pipelines",
                                          str(self.pipelines), *self.extra],
                                         cwd=ROOT, env=env, stdout=log, stderr=log)
        return self.proc

    def history(self):
        import json
        import urllib.request
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, (self.tmp_path / "server.log").read_text()[-2000:]
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/pipelines/paced/ws/messages/"
                                                 "person", headers={"Authorization": f"Bearer {TEST_TOKEN}"})
                with urllib.request.urlopen(request, timeout=5) as r:
                    return json.loads(r.read())["data"]["messages"]
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)


def test_the_client_survives_its_servers_restart_and_resumes_the_reply(terminal, tmp_path):
    """A real server (embedded store, a paced pipeline) restarted under the client mid-reply: the client says so,
    reconnects, gets the rest of the reply (ended `interrupted` by the shutdown) from its offsets, and chats on."""
    import signal
    paced = PacedServer(tmp_path, "--drain-timeout", "0")
    start, history, port = paced.start, paced.history, paced.port
    server = start()
    try:
        history()
        t = terminal("paced", "--url", f"http://127.0.0.1:{port}", "--token", TEST_TOKEN)
        t.expect_sync(r"connected to paced")
        t.type("tell me about restarts")
        t.expect_sync(r'You said "tell me about restarts"\.\n\n[^\n\[]{40,}')  # the reply streams
        server.send_signal(signal.SIGTERM)
        t.expect_sync(r"\[the connection to the server was lost \(server: server restarting\); reconnecting…\]")
        assert server.wait(60) == 0
        server = start()
        t.expect_sync(r"\[reconnected \(session \w+\)\]", timeout=60)
        t.expect_sync(r"\[resuming \w+ at \d+: interrupted\]")
        t.expect_sync(r"\[interrupted\]")
        t.type("and after it?")
        t.expect_sync(r"\[completed\]", timeout=60)
        t.type("/quit")
        assert t.wait_sync() == 0
        cut = history()[1]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    assert "Traceback" not in t.transcript
    assert cut["status"] == "interrupted" and len(cut["content"]) > 40
    # what the screen shows of the reply, the client's notes aside, is the stored text: no gap, no repeat
    shown = t.transcript.split("tell me about restarts\n", 1)[1].split("\n[interrupted]", 1)[0]
    shown = "".join(line for line in shown.split("\n") if not re.fullmatch(r"\[.*\]", line))
    assert "".join(shown.split()) == "".join(cut["content"].split())


async def test_reasoning_shows_apart_from_the_answer(terminal, base_url, services):
    t = terminal("thinker", "--url", base_url, "--token", TEST_TOKEN)
    await t.expect(r"connected to thinker")
    t.type("why is the sky blue?")
    # dimmed, after a label, and the answer on a line of its own after it
    found = await t.expect(r"thinking: \x1b\[2m(.*?)\n\nYou said \"why is the sky blue\?\"\..*?\n\[completed\]")
    reply = await services.store.messages.find_one({"role": "assistant"})
    assert re.sub(r"\x1b\[[0-9]*m", "", found.group(1)) == reply["thinking"]
    t.type("/quit")
    assert await t.exit_code() == 0

    hidden = terminal("thinker", "--url", base_url, "--token", TEST_TOKEN, "--thinking", "hide")
    await hidden.expect(r"connected to thinker")
    hidden.type("and the sea?")
    await hidden.expect(r"and the sea\?\nYou said \"and the sea\?\"\..*?\n\[completed\]")
    assert "thinking" not in hidden.transcript
    hidden.type("/quit")
    assert await hidden.exit_code() == 0


def test_after_its_server_is_killed_the_client_shows_the_reply_going_on(terminal, tmp_path):
    """kill -9 of the server mid-reply, then the same server again: it goes on with the reply from its last
    checkpoint (its own, from before the restart); the client reconnects, is told where the reply goes on from
    (dropping what it held past that, with a note), and shows the rest: the reply ends `completed`, stored as the
    demo's whole answer."""
    import signal

    from services.operations.pipelines import Pipeline
    from services.providers.demo import DemoProvider
    paced = PacedServer(tmp_path)
    start, history, port = paced.start, paced.history, paced.port
    server = start()
    try:
        history()
        t = terminal("paced", "--url", f"http://127.0.0.1:{port}", "--token", TEST_TOKEN)
        t.expect_sync(r"connected to paced")
        t.type("tell me about crashes")
        t.expect_sync(r'You said "tell me about crashes"\.\n\n[^\n\[]{80,}')  # the reply streams
        server.kill()
        server.wait(60)
        server = start()
        t.expect_sync(r"\[reconnected \(session \w+\)\]", timeout=60)
        t.expect_sync(r"\[resuming \w+ at \d+: streaming\]")
        t.expect_sync(r"\[completed\]", timeout=60)
        t.type("/quit")
        assert t.wait_sync() == 0
        reply = history()[1]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    assert "Traceback" not in t.transcript
    _, whole = DemoProvider(Pipeline(id="paced", options={"words": 400, "rate": 80})).whole("tell me about crashes")
    assert reply["status"] == "completed" and reply["content"] == whole
    # the screen, from where the reply went on: exactly the stored text from there
    at = int(re.findall(r"\[resuming \w+ at (\d+): streaming\]", t.transcript)[-1])
    after = t.transcript.rsplit("streaming]\n", 1)[1].split("\n[completed]", 1)[0]
    after = "".join(line for line in after.split("\n") if not re.fullmatch(r"\[.*\]", line))
    assert "".join(after.split()) == "".join(whole[at:].split())
