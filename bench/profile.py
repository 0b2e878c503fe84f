"""Profile Parley's hot path: py-spy samples the server while bench/client.py drives one scenario.

    python -m bench.profile [--pipeline fast] [--clients 1] [--seconds 20]

Prints the functions with the most samples (own time, and inclusive for Parley's and the libraries' modules);
the collapsed stacks are kept for a flame graph. Needs py-spy (`pip install py-spy`) and ptrace rights.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="fast", help="bench pipeline: relay (demo) or fast (upstream), ..., "
                   "fan (the fan-out scenario with --clients viewers)")
    p.add_argument("--clients", type=int, default=1, help="1: the relay scenario; more: many streams")
    p.add_argument("--seconds", type=int, default=20, help="py-spy's sampling duration")
    p.add_argument("--out", default=None, help="collapsed stacks file (default: in a temp dir)")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    workdir = tempfile.mkdtemp(prefix="parley-profile-")
    from services.storage.embedded_mongo import EmbeddedMongo
    mongo = EmbeddedMongo(os.path.join(workdir, "mongo")).start()
    b = run.Bench(argparse.Namespace(quick=False, ref=None, candidates=""), workdir)
    b.mongo_url = mongo.url
    upstream = run.Server("upstream", b).start().ready()
    b.write_toml(upstream.port)
    out = args.out or os.path.join(workdir, "stacks.txt")
    try:
        with run.Server("parley", b) as server:
            sampler = subprocess.Popen([spy, "record", "--format", "raw", "-o", out, "-d", str(args.seconds),
                                        "-r", "200", "--nonblocking", "-p", str(server.proc.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1)
            n = b.specs[args.pipeline]["n"]
            deadline = time.monotonic() + args.seconds - 2
            while time.monotonic() < deadline:  # keep the server busy while py-spy samples
                if args.pipeline == "fan":  # one group session, --clients viewers
                    b.client(server, {"scenario": "fanout", "pipeline": "fan", "viewers": args.clients})
                elif b.specs[args.pipeline]["rate"]:
                    b.client(server, {"scenario": "paced", "pipeline": args.pipeline, "clients": args.clients})
                elif args.clients == 1:
                    b.client(server, {"scenario": "relay", "pipeline": args.pipeline, "n": n, "reps": 1})
                else:
                    b.client(server, {"scenario": "many", "pipeline": args.pipeline, "n": n,
                                      "clients": args.clients})
            sampler.wait(args.seconds + 30)
    finally:
        upstream.stop()
        mongo.stop()
    summarize(out)
    print(f"\ncollapsed stacks: {out}")


def summarize(path, top=25):
    own, total, samples = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            count = int(count)
            frames = [fr.split(" (")[0] + " (" + fr.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                      for fr in stack.split(";") if fr]
            if not frames:
                continue
            samples += count
            own[frames[-1]] += count
            for fr in set(frames):
                total[fr] += count
    print(f"{samples} samples (idle included)\n\nown time:")
    for fr, c in own.most_common(top):
        print(f"{100 * c / samples:5.1f}%  {fr}")
    print("\ninclusive (Parley and library entry points):")
    for fr, c in total.most_common(200):
        if any(k in fr for k in ("services/", "handlers/", "(streams.py", "(fanout.py", "(outbox.py",
                                 "(openai_compat.py", "(websocket.py", "(iostream.py", "(_streaming.py",
                                 "(store.py", "(frames.py", "(metrics.py", "(hub.py")):
            print(f"{100 * c / samples:5.1f}%  {fr}")


if __name__ == "__main__":
    main()
