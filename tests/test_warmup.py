"""Start-up warms what the first reply needs: every pipeline's provider exists, and an OpenAI-compatible one has
its client (imports, TLS context, pool) built before the first client connects. (Timings: scripts/first_reply.py
and docs/operations.md, not here.)"""
from pymongo import MongoClient

import server
from services.operations.pipelines import Pipeline, Pipelines


def test_open_services_builds_every_provider_and_its_client(io_loop, config, mongo_url, db_name, monkeypatch):
    monkeypatch.setenv("PARLEY_WARM_KEY", "sk-warm-0123456789")
    pipelines = Pipelines([
        Pipeline(id="default", provider="demo"),
        Pipeline(id="gpt", provider="openai", model="m", base_url="http://127.0.0.1:9/v1",
                 api_key_env="PARLEY_WARM_KEY"),
        Pipeline(id="nokey", provider="openai", model="m", base_url="http://127.0.0.1:9/v1",
                 api_key_env="PARLEY_WARM_MISSING"),
    ])
    svc = io_loop.run_sync(lambda: server.open_services(config, pipelines=pipelines))
    try:
        providers = svc.streams.upstream.providers
        assert set(providers) == {"default", "gpt", "nokey"}
        assert providers["gpt"]._client is not None                 # built at start-up, not on the first reply
        assert providers["nokey"]._client is None                   # no key: its first reply says so
    finally:
        io_loop.run_sync(lambda: server.close_services(svc), timeout=30)
        with MongoClient(mongo_url) as client:
            client.drop_database(db_name)
