"""A fresh checkout, installed the two ways the README gives: `make run` (a .venv with what running needs, and no
test extras) and `pip install .` (the `parley` command, its web app and nginx files inside the package).

Each installs into a new virtualenv (pip's cache may help; the time is bounded, not measured against anything);
what the install took is printed for the record (pytest -s).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.storage.embedded_mongo import free_port
from tests.conftest import TEST_TOKEN

ROOT = Path(__file__).resolve().parent.parent
TEST_ONLY = ("pytest", "playwright", "hypothesis", "jsonschema", "openapi_spec_validator", "yaml")
INSTALL_TIMEOUT = 600  # seconds: a bound for a loaded machine, not a target


def checkout(dest):
    """The repository's files as a fresh clone has them (tracked and new ones, nothing ignored: no .venv)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARLEY_", "VIRTUAL_ENV", "PYTHON"))}
    return {**env, **extra}


def du(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def importable(python, module):
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def serve_until_ready(argv, cwd, env, port, log):
    """Start a server (its own process group, as a shell's job) and wait until its pipelines answer."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/pipelines",
                                             headers={"Authorization": f"Bearer {TEST_TOKEN}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                assert r.status == 200
                return proc
        except OSError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)


def ctrl_c(proc):
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(60)


def get(port, path, accept="text/html"):
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                                       headers={"Accept": accept}), timeout=10) as r:
        return r.status, r.read().decode()


def test_make_run_installs_what_running_needs_and_runs(tmp_path):
    repo = checkout(tmp_path / "parley")
    started = time.monotonic()
    out = subprocess.run(["make", "install", f"PYTHON={sys.executable}"], cwd=repo, env=clean_env(),
                         capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    python = str(repo / ".venv" / "bin" / "python")
    size = du(repo / ".venv")
    print(f"\nmake install (what `make run` installs): {took:.1f} s, .venv {size / 1e6:.0f} MB")
    assert importable(python, "tornado") and importable(python, "pymongo") and importable(python, "nx_27017")
    assert [m for m in TEST_ONLY if importable(python, m)] == []  # `make test` adds those

    port = free_port()
    with open(tmp_path / "run.log", "wb") as log:  # `make run` itself, with the install already there
        proc = serve_until_ready(["make", "run", f"ARGS=--port {port} --token {TEST_TOKEN} --data-dir "
                                  f"{tmp_path / 'data'}"], repo, clean_env(), port, log)
        try:
            assert get(port, "/")[1].startswith("<!doctype html>")
        finally:
            code = ctrl_c(proc)
    text = (tmp_path / "run.log").read_text()
    assert "Parley is running" in text and "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert "embedded MongoDB stopped" in text  # the server shut down in order (make itself dies of the SIGINT)
    assert code in (0, 2, -signal.SIGINT), text[-3000:]


def test_pip_install_gives_the_parley_command_with_its_files(tmp_path):
    source = checkout(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    started = time.monotonic()
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\npip install .: {took:.1f} s, venv {du(venv) / 1e6:.0f} MB")
    shutil.rmtree(source)  # nothing may come from the checkout
    parley = str(venv / "bin" / "parley")

    usage = subprocess.run([parley, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and all(f"parley {c}" in usage.stdout for c in ("serve", "client", "cluster"))
    for command in ("client", "cluster", "serve"):
        helped = subprocess.run([parley, command, "--help"], capture_output=True, text=True, timeout=60,
                                cwd=tmp_path, env=clean_env())
        assert helped.returncode == 0 and helped.stdout.startswith(f"usage: parley {command}"), helped.stderr

    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = serve_until_ready([parley, "serve", "--port", str(port), "--token", TEST_TOKEN, "--data-dir",
                                  str(tmp_path / "data")], tmp_path, clean_env(), port, log)
        try:
            status, page = get(port, "/")
            assert status == 200 and page.startswith("<!doctype html>") and "/static/app.js?v=" in page
            assert get(port, "/static/vendor/marked.umd.js")[0] == 200
            assert get(port, "/static/parley.js")[0] == 200
        finally:
            assert ctrl_c(proc) == 0
    client = subprocess.run([parley, "client", "default", "--url", f"http://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60, env=clean_env(PARLEY_TOKEN=TEST_TOKEN))
    assert client.returncode == 1 and "cannot reach Parley" in client.stderr  # the client, installed, runs


@pytest.fixture(autouse=True)
def _needs_make_and_git():
    for tool in ("make", "git"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
