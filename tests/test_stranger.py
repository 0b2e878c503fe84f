"""The README, followed as a stranger would: a fresh `git clone`, `make run`, the terminal client, a JWT set-up from
the environment, JSON logs read line by line, options by flag, environment and config file.

To stay within a test's time, the clone reuses this checkout's .venv (a full `make install` downloads every
dependency): `make` gets `VENV=<this .venv>` and a fresh stamp, so its `run` and `client` recipes run exactly as
written, with this virtualenv's Python, on the clone's code (the script's directory comes first on sys.path).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.storage.embedded_mongo import free_port
from tests.conftest import require
from tests.test_client_pty import Terminal

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).resolve().parent.parent if (Path(sys.prefix) / "bin").exists() else None
ISO_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    require(subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode == 0,
            "this checkout is not a git repository")
    require(sys.prefix != sys.base_prefix, "the tests do not run in a virtualenv to lend the clone")
    where = tmp_path_factory.mktemp("stranger") / "parley"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(where)], check=True, timeout=120)
    stamp = where.parent / "installed.stamp"
    stamp.touch()  # newer than the clone's setup.cfg: make sees an installed virtualenv
    return where


def make_args(clone):
    return [f"VENV={sys.prefix}", f"STAMP={clone.parent / 'installed.stamp'}"]


def stranger_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    env.pop("MAKEFLAGS", None)
    return {**env, **extra}


class Run:
    """`make run` in the clone, in its own process group (so a signal reaches make and the server)."""

    def __init__(self, clone, *args, env=None):
        self.clone, self.args, self.env = clone, args, env or {}
        self._start()

    def _start(self):
        # A port another suite takes between free_port() and our bind fails the start: wait_ready starts again.
        self.port = free_port()
        self.instance = f"stranger-{self.port}-{os.getpid()}"  # so readiness is ours, not another suite's
        self.out_path = self.clone.parent / f"out-{self.instance}"
        self.err_path = self.clone.parent / f"err-{self.instance}"
        self.proc = subprocess.Popen(["make", "--no-print-directory", "run", *make_args(self.clone), *self.args],
                                     cwd=self.clone, env=stranger_env(PARLEY_PORT=str(self.port),
                                                                      PARLEY_INSTANCE_ID=self.instance, **self.env),
                                     stdout=open(self.out_path, "wb"), stderr=open(self.err_path, "wb"),
                                     start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def stdout(self):
        return self.out_path.read_text()

    def stderr(self):
        return self.err_path.read_text()

    def wait_ready(self, timeout=60, attempts=3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                attempts -= 1
                assert attempts > 0 and "Address already in use" in self.stderr(), \
                    f"make run exited: {self.stdout()} {self.stderr()}"
                self._start()
                continue
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if r.status == 200 and r.headers["X-Parley-Instance"] == self.instance:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready")

    def stop(self):
        return stop_make(self.proc)


def stop_make(proc):
    """SIGTERM to the server that `make run` started (as a service manager would), then make's exit status:
    the server's, 0 after a clean drain."""
    if proc.poll() is None:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "make run has no server process"
        for pid in children:
            os.kill(int(pid), signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the server ignored SIGTERM")
    return proc.returncode


def get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def readme(clone):
    return (clone / "README.md").read_text()


def json_lines(text):
    """Every line must be one JSON object; returns them."""
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        entry = json.loads(line)  # fails on any non-JSON line (a banner, a print)
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def test_make_run_then_the_client_as_the_readme_says(clone):
    assert [line.split()[:2] for line in readme(clone).split("```")[1].strip().splitlines()] == \
        [["make", "run"], ["make", "test"]]
    run = Run(clone)
    try:
        run.wait_ready()
        url = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", run.stdout()).group(0)  # the printed URL
        token = url.split("token=")[1]
        code, body, _ = get(url.split("?")[0], token)
        assert code == 200 and body["data"]["name"] == "Parley"

        # the README's client command, under a real terminal: make client ARGS="--url '<printed URL>'"
        term = Terminal.command(["make", "--no-print-directory", "client", *make_args(clone),
                                 f"ARGS=--url '{url}'"], cwd=clone, env=stranger_env())
        try:
            term.expect_sync(r"connected to default .*type /help")
            term.type("/help")
            term.expect_sync(r"/sessions")
            term.type("How do WebSockets work?")
            reply = term.expect_sync(r"WebSockets work\?\n(.*)\n\[completed\]").group(1)
            assert "```python" in reply and "- **" in reply and "WebSockets" in reply  # the demo's Markdown
            term.type("/quit")
            assert term.wait_sync() == 0
        finally:
            term.close()
        code, body, _ = get(f"{run.base}/api/v1/pipelines/default/sessions", token)
        assert body["data"]["sessions"][0]["last_seq"] == 2  # the question and its answer; /help stayed local
    finally:
        assert run.stop() == 0
    assert (clone / "data" / "mongo").is_dir()  # the embedded store kept its data under ./data


def test_jwt_from_the_environment_with_json_logs(clone):
    text = readme(clone)
    start = text.index("```python\n# mint.py:")
    shell = text[:start].rsplit("```\n", 2)[-2].strip().splitlines()
    make_secret, run_line = [line.split("#")[0].strip() for line in shell]
    subprocess.run(make_secret, shell=True, cwd=clone, check=True, timeout=30)
    env = dict(word.split("=", 1) for word in run_line.split()[:-2])
    assert run_line.split()[-2:] == ["make", "run"] and "PARLEY_JWT_SECRET_FILE" in env
    run = Run(clone, env={**env, "PARLEY_LOG_FORMAT": "json"})
    try:
        run.wait_ready()
        # the README's mint.py, run where the shell made jwt.secret: a token for alice, one for an admin
        (clone / "mint.py").write_text(text[start + len("```python\n"):text.index("```", start + 10)])
        scope = {name: subprocess.run([sys.executable, "mint.py", *who], cwd=clone, capture_output=True, text=True,
                                      check=True, timeout=30).stdout.strip()
                 for name, who in (("alice", ["alice"]), ("admin", ["ops", "admin"]))}
        code, _, _ = get(f"{run.base}/api/v1/pipelines/default/sessions", scope["alice"])
        assert code == 200
        code, body, headers = get(f"{run.base}/api/v1/pipelines/default/sessions")
        assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        code, _, _ = get(f"{run.base}/api/v1/pipelines/default/ws/connections", scope["alice"])
        assert code == 403
        code, _, _ = get(f"{run.base}/api/v1/pipelines/default/ws/connections", scope["admin"])
        assert code == 200
    finally:
        assert run.stop() == 0
    # make echoes its recipe on stdout; the server's stdout has nothing in jwt mode (no token to print)
    lines = run.stdout().splitlines()
    assert len(lines) == 1 and "server.py" in lines[0], lines
    logs = json_lines(run.stderr())
    assert len(logs) >= 4
    for entry in logs:
        assert ISO_MS_UTC.match(entry["time"]), entry
        assert {"level", "logger", "message"} <= entry.keys()
    served = [e for e in logs if e["logger"] == "tornado.access"]
    assert served and all(e["instance"] and e["request_id"] for e in served)
    warnings = [(e["logger"], e["message"]) for e in logs if e["level"] in ("WARNING", "ERROR", "CRITICAL")]
    assert len(warnings) == len(set(warnings)), warnings  # every event once


def test_options_by_flag_environment_and_config_file_reach_the_server(clone):
    """port, log format and the token (from a file) come from a config file, the log level from the environment,
    the data directory from a flag: each shows in what the running server does."""
    port = free_port()
    token_file = clone.parent / "token"
    token_file.write_text("from-a-file-0123456789\n")
    config = clone.parent / "parley.toml"
    config.write_text(f'port = {port}\nlog_format = "json"\ntoken_file = "{token_file}"\n')
    data = clone.parent / "flag-data"
    # Output goes to files, not pipes: nobody reads a pipe while the server starts, and its debug log (the
    # driver's, ~80 KB at start) would fill a pipe's 64 KiB and block the server on its next write.
    out_file, err_file = open(clone.parent / "stdout", "w+b"), open(clone.parent / "stderr", "w+b")
    proc = subprocess.Popen(["make", "--no-print-directory", "run", *make_args(clone),
                             f"ARGS=--config {config} --data-dir {data}"], cwd=clone,
                            env=stranger_env(PARLEY_LOG_LEVEL="debug"), stdout=out_file,
                            stderr=err_file, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if get(f"http://127.0.0.1:{port}/api/v1/pipelines", "from-a-file-0123456789")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert (data / "mongo").is_dir()
    finally:
        code = stop_make(proc)
        proc.wait(timeout=60)
        out, err = (f.seek(0) or f.read() for f in (out_file, err_file))
        out_file.close()
        err_file.close()
    assert code == 0
    recipe, *rest = out.decode().splitlines()
    assert "server.py" in recipe  # make's echo of its recipe; then the server's stdout: one JSON line
    (banner,) = json_lines("\n".join(rest))
    assert banner["url"] == f"http://127.0.0.1:{port}/?token=from-a-file-0123456789"
    logs = json_lines(err.decode())
    assert any(e["level"] == "DEBUG" for e in logs)  # PARLEY_LOG_LEVEL=debug
    assert "from-a-file-0123456789" not in err.decode()  # the token never reaches the log stream


def test_a_bad_value_from_the_environment_stops_make_run_with_a_clear_line(clone):
    out = subprocess.run(["make", "--no-print-directory", "run", *make_args(clone)], cwd=clone,
                         env=stranger_env(PARLEY_PORT="abc"), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "parley: option --port: invalid PARLEY_PORT='abc': expected an integer" in out.stderr
