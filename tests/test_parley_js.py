"""static/parley.js: its logic under Node's built-in test runner, and the real thing against a real server."""
import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN, require

JS = Path(__file__).resolve().parent / "js"


def node():
    path = shutil.which("node")
    require(path, "node is not installed (.ci/apt-packages lists nodejs)")
    return path


def test_parley_js_logic_under_node_test():
    result = subprocess.run([node(), "--test", str(JS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


@pytest.mark.gen_test(timeout=30)
async def test_parley_js_survives_two_drops_against_a_real_server(ws_url, services, stored_message):
    exe = node()
    probe = subprocess.run([exe, "--experimental-websocket", "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
                           capture_output=True, timeout=30)
    require(probe.returncode == 0, "this node has no WebSocket (needs Node 20.10+)")
    proc = await asyncio.create_subprocess_exec(
        exe, "--experimental-websocket", str(JS / "e2e_resume.cjs"), ws_url("slow"), "3,20", "40", TEST_TOKEN,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 25)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    stored = await stored_message(result["message_id"])
    assert result["finals"] == 1 and result["status"] == stored["status"] == "stopped"
    assert result["connects"] == 3  # the first connection and one per drop
    # every character reached the UI exactly once, in order, across three sockets
    assert result["streamed"] == result["final"] == stored["content"]
    assert len(await services.store.list_messages(stored["session_id"])) == 2  # the resend started nothing new
