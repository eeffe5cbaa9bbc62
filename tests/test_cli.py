"""``bomstream publish`` and ``bomstream serve`` as commands, end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp

from tests.conftest import open_stream
from tests.gateway_proc import GatewayProcess
from tests.redis_proc import RedisProcess


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bomstream", *args,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_publish_through_redis_reaches_a_stream(
    redis_server: RedisProcess, http: aiohttp.ClientSession
) -> None:
    gw = GatewayProcess(env={"BOMSTREAM_REDIS_URL": redis_server.url})
    gw.start_sync()
    try:
        async with open_stream(http, gw.url, "bom-cli") as s:
            await s.next_event()
            code, out, err = await run_cli(
                "publish", "bom-cli", "enrichment.progress",
                "--state", '{"percent_complete": 52.0, "enriched_items": 50, "total_items": 100}',
                "--org", "org-1", "--event-id", "cli-1",
                env={"BOMSTREAM_REDIS_URL": redis_server.url},
            )  # fmt: skip
            assert code == 0, err
            assert out.startswith("cli-1 published to Redis (1 subscribers)")
            frame = await s.next_event()
            assert frame.id == "cli-1"
            body = frame.json()
            assert body["state"]["percent_complete"] == 52.0
            assert body["organization_id"] == "org-1"
            assert body["bom_id"] == "bom-cli"
            assert body["created_at"].endswith("Z")
    finally:
        gw.stop()


async def test_publish_through_the_http_endpoint_with_the_admin_token(
    http: aiohttp.ClientSession,
) -> None:
    env = {"BOMSTREAM_AUTH_ADMIN_TOKEN": "adm-token-1"}
    gw = GatewayProcess(env=env)
    gw.start_sync()
    try:
        async with open_stream(http, gw.url, "bom-cli", token="adm-token-1") as s:
            await s.next_event()
            code, out, err = await run_cli(
                "publish", "bom-cli", "enrichment.completed", "--url", gw.url, env=env
            )
            assert code == 0, err
            frames = await s.events_until_end()
            assert [f.event for f in frames] == ["enrichment.completed", "stream_end"]
            assert frames[0].id == out.strip()
        code, _, err = await run_cli(
            "publish", "bom-cli", "enrichment.progress", "--url", gw.url, "--token", "wrong"
        )
        assert code == 1
        assert "401" in err and "wrong" not in err
    finally:
        gw.stop()


async def test_publish_rejects_bad_json_flags_without_sending() -> None:
    code, out, err = await run_cli(
        "publish", "bom", "enrichment.progress", "--state", "{nope", "--url", "http://127.0.0.1:9"
    )
    assert code == 2
    assert out == ""
    assert err.strip() == "bomstream: --state is not valid JSON"


async def test_serve_exits_0_on_sigterm(http: aiohttp.ClientSession) -> None:
    gw = GatewayProcess()
    gw.start_sync()
    async with http.get(f"{gw.url}/api/enrichment/health") as resp:
        assert resp.status == 200
    gw.signal(signal.SIGTERM)
    assert await gw.wait(15) == 0
    assert "bomstream stopped" in gw.log_text()


async def test_serve_on_a_taken_port_exits_1_with_one_line_even_with_redis(
    redis_server: RedisProcess,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_cli(
            "serve", "--port", str(port), env={"BOMSTREAM_REDIS_URL": redis_server.url}
        )
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("bomstream:")]
    assert lines == [f"bomstream: cannot listen on 127.0.0.1:{port}: Address already in use"]
