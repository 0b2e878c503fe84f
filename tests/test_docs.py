"""The docs stay true: README's commands and example, and every code the server can send is documented."""
import re
import subprocess
import sys
from pathlib import Path

import server

from services.access.auth import Identity
from services.operations.pipelines import load_pipelines
from services.wire.codes import Code, ReplyCode

ROOT = Path(__file__).resolve().parent.parent


def test_every_error_code_is_in_protocol_md():
    """Every code the server can send is a row of services/wire/codes.py's tables (tests/test_codes.py: no code is
    written anywhere else, and protocol.md's tables are exactly these)."""
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", (ROOT / "docs/protocol.md").read_text(), re.M))
    codes = {c.value for c in Code} | {c.value for c in ReplyCode}
    assert {"invalid_json", "session_busy", "stall_timeout", "upstream_unauthorized"} <= codes
    assert codes - documented == set()


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]


def test_readme_pipelines_example_loads(tmp_path):
    readme = (ROOT / "README.md").read_text()
    toml = readme.split("```toml\n")[1].split("```")[0]
    (tmp_path / "p.toml").write_text(toml)
    assert [p.id for p in load_pipelines(tmp_path / "p.toml")] == ["gpt", "llama", "r1"]


def test_readme_jwt_example_makes_tokens_the_server_accepts(tmp_path, monkeypatch):
    """The README's JWT set-up as written: the secret goes to a file, the server reads it from the environment
    (never the command line), and mint.py's tokens are accepted, an admin's as an admin (tests/test_docs_run.py
    runs the whole example against a server)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n# mint.py:")
    code = readme[start + len("```python\n"):readme.index("```", start + 10)]
    shell = readme[:start].rsplit("```\n", 2)[-2]  # the shell block just above the Python one
    make_secret, run = [line.split("#")[0].strip() for line in shell.strip().splitlines()]
    assert "--jwt-secret " not in readme, "a secret on the command line shows in ps and shell history"
    subprocess.run(make_secret, shell=True, cwd=tmp_path, check=True, timeout=30)
    assert run.endswith("make run")
    env = dict(word.split("=", 1) for word in run.split()[:-2])
    assert set(env) == {"PARLEY_AUTH", "PARLEY_JWT_SECRET_FILE"}
    monkeypatch.chdir(tmp_path)
    config = server.parse_args([], env)
    (tmp_path / "mint.py").write_text(code)
    mint = [subprocess.run([sys.executable, "mint.py", *who], cwd=tmp_path, capture_output=True, text=True,
                           check=True, timeout=30).stdout.strip() for who in (["alice"], ["ops", "admin"])]
    auth = server.make_authenticator(config)
    assert auth.mode == "jwt" and len(config.jwt_secret) >= 32
    assert auth.verify(mint[0]) == Identity("alice", is_admin=False)
    assert auth.verify(mint[1]) == Identity("ops", is_admin=True)
