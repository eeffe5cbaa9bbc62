"""The ``bomstream`` command: serve, publish, token, loadtest, demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from bomstream.config import Config, ConfigError, load_config

EXIT_CONFIG = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="config file (default: ./config.toml if present)"
    )
    p.add_argument("--redis-url", metavar="URL", help="redis.url (empty: embedded broker)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bomstream", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    _add_config_args(serve)
    serve.add_argument("--host", help="server.host")
    serve.add_argument("--port", type=int, help="server.port")
    serve.add_argument("--log-format", choices=("text", "json"), help="server.log_format")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    pub = sub.add_parser("publish", help="publish one event, as a worker does")
    _add_config_args(pub)
    pub.add_argument("bom_id")
    pub.add_argument("event_type")
    pub.add_argument("--state", metavar="JSON", help="the event's state object")
    pub.add_argument("--component", metavar="JSON", help="the event's component object")
    pub.add_argument("--payload", metavar="JSON", help="the event's payload object")
    pub.add_argument("--org", help="organization_id")
    pub.add_argument("--event-id", help="event_id (default: assigned)")
    pub.add_argument("--url", help="publish through this gateway's HTTP endpoint instead of Redis")
    pub.add_argument("--token", help="token for the HTTP endpoint (default: auth.admin_token)")

    from bomstream.loadtest.command import add_arguments as add_loadtest_arguments

    load = sub.add_parser("loadtest", help="open many streams, publish paced events, measure")
    _add_config_args(load)
    add_loadtest_arguments(load)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "redis_url", None) is not None:
        out["redis.url"] = args.redis_url
    if getattr(args, "host", None) is not None:
        out["server.host"] = args.host
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    if getattr(args, "log_format", None) is not None:
        out["server.log_format"] = args.log_format
    if getattr(args, "log_level", None) is not None:
        out["server.log_level"] = args.log_level
    return out


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=_overrides(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"bomstream: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "serve":
        return _serve(cfg)
    if args.command == "publish":
        from bomstream.publish_cli import publish_command

        return asyncio.run(publish_command(cfg, args))
    if args.command == "loadtest":
        from bomstream.loadtest.command import loadtest_command

        return loadtest_command(cfg, args)
    raise AssertionError(args.command)


def _serve(cfg: Config) -> int:
    from bomstream.logs import setup_logging
    from bomstream.server import serve

    setup_logging(cfg.server.log_format, cfg.server.log_level)
    try:
        _run(serve(cfg))
    except OSError as exc:
        print(
            f"bomstream: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc.strerror}",
            file=sys.stderr,
        )
        return 1
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(main)
    else:
        uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
