"""Unsafe or unusable auth settings stop ``bomstream serve`` with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.authkit import SECRET, ec_pair, write_pem
from tests.cli_proc import cli_env, run_cli


def assert_refused(out_code: int, stderr: str, stdout: str, *needles: str) -> None:
    assert out_code == 2, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bomstream: config error: ")
    for needle in needles:
        assert needle in lines[0]


def test_wildcard_origin_with_credentials_refuses_to_start() -> None:
    env = cli_env(BOMSTREAM_CORS_ALLOW_ORIGINS="*", BOMSTREAM_CORS_ALLOW_CREDENTIALS="true")
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, "cors.allow_origins", "credentials")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_open_mode_refuses_a_non_loopback_host(host: str) -> None:
    out = run_cli("serve", "--host", host, "--port", "0")
    assert_refused(out.returncode, out.stderr, out.stdout, "server.host", "without auth")


@pytest.mark.parametrize(
    ("setting", "make_value", "needle"),
    [
        ("JWT_PUBLIC_KEY_FILE", lambda d: str(d / "missing.pem"), "auth.jwt_public_key_file"),
        ("JWT_PUBLIC_KEY_FILE", lambda d: _write(d / "k.pem", "nope"), "not a PEM public key"),
        ("JWKS_FILE", lambda d: _write(d / "jwks.json", "{"), "auth.jwks_file"),
        ("JWKS_FILE", lambda d: _write(d / "jwks.json", '{"keys": []}'), "no RSA or EC"),
    ],
)
def test_unusable_key_files_refuse_to_start(
    tmp_path: Path, setting: str, make_value: object, needle: str
) -> None:
    assert callable(make_value)
    env = cli_env(**{f"BOMSTREAM_AUTH_{setting}": make_value(tmp_path)})
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, needle)


@pytest.mark.parametrize(
    ("algorithms", "needle"),
    [("none", "'none' is not one of"), ("HS256,RS256", "no key configured for RS256")],
)
def test_algorithms_must_be_known_and_have_a_key(algorithms: str, needle: str) -> None:
    env = cli_env(BOMSTREAM_AUTH_JWT_SECRET=SECRET, BOMSTREAM_AUTH_JWT_ALGORITHMS=algorithms)
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, "auth.jwt_algorithms", needle)


def test_es256_key_cannot_be_configured_for_rs256(tmp_path: Path) -> None:
    pem = write_pem(tmp_path / "ec.pem", ec_pair())
    env = cli_env(BOMSTREAM_AUTH_JWT_PUBLIC_KEY_FILE=pem, BOMSTREAM_AUTH_JWT_ALGORITHMS="RS256")
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, "no key configured for RS256")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_mistyped_secret_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[auth]\nadmin_token = 918273645546372819\n")
    out = run_cli("serve", "--config", str(cfg))
    assert_refused(out.returncode, out.stderr, out.stdout, "auth.admin_token", "expected a string")
    assert "918273645546372819" not in out.stderr


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"BOMSTREAM_HISTORY_BACKEND": "mongo"}, ("history.backend", "none, redis or postgres")),
        ({"BOMSTREAM_HISTORY_BACKEND": "redis"}, ("history.backend", "redis.url")),
        ({"BOMSTREAM_HISTORY_BACKEND": "postgres"}, ("history.url", "required")),
        (
            {"BOMSTREAM_HISTORY_BACKEND": "postgres", "BOMSTREAM_HISTORY_URL": "mysql://db/x"},
            ("history.url", "postgresql://"),
        ),
        (
            {
                "BOMSTREAM_HISTORY_BACKEND": "postgres",
                "BOMSTREAM_HISTORY_URL": "postgresql://h:x/d",
            },
            ("history.url", "not a parsable URL"),
        ),
        ({"BOMSTREAM_HISTORY_URL": "postgresql://db/x"}, ("history.url", "only the postgres")),
        ({"BOMSTREAM_HISTORY_TABLE": "events; drop table x"}, ("history.table",)),
        ({"BOMSTREAM_HISTORY_TIMEOUT_S": "soon"}, ("BOMSTREAM_HISTORY_TIMEOUT_S", "a number")),
        ({"BOMSTREAM_HISTORY_POOL_SIZE": "0"}, ("history.pool_size",)),
    ],
)
def test_bad_history_settings_refuse_to_start(
    env: dict[str, str], needles: tuple[str, ...]
) -> None:
    out = run_cli("serve", "--port", "0", env=cli_env(**env))
    assert_refused(out.returncode, out.stderr, out.stdout, *needles)


def test_a_history_url_password_never_appears_in_the_refusal() -> None:
    env = cli_env(
        BOMSTREAM_HISTORY_BACKEND="redis",
        BOMSTREAM_HISTORY_URL="postgresql://user:hunter2-secret@db/x",
        BOMSTREAM_REDIS_URL="redis://127.0.0.1:9/0",
    )
    out = run_cli("serve", "--port", "0", env=env)
    assert_refused(out.returncode, out.stderr, out.stdout, "history.url")
    assert "hunter2" not in out.stderr
