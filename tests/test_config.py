"""Configuration: file, then environment, then flags; bad config stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from bomstream.config import ConfigError
from bomstream.config_load import load_config
from tests.cli_proc import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract() -> None:
    cfg = load_config(env={}, default_file=False)
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.server.heartbeat_s == 15
    assert cfg.server.retry_ms == 3000
    assert cfg.server.max_connections == 50000
    assert cfg.server.send_queue_bytes == 1048576
    assert cfg.buffer.events_per_bom == 1000
    assert cfg.buffer.retention_s == 3600
    assert cfg.redis.url == ""
    assert cfg.redis.channel_prefix == "enrichment:"
    assert cfg.auth.org_claim == "organization_id"
    assert cfg.events.terminal_types == (
        "enrichment.completed", "enrichment.failed", "enrichment.error",
    )  # fmt: skip
    assert cfg.limits.max_event_bytes == 65536
    assert cfg.open_mode


def test_environment_overrides_file_and_overrides_win(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\nheartbeat_s = 5\n[redis]\nurl = 'redis://h:1'\n")
    env = {"BOMSTREAM_SERVER_PORT": "9100", "BOMSTREAM_EVENTS_TERMINAL_TYPES": "a.done, b.done"}
    cfg = load_config(path, env=env, overrides={"server.port": 9200})
    assert cfg.server.port == 9200
    assert cfg.server.heartbeat_s == 5
    assert cfg.redis.url == "redis://h:1"
    assert cfg.events.terminal_types == ("a.done", "b.done")
    assert load_config(path, env=env).server.port == 9100


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ("[server]\nprot = 1\n", {}, "server.prot: unknown key"),
        ("[sever]\nport = 1\n", {}, "unknown section [sever]"),
        ("[server]\nport = 'eighty'\n", {}, "server.port: expected an integer"),
        ("[server]\nport = 70000\n", {}, "server.port: must be 0..65535"),
        ("[server]\naccess_log = 'yes'\n", {}, "server.access_log: expected a boolean"),
        ("[cors]\nallow_origins = 'x'\n", {}, "cors.allow_origins: expected a list of strings"),
        (
            "",
            {"BOMSTREAM_SERVER_HEARTBEAT_S": "soon"},
            "BOMSTREAM_SERVER_HEARTBEAT_S: expected a number",
        ),
        ("", {"BOMSTREAM_SERVER_NOPE": "1"}, "BOMSTREAM_SERVER_NOPE: unknown key"),
        ("[server]\nport = \n", {}, "not valid TOML"),
        ("[redis]\nurl = 'http://x'\n", {}, "redis.url: must start with"),
        ("[cors]\nallow_origins = ['*']\nallow_credentials = true\n", {}, "cors.allow_origins"),
        ("[server]\nhost = '0.0.0.0'\n", {}, "server.host: refusing to serve without auth"),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, text: str, env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=env)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_non_loopback_host_is_fine_once_a_credential_is_set(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "[server]\nhost = '0.0.0.0'\n[auth]\nadmin_token = 't'\n"), env={}
    )
    assert cfg.server.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["serve", "--config", "/nonexistent/bomstream.toml"],
            "/nonexistent/bomstream.toml: cannot read",
        ),
        (["serve", "--port", "99999"], "server.port"),
        (["serve", "--host", "10.1.2.3"], "server.host"),
    ],
)
def test_serve_with_bad_config_exits_2_with_one_line(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert result.stdout == ""


def test_bad_config_file_in_working_directory_stops_serve(tmp_path: Path) -> None:
    write(tmp_path, "[buffer]\nevents_per_bom = -1\n")
    result = run_cli("serve", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "bomstream: config error: buffer.events_per_bom: must be greater than 0"
    )


def test_documented_config_file_parses_to_the_defaults() -> None:
    root = Path(__file__).resolve().parent.parent
    assert load_config(root / "config.toml", env={}) == load_config(env={}, default_file=False)


def test_subscription_mode_defaults_and_what_a_cluster_implies() -> None:
    plain = load_config(env={"BOMSTREAM_REDIS_URL": "redis://h:1"}, default_file=False)
    assert (plain.redis.subscribe_mode, plain.redis.unsubscribe_grace_s) == ("pattern", 30)
    assert plain.redis.cluster is False
    cluster = load_config(
        env={"BOMSTREAM_REDIS_URL": "redis://h:7000", "BOMSTREAM_REDIS_CLUSTER": "true"},
        default_file=False,
    )
    assert cluster.redis.subscribe_mode == "interest"
    assert cluster.history_backend == "redis"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BOMSTREAM_REDIS_SUBSCRIBE": "interest"}, "redis.subscribe: 'interest' needs redis.url"),
        (
            {"BOMSTREAM_REDIS_URL": "unix:///tmp/r.sock", "BOMSTREAM_REDIS_CLUSTER": "true"},
            "redis.cluster: needs a redis:// or rediss:// URL",
        ),
        (
            {
                "BOMSTREAM_REDIS_URL": "redis://h:7000",
                "BOMSTREAM_REDIS_CLUSTER": "true",
                "BOMSTREAM_REDIS_CHANNEL_PREFIX": "{enrichment}:",
            },
            "redis.channel_prefix: must not contain { or }",
        ),
    ],
)
def test_unusable_cluster_and_interest_settings_name_their_key(
    env: dict[str, str], needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(env=env, default_file=False)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
