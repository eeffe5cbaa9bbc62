"""``bomstream health``: exit 0 only when the gateway answers 200."""

from __future__ import annotations

import asyncio

from bomstream.cli import main
from bomstream.config_load import load_config
from bomstream.healthcheck import health_url
from tests.conftest import StartGateway
from tests.redis_proc import free_port


def test_health_url_reaches_a_wildcard_listener_over_loopback() -> None:
    def url(host: str) -> str:
        overrides = {"server.host": host, "server.port": 9000, "auth.admin_token": "t"}
        cfg = load_config(env={}, overrides=overrides, default_file=False)
        return health_url(cfg)

    assert url("0.0.0.0") == "http://127.0.0.1:9000/api/enrichment/health"
    assert url("::") == "http://[::1]:9000/api/enrichment/health"
    assert url("127.0.0.2") == "http://127.0.0.2:9000/api/enrichment/health"


async def test_health_command_exit_status_follows_the_gateway(
    gateway_factory: StartGateway,
) -> None:
    healthy = await gateway_factory()
    # Redis configured but unreachable: the gateway answers 503.
    dead_redis = await gateway_factory(redis__url=f"redis://127.0.0.1:{free_port()}/0")

    def run(url: str) -> int:
        return main(["health", "--url", url + "/api/enrichment/health", "--timeout", "5"])

    assert await asyncio.to_thread(run, healthy.url) == 0
    assert await asyncio.to_thread(run, dead_redis.url) == 1
    assert await asyncio.to_thread(run, f"http://127.0.0.1:{free_port()}") == 1
