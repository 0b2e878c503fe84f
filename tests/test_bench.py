"""The bench harness (bench/, `make bench`) runs in quick mode, so it cannot rot. No timing is asserted here:
numbers belong in bench/results and docs/performance.md."""
import json
import subprocess
import sys


def test_bench_quick_mode_runs_every_kind_of_scenario(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "latency,broadcast",
                           "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"first_token", "stop", "resume", "broadcast"}
    for name, row in results.items():
        assert "error" not in row, (name, row)
    # every scenario measured Parley beside its baseline(s), with the metric it is judged by
    for name in ("first_token", "stop", "resume"):
        assert results[name]["parley"]["reps"] == results[name]["tornado"]["reps"] > 0
    assert {"parley", "tornado", "sio"} <= set(results["broadcast"])
    assert results["broadcast"]["parley"]["deliveries_per_s"] > 0
    assert "| stop | p99 ms | parley |" in proc.stdout  # the table for docs/performance.md
