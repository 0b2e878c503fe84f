"""The burst and paced scenarios through `make cluster` (`make bench BENCH_ARGS="--only cluster_load"`): one
instance, then two, each behind the nginx we ship (nginx/cluster.py) on one store, with the clients spread over
loopback networks so that ip_hash gives each instance its share.

- cluster_many_*: bench/client.py's `many` (100 clients, each its own session, 500-token replies at once).
- cluster_paced_*: its `paced` (100 replies of 40 stamped tokens at 20 tokens/s, not 1,000: see PACED).
- cluster_cpu_per_token: the CPU time of the instances and of the store (where the bus's events go) per token
  delivered, in the paced scenario: what two instances cost beside one (each process's share is in the JSON,
  `cpu_us_per_token_each`: the instances, then the store).

Both configurations run with --cluster (the bus, turns and reservations in the store), so their ratio is what a
second instance adds on this machine (two cores for both instances, nginx, the store, the upstream and the
client); the single-server rows of bench/run.py are the same scenarios without the cluster.
"""
import asyncio
import json
import os
import subprocess
import sys
import time

from bench.client import SECRET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Paced replies at once: not bench/run.py's 1,000. Through --cluster instances on nx-27017, every send and reply is
# several store commands of its own (the reservation, the turn's claim and hole check, the bus's events, each
# instance's change stream), and at 400 at once one instance took 15 s for 2 s of tokens (the store's CPU 2x the
# instance's) while two got `store_unavailable` (commands queued past --store-timeout); 1,000 failed on one.
PACED = 100


async def _sources(cluster, tries=60):
    """One loopback address per instance, from which nginx's ip_hash reaches that instance: [address, ...]."""
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    http = AsyncHTTPClient()
    found = {}
    for n in range(1, tries):
        source = f"127.0.{n}.1"
        response = await http.fetch(HTTPRequest(cluster.url + "/healthz", network_interface=source,
                                                request_timeout=30))
        found.setdefault(response.headers.get("X-Parley-Instance"), source)
        if len(found) == len(cluster.instances):
            return list(found.values())
    raise RuntimeError(f"ip_hash placed the test networks on {sorted(found)} only")


def _client(cluster, store_pid, params, timeout=300):
    sources = asyncio.run(_sources(cluster))
    pids = [inst.proc.pid for inst in cluster.instances] + ([store_pid] if store_pid else [])
    params = {**params, "kind": "parley", "port": cluster.port, "pid": pids[0], "pids": pids, "sources": sources}
    out = subprocess.run([sys.executable, "-m", "bench.client", json.dumps(params)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenarios(b):
    """The `cluster_load` group for bench/run.py."""

    def cluster_load(b):
        from nginx.cluster import Cluster, nginx_binary
        if nginx_binary() is None:
            raise RuntimeError("nginx is not installed (Debian package nginx)")
        q = b.quick
        store_pid = b.store_pid
        many, paced = {}, {}
        for count, kind in ((1, "one_instance"), (2, "two_instances")):
            c = Cluster(os.path.join(b.workdir, f"cluster-load-{count}"), instances=count, mongo_url=b.mongo_url,
                        db_name=f"bench_load_{count}_{int(time.time())}", pipelines_file=b.toml,
                        extra_args=["--auth", "jwt", "--jwt-secret", SECRET, "--log-level", "warning",
                                    "--rate-limit", "100000", "--rate-burst", "100000",
                                    "--max-connections", "20000", "--max-connections-per-user", "20000"])
            c.start()
            try:
                many[kind] = _client(c, store_pid, {"scenario": "many", "pipeline": "many", "n": b.specs["many"]["n"],
                                                    "clients": 10 if q else 100})
                paced[kind] = _client(c, store_pid, {"scenario": "paced", "pipeline": "paced",
                                                     "clients": 20 if q else PACED})
            finally:
                c.stop()
        return {"cluster_many_first_token": {**many, "metric": "first token p99 ms", "key": "first_token_p99_ms",
                                             "base": "one_instance", "target": "-"},
                "cluster_many_throughput": {**many, "metric": "tokens/s", "key": "tokens_per_s",
                                            "base": "one_instance", "target": "-"},
                "cluster_paced_added_delay": {**paced, "metric": "added delay p99 ms", "key": "delay_p99_ms",
                                              "base": "one_instance", "target": "-"},
                "cluster_cpu_per_token": {**paced, "metric": "CPU us/token (instances + store)",
                                          "key": "cpu_us_per_token", "base": "one_instance", "target": "-"}}

    return {"cluster_load": cluster_load}
