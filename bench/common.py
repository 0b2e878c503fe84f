"""What the bench's processes share: the scenario pipelines, frame shapes, and small helpers.

Each pipeline is described once here; bench/run.py turns it into Parley's pipelines TOML, the bare Tornado
baseline (bench/baseline.py) and the fake upstream (bench/upstream.py) read the same description, so both
servers stream the same tokens at the same pace.
"""
import json
import os
import resource
import time
import uuid

WORD = " parley"  # one token of a fast reply: a short word, like the demo provider's


def pipelines(quick):
    """name -> {source: demo|upstream, n: tokens per reply, rate: tokens/s (0 = full speed), stamped}.

    A stamped token is " <time.monotonic() when it was emitted>", so a client on this machine measures the
    delay each token added (CLOCK_MONOTONIC is shared by every process).
    """
    relay_n = 1000 if quick else 5000
    return {
        "relay": {"source": "demo", "n": relay_n, "rate": 0},
        "fast": {"source": "upstream", "n": relay_n, "rate": 0},
        "many": {"source": "upstream", "n": 500, "rate": 0},
        "paced": {"source": "upstream", "n": 20 if quick else 40, "rate": 20, "stamped": True},
        "fan": {"source": "upstream", "n": 10 if quick else 50, "rate": 5, "stamped": True},
        "short": {"source": "demo", "n": 20, "rate": 0},
        "slow": {"source": "demo", "n": 100000, "rate": 200},
        # bench/cluster.py's failover: a reply long enough to kill its instance mid-way (continued, or not)
        "lost": {"source": "demo", "n": 1000, "rate": 200},  # 5 s: each continued reply is read to its end
        "lost_once": {"source": "demo", "n": 4000, "rate": 200, "on_instance_lost": "interrupt"},
        # streaming memory: many replies live at once, each with its upstream request open
        "trickle": {"source": "upstream", "n": 100000, "rate": 2},
    }


def token(i, spec):
    if spec.get("stamped"):
        return f" {time.monotonic():.6f}"
    return WORD


def stamps(text):
    """The emission times inside a stamped text (a delta may hold several tokens after coalescing)."""
    out = []
    for part in text.split():
        try:
            out.append(float(part))
        except ValueError:
            pass
    return out


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def new_id():
    return uuid.uuid4().hex


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def proc_cpu(pid):
    """CPU seconds (user + system) used by a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_rss(pid):
    """Resident memory of a process in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
