"""The nginx-fronted cluster: three real instances on one store behind a real nginx (tests/cluster.py)."""
import pytest

from tests.cluster import cluster, connect, fetch, instance_for, source  # noqa: F401 (cluster is a fixture)

pytestmark = pytest.mark.gen_test(timeout=120)


async def test_ip_hash_keeps_an_address_on_one_backend_and_spreads_networks(cluster):
    landed = {}
    for n in range(1, 13):
        seen = {await instance_for(cluster, source(n)) for _ in range(3)}
        assert len(seen) == 1, f"{source(n)} answered by {seen}"
        landed[source(n)] = seen.pop()
    assert set(landed.values()) == {i.id for i in cluster.instances}, landed
    # ip_hash hashes the /24: another address of the same network lands on the same backend
    assert await instance_for(cluster, "127.0.1.77") == landed[source(1)]

    # a WebSocket follows the same hash, and works through the proxy
    for n in (1, 2, 3):
        client = await connect(cluster, src=source(n), user=f"u{n}")
        assert client.instance == landed[source(n)]
        ack = await client.say("hello through nginx")
        final = (await client.until_final(ack["data"]["reply_message_id"], timeout=20))[-1]["data"]
        assert final["status"] == "completed" and final["content"]
        client.close()


async def test_the_client_address_comes_from_nginx_and_never_from_a_direct_client(cluster):
    via_nginx = await connect(cluster, src=source(4), user="addr")
    backend = cluster.by_id(via_nginx.instance)
    # the same user, straight to the backend, claiming another address
    direct = await connect(cluster, src=source(5), user="addr", base=backend.url,
                           headers={"X-Real-IP": "10.9.9.9", "X-Forwarded-For": "10.9.9.8"})
    code, body, _ = await fetch(cluster, "/api/v1/pipelines/default/ws/connections", admin=True,
                                base=backend.url, src="127.0.0.1")
    assert code == 200, body
    addresses = {c["connection_id"]: c["remote_ip"] for c in body["data"]["connections"]}
    assert addresses[via_nginx.connected["connection_id"]] == source(4)
    assert addresses[direct.connected["connection_id"]] == source(5)
    via_nginx.close()
    direct.close()


def test_cluster_mode_without_a_shared_store_refuses_to_start(tmp_path):
    import subprocess
    import sys
    from nginx.cluster import ROOT
    out = subprocess.run([sys.executable, "server.py", "--cluster", "--data-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "--cluster needs --mongo-url" in out.stderr
