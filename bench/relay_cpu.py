"""Server CPU time per token of the demo relay: Parley (this tree), Parley at REF and bare Tornado, in alternating
rounds. On a loaded machine the wall-clock tokens/s of `make bench` swing by 2-3x between runs of one server;
the server's own CPU time per token (/proc, 10 ms ticks, over 5 replies of 5,000 tokens) swings far less.

    python -m bench.relay_cpu REV [ROUNDS]
"""
import argparse
import os
import sys
import tempfile

from bench import run
from services.storage.embedded_mongo import EmbeddedMongo


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def main(ref, rounds=3):
    workdir = tempfile.mkdtemp(prefix="relay-cpu-")
    mongo = EmbeddedMongo(os.path.join(workdir, "mongo")).start()
    b = run.Bench(argparse.Namespace(quick=False, ref=ref, candidates=""), workdir)
    b.mongo_url = mongo.url
    b.write_toml(1)
    n, reps = b.specs["relay"]["n"], 5
    res = {k: [] for k in ["parley", "parley@" + ref, "tornado"]}
    wall = {k: [] for k in res}
    try:
        for _ in range(rounds):
            for kind in res:
                with run.Server(kind, b) as server:
                    b.client(server, {"scenario": "relay", "pipeline": "relay", "n": n, "reps": 1})  # warm-up
                    c0 = cpu(server.proc.pid)
                    out = b.client(server, {"scenario": "relay", "pipeline": "relay", "n": n, "reps": reps})
                    c1 = cpu(server.proc.pid)
                    res[kind].append((c1 - c0) / (n * reps) * 1e6)
                    wall[kind].append(out["tokens_per_s"])
    finally:
        mongo.stop()
    for kind in res:
        print(f"{kind}: CPU us/token {sorted(round(x, 1) for x in res[kind])}  "
              f"tokens/s {sorted(round(x) for x in wall[kind])}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
