"""Every code block in README.md and docs/*.md runs as written, or is checked by the tool it is written for.

Blocks run in document order in one working directory that looks like a checkout (the repository's files linked
into it, `.venv` too). What the test changes, and only that: the address (127.0.0.1:8888 becomes a free port, the
server gets PARLEY_PORT), a `…` standing for the token becomes the running server's token, and `make <target>`
runs with `-o` for the install stamps (tests/test_install.py installs for real). By language:

- python: run (a block starting `# <name>.py:` is written to that file for the shell lines after it);
  json: parsed; toml: parsed, and pipelines loaded the way the server loads them (`# <name>.toml` is written to
  that file); yaml, promql: checked by promtool, as Prometheus would read them;
- shell: `make run` / `parley serve` lines start the server for real (one naming an unreachable host is only
  checked by the option parser); `make client` and every other command runs and must succeed; `make test` is
  this suite; `make bench`, bench and scripts commands (the house runs no benchmark in the suite) are checked by
  their own argument parser (`--help` lists every option the line uses);
- html: each `<script src>` is the widget route (/api/v1/embed/<bot>/widget.js) of a bot a TOML block before it
  declared;
- the diagrams, the layout tree and the rooms' list in FIGURES are text, not commands (tests/test_layout.py
  checks the rooms' list).

A block this test does not know fails it: give it a check here.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from services.operations import settings
from services.operations.pipelines import load_pipelines
from services.storage.embedded_mongo import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FIGURES = [("README.md", "server.py      config"), ("architecture.md", "streams.py (reply.started"),
           ("architecture.md", "client         nginx"), ("architecture.md", "client                 B"),
           ("architecture.md", "viewer(A)   A (owner)"), ("architecture.md", "services/replies/ ")]
PRINTS = {  # what a block's output must be, beyond running
    # the reply once, not the whole growing text at every frame
    ("README.md", "import asyncio, json, os"): lambda out: out.startswith("connected\n") and
    out.count('You said "hi"') == 1 and out.strip().endswith("real answers.)"),
    ("providers.md", "import asyncio"): lambda out: out.startswith("429 first\nHi!\n"),
}
LINKED = ("Makefile", "setup.cfg", "pyproject.toml", "server.py", "client.py", "services", "handlers", "parley",
          "static", "nginx", "bench", "scripts", "tests", ".venv")
STAMPS = "-o .venv/.installed -o .venv/.installed-test"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def doc_blocks():
    for path in DOCS:
        for n, match in enumerate(BLOCK.finditer(path.read_text())):
            yield path.name, n, match.group(1), match.group(2)


class Workdir:
    """The directory the blocks run in, and the server the latest `make run` line started there."""

    def __init__(self, path):
        self.path = path
        for name in LINKED:
            (path / name).symlink_to(ROOT / name)
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        self.env["PARLEY_PORT"] = str(self.port)
        self.server = None
        self.token = None
        self.ran = []  # (file, what) for the record

    def fill(self, text):
        text = text.replace("127.0.0.1:8888", f"127.0.0.1:{self.port}")
        return text.replace("…", self.token) if self.token else text

    def bash(self, line, timeout=60, stdin=subprocess.DEVNULL):
        out = subprocess.run(["bash", "-c", line], cwd=self.path, env=self.env, capture_output=True, text=True,
                             timeout=timeout, stdin=stdin)
        assert out.returncode == 0, f"{line!r} failed ({out.returncode}):\n{out.stdout[-1500:]}\n{out.stderr[-1500:]}"
        return out

    def start(self, line):
        self.stop()
        self.server = subprocess.Popen(["bash", "-c", line], cwd=self.path, env=self.env,
                                       stdout=open(self.path / f"server-{time.monotonic_ns()}.log", "wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            assert self.server.poll() is None, f"{line!r} exited with {self.server.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"{line!r}: the server did not come up"
                time.sleep(0.1)
        info = json.loads((self.path / "data" / "server.json").read_text())
        self.token = info["token"]

    def stop(self):
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGINT)
            self.server.wait(60)
        self.server = None


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = Workdir(tmp_path_factory.mktemp("docs"))
    yield w
    w.stop()


def words_of(line):
    words = shlex.split(line, comments=True)
    assignments = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    return assignments, words


def check_options(argv, line):
    """A measuring command is not run: its own parser must know every option the line uses."""
    helped = subprocess.run(argv + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, f"{line!r}: --help failed: {helped.stderr[-1500:]}"
    for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
        assert option in helped.stdout, f"{line!r}: {option} is not an option of {argv}"


def run_shell_line(work, line):
    assignments, words = words_of(line)
    if not words:
        return
    program = words[0]
    if program == "make":
        target = words[1]
        args = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        if target == "test":
            return  # this suite
        if target == "bench":
            check_options([sys.executable, "-m", "bench.run"], args.get("BENCH_ARGS", ""))
            return
        if target == "run":
            if "db.example" in line:  # no such server here: the options must parse, as the server reads them
                settings.resolve(shlex.split(args.get("ARGS", "")), {**work.env, **assignments})
                return
            return work.start(work.fill(line.replace("make run", f"make {STAMPS} run", 1)))
        out = work.bash(work.fill(line.replace(f"make {target}", f"make {STAMPS} {target}", 1)))
        if target == "client":  # interactive: it connects, and ends at the end of its input
            assert re.search(r"connected to \w+ \(session \w+\)", out.stderr), out.stderr[-1500:]
        return
    if program == "parley":
        check_options([sys.executable, "-m", "parley", words[1]], "")
        return
    if program == ".venv/bin/python":
        module = words[2] if words[1] == "-m" else words[1]
        path = ROOT / (module.replace(".", "/") + ".py" if words[1] == "-m" else module)
        assert path.exists(), f"{line!r}: no {path}"
        if "ArgumentParser(" in path.read_text():
            check_options([sys.executable, *words[1:3 if words[1] == "-m" else 2]], line)
        return
    if assignment := re.fullmatch(r"([A-Z_]+)=\$\((.*)\)", line.split("  #")[0].strip()):
        work.env[assignment.group(1)] = work.bash(work.fill(assignment.group(2))).stdout.strip()
        return
    out = work.bash(work.fill(line))
    if program == "curl":  # the answer, not only curl's exit status
        assert json.loads(out.stdout)["code"] == 0, out.stdout


def check_promql(tmp_path, expressions):
    require_tool("promtool")
    rules = {"groups": [{"name": "docs", "rules": [{"record": f"docs:expr{i}", "expr": e}
                                                   for i, e in enumerate(expressions)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def require_tool(name):
    from tests.conftest import require
    require(shutil.which(name) is not None, f"{name} is not installed")


def test_every_block_runs_as_written(work, tmp_path):
    done, bots = [], set()
    for name, n, lang, body in doc_blocks():
        where = f"{name} block {n + 1} ({lang or 'text'}: {body.splitlines()[0][:50]!r})"
        first = body.splitlines()[0]
        if lang == "json":
            for chunk in ([body] if body.lstrip().startswith(("{", "[")) and _whole(body) else body.splitlines()):
                if chunk.strip():
                    json.loads(chunk)
        elif lang == "toml":
            doc = tomllib.loads(body)
            target = re.match(r"# (\S+\.toml)$", first)
            path = work.path / (target.group(1) if target else f"block-{name}-{n}.toml")
            path.write_text(body)
            if "pipelines" in doc:
                bots |= {p.embed.bot for p in load_pipelines(str(path)) if p.embed is not None}
        elif lang == "yaml":
            require_tool("promtool")
            path = tmp_path / f"{name}-{n}.yml"
            path.write_text(body)
            kind = "config" if "scrape_configs" in body else "rules"
            out = subprocess.run(["promtool", "check", kind, str(path)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, f"{where}: {out.stdout}{out.stderr}"
        elif lang == "promql":
            check_promql(tmp_path, [line for line in body.splitlines() if line.strip() and not line.startswith("#")])
        elif lang == "python":
            target = re.match(r"# (\S+\.py):", first)
            if target:
                (work.path / target.group(1)).write_text(body)
            else:
                env = {**work.env, "PARLEY_TOKEN": work.token or ""}
                out = subprocess.run([sys.executable, "-c", work.fill(body)], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, f"{where}:\n{out.stdout[-1500:]}\n{out.stderr[-2000:]}"
                shows = PRINTS.get((name, first))
                assert shows is None or shows(out.stdout), f"{where} printed:\n{out.stdout[-3000:]}"
        elif lang == "html":
            sources = re.findall(r'<script src="([^"]+)"', body)
            assert sources, f"{where}: no script tag"
            for src in sources:
                route = re.fullmatch(r"https?://[^/]+/api/v1/embed/([^/]+)/widget\.js", src)
                assert route and route.group(1) in bots, f"{where}: {src} is not a declared bot's widget"
        elif lang == "" and any(name == f and first.startswith(p) for f, p in FIGURES):
            pass
        elif lang == "" and first.startswith("ws://"):  # a URL: a WebSocket to it connects
            connect(work, first)
        elif lang == "":
            for line in body.splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    run_shell_line(work, line)
        else:
            pytest.fail(f"{where}: no check for this kind of block; add one to tests/test_docs_run.py")
        done.append(where)
    work.stop()
    assert len(done) >= 40, done  # (the docs' blocks, all of them)


def _whole(body):
    try:
        json.loads(body)
        return True
    except ValueError:
        return False


def connect(work, url):
    from tornado.httpclient import HTTPRequest
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    request = urllib.request.Request(f"http://127.0.0.1:{work.port}/api/v1/pipelines",
                                     headers={"Authorization": f"Bearer {work.token}"})
    with urllib.request.urlopen(request, timeout=10) as r:  # `<pipeline>`: one the server has
        pipeline = json.loads(r.read())["data"]["pipelines"][0]["id"]

    async def hello():
        ws = await websocket_connect(HTTPRequest(work.fill(url.replace("<pipeline>", pipeline)),
                                                 headers={"Authorization": f"Bearer {work.token}"}))
        frame = json.loads(await ws.read_message())
        ws.close()
        return frame

    assert work.server is not None, "a URL block needs a server: it comes after a `make run` block"
    assert IOLoop.current().run_sync(hello, timeout=30)["type"] == "connected"


def test_make_client_multi_as_the_readme_says(tmp_path):
    """`make client ARGS="default --multi 5"` beside a `make run`: no token to copy (data/server.json)."""
    work = Workdir(tmp_path)
    try:
        work.start(f"make {STAMPS} run")
        out = work.bash(f'make {STAMPS} client ARGS="default --multi 5"', timeout=120)
        assert len(re.findall(r"conn \d: completed", out.stdout)) == 5, out.stdout + out.stderr
    finally:
        work.stop()
    assert not (tmp_path / "data" / "server.json").exists()  # removed at exit
