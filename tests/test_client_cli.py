"""client.py, the command-line client, run as a real process against a real server."""
import asyncio
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.gen_test(timeout=30)

ROOT = Path(__file__).resolve().parent.parent


async def run_client(base_url, *args):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "client.py"), "--url", base_url.replace("http", "ws", 1), "--token", TEST_TOKEN,
        *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), 25)
    return proc.returncode, out.decode(), err.decode()


async def test_resume_demo_stitches_the_reply_across_a_dropped_connection(base_url, services):
    code, out, err = await run_client(base_url, "--pipeline", "resumable", "--resume-demo", "--cut-after", "5",
                                      "--text", "resume me")
    assert code == 0, err
    assert "stitched text equals the final" in err and "resumed at offset" in err
    text = out.rstrip("\n")
    assert text.startswith('You said "resume me".')
    docs = await services.store.messages.find({"role": "assistant"}).to_list()
    assert [d["content"] for d in docs] == [text] and docs[0]["status"] == "completed"


async def test_multi_runs_concurrent_connections(base_url, services):
    code, out, err = await run_client(base_url, "resumable", "--multi", "3", "--text", "hello")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(": completed " in line for line in lines), out
    assert len({d["session_id"] async for d in services.store.messages.find({"role": "assistant"})}) == 3
