"""``bomstream.publisher`` and ``bomstream publish`` against a real redis-server:
validated exactly as the gateway validates, stored and PUBLISHed in one step,
idempotent on retry, and nothing at all sent for a bad event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from bomstream.publisher import AsyncPublisher, EventRejected, Publisher
from tests.cli_proc import cli_env, run_cli
from tests.conftest import progress
from tests.redis_proc import RedisProcess


class Listener:
    """A plain subscriber on one BOM's channel, as a gateway process is."""

    def __init__(self, server: RedisProcess, bom_id: str) -> None:
        self.server = server
        self.channel = f"enrichment:{bom_id}"
        self.client = redis.Redis.from_url(server.url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(self.channel)
        assert self.pubsub.get_message(timeout=5) is None  # the subscribe confirmation

    def received(self) -> list[dict[str, object]]:
        """Everything published so far: a sentinel is sent last and read up to,
        so "nothing else arrived" is a fact, not a timeout."""
        self.server.publish(self.channel, '{"sentinel": true}')
        out = []
        while True:
            msg = self.pubsub.get_message(timeout=5)
            assert msg is not None, "the sentinel never arrived"
            body = json.loads(msg["data"])
            if body == {"sentinel": True}:
                return out
            out.append(body)

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


@pytest.fixture
def listener(redis_server: RedisProcess) -> Iterator[Listener]:
    made = Listener(redis_server, "bom-p")
    yield made
    made.close()


def history(server: RedisProcess, bom_id: str = "bom-p") -> list[str]:
    client = redis.Redis.from_url(server.url)
    try:
        return [f[b"i"].decode() for _, f in client.xrange(f"enrichment-history:{bom_id}")]
    finally:
        client.close()


def test_publish_stores_and_publishes_once_even_when_retried(
    redis_server: RedisProcess, listener: Listener
) -> None:
    with Publisher(redis_server.url) as pub:
        first = pub.publish("bom-p", progress("bom-p", 1))
        again = pub.publish("bom-p", progress("bom-p", 1))
    assert (first.event_id, first.duplicate, first.receivers) == ("bom-p-e1", False, 1)
    assert again.duplicate is True
    assert [e["event_id"] for e in listener.received()] == ["bom-p-e1"]
    assert history(redis_server) == ["bom-p-e1"]


async def test_the_async_publisher_assigns_an_event_id_and_fills_bom_id_and_created_at(
    redis_server: RedisProcess, listener: Listener
) -> None:
    async with AsyncPublisher(redis_server.url) as pub:
        sent = await pub.publish("bom-p", {"event_type": "enrichment.started"})
    (body,) = listener.received()
    assert body["event_id"] == sent.event_id and len(sent.event_id) == 36
    assert body["bom_id"] == "bom-p"
    assert str(body["created_at"]).endswith("Z")
    assert history(redis_server) == [sent.event_id]


@pytest.mark.parametrize(
    ("event", "code"),
    [
        ({"event_type": "bad type"}, "invalid_event_type"),
        ({"event_type": "enrichment.progress\nevent: x"}, "invalid_event_type"),
        ({"event_type": "enrichment.progress", "bom_id": "other"}, "bom_id_mismatch"),
        ({"event_type": "enrichment.progress", "organization_id": 7}, "invalid_organization_id"),
        ({"event_type": "enrichment.progress", "state": {"x": "y" * 70000}}, "too_large"),
        ({"event_type": "enrichment.progress", "state": {1, 2}}, "invalid_json"),
    ],
)
def test_a_bad_event_raises_before_anything_is_sent(
    redis_server: RedisProcess, listener: Listener, event: dict[str, object], code: str
) -> None:
    with Publisher(redis_server.url) as pub, pytest.raises(EventRejected) as caught:
        pub.publish("bom-p", event)
    assert caught.value.code == code
    assert listener.received() == []
    assert history(redis_server) == []


def test_a_bom_id_outside_the_pattern_is_refused(redis_server: RedisProcess) -> None:
    with Publisher(redis_server.url) as pub, pytest.raises(EventRejected) as caught:
        pub.publish("bad/bom", {"event_type": "enrichment.progress"})
    assert caught.value.code == "invalid_bom_id"


def test_from_config_reads_the_environment_and_publish_only_mode(
    redis_server: RedisProcess, listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOMSTREAM_REDIS_URL", redis_server.url)
    monkeypatch.setenv("BOMSTREAM_HISTORY_BACKEND", "none")
    monkeypatch.chdir(redis_server.dir)  # no ./config.toml there
    with Publisher.from_config() as pub:
        assert pub.settings.history_key_prefix is None
        pub.publish("bom-p", progress("bom-p", 1))
    assert [e["event_id"] for e in listener.received()] == ["bom-p-e1"]
    assert history(redis_server) == []


# -- bomstream publish: the same validation, exit 2, nothing sent ---------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad type"], "event rejected (invalid_event_type)"),
        (["enrichment.progress\nevent: x"], "event rejected (invalid_event_type)"),
        (["enrichment.progress", "--state", "[1, 2]"], "--state must be a JSON object"),
        (["enrichment.progress", "--state", '"text"'], "--state must be a JSON object"),
        (["enrichment.progress", "--state", "{nope"], "--state is not valid JSON"),
        (["enrichment.progress", "--payload", "3"], "--payload must be a JSON object"),
        (
            ["enrichment.progress", "--state", json.dumps({"x": "y" * 300})],
            "event rejected (too_large)",
        ),
    ],
)
def test_cli_refuses_a_bad_event_with_one_line_and_sends_nothing(
    redis_server: RedisProcess, listener: Listener, args: list[str], message: str
) -> None:
    env = cli_env(BOMSTREAM_REDIS_URL=redis_server.url, BOMSTREAM_LIMITS_MAX_EVENT_BYTES="300")
    done = run_cli("publish", "bom-p", *args, cwd=None, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bomstream: {message}"), lines
    assert listener.received() == []
    assert history(redis_server) == []


def test_cli_refuses_a_bom_id_outside_the_pattern(redis_server: RedisProcess) -> None:
    env = cli_env(BOMSTREAM_REDIS_URL=redis_server.url)
    done = run_cli("publish", "bad/bom", "enrichment.progress", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("bomstream: event rejected (invalid_bom_id)")


def test_cli_publishes_through_the_publisher_into_history(
    redis_server: RedisProcess, listener: Listener
) -> None:
    env = cli_env(BOMSTREAM_REDIS_URL=redis_server.url)
    args = ("publish", "bom-p", "enrichment.progress", "--event-id", "cli-1")
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("cli-1 published to Redis (1 subscribers)")
    again = run_cli(*args, env=env)
    assert again.returncode == 0
    assert again.stdout.startswith("cli-1 already published")
    assert [e["event_id"] for e in listener.received()] == ["cli-1"]
    assert history(redis_server) == ["cli-1"]
