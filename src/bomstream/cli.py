"""The ``bomstream`` command: serve, publish, health, token, loadtest, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from bomstream.config import Config, ConfigError
from bomstream.config_load import load_config
from bomstream.eventloop import run

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
    serve.add_argument(
        "--workers", type=int, metavar="N", help="server.workers (0 = one per CPU; needs Redis)"
    )
    # How a supervisor starts its workers; not for use by hand.
    serve.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
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

    demo = sub.add_parser("demo", help="the gateway plus simulated enrichment jobs to watch")
    demo.add_argument("--config", metavar="PATH", help="config file (redis.url is ignored)")
    demo.add_argument("--host", help="server.host")
    demo.add_argument("--port", type=int, help="server.port")
    demo.add_argument(
        "--speed", type=float, default=1.0, help="pace multiplier (2 = twice as fast)"
    )
    demo.add_argument("--rounds", type=int, default=0, help="runs of every BOM (0 = until stopped)")
    demo.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    tok = sub.add_parser("token", help="print an HS256 JWT signed with auth.jwt_secret")
    _add_config_args(tok)
    tok.add_argument("--org", required=True, help="organization, placed at auth.org_claim")
    tok.add_argument("--sub", default="bomstream-dev", help="subject (default: bomstream-dev)")
    tok.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (3600)")
    tok.add_argument("--role", help="role claim; service_role may publish")
    health = sub.add_parser("health", help="exit 0 if the gateway answers its health check")
    _add_config_args(health)
    health.add_argument("--url", help="health URL (default: from server.host and server.port)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
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
    # loadtest has a --workers of its own: client processes, not server.workers.
    if args.command == "serve" and args.workers is not None:
        out["server.workers"] = args.workers
    if getattr(args, "log_format", None) is not None:
        out["server.log_format"] = args.log_format
    if getattr(args, "log_level", None) is not None:
        out["server.log_level"] = args.log_level
    return out


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides=_overrides(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.supervised:
        from bomstream.supervisors.worker import worker_main

        # Its config comes from the supervisor, resolved once for every worker.
        return worker_main()
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
    if args.command == "demo":
        return _demo(cfg, args)
    if args.command == "token":
        return _token(cfg, args)
    if args.command == "health":
        from bomstream.healthcheck import health_command

        return health_command(cfg, args.url, args.timeout)
    if args.command == "loadtest":
        from bomstream.loadtest.command import loadtest_command

        return loadtest_command(cfg, args)
    raise AssertionError(args.command)


def _token(cfg: Config, args: argparse.Namespace) -> int:
    from bomstream.jwt_auth import make_token

    if not args.org:
        print("bomstream: --org must not be empty", file=sys.stderr)
        return EXIT_CONFIG
    if args.ttl <= 0:
        print("bomstream: --ttl must be greater than 0", file=sys.stderr)
        return EXIT_CONFIG
    try:
        token = make_token(cfg.auth, args.org, subject=args.sub, ttl_s=args.ttl, role=args.role)
    except ConfigError as exc:
        print(f"bomstream: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(token)
    return 0


def _serve(cfg: Config) -> int:
    from bomstream.logs import setup_logging
    from bomstream.server import serve
    from bomstream.supervisors import worker_count

    a = cfg.auth
    setup_logging(
        cfg.server.log_format,
        cfg.server.log_level,
        secrets=(a.admin_token, a.jwt_secret, cfg.metrics.token, *cfg.url_passwords),
    )
    workers = worker_count(cfg.server.workers)
    try:
        if workers > 1:
            from bomstream.supervisors.multiprocess import supervise

            return supervise(cfg, workers)
        run(serve(cfg))
    except OSError as exc:
        print(
            f"bomstream: cannot listen on {cfg.server.host}:{cfg.server.port}: {_os_reason(exc)}",
            file=sys.stderr,
        )
        return 1
    except ConfigError as exc:
        # Key files are read as the app is built.
        print(f"bomstream: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _demo(cfg: Config, args: argparse.Namespace) -> int:
    from bomstream.demo import run_demo
    from bomstream.logs import setup_logging

    if args.speed <= 0 or args.rounds < 0:
        print("bomstream: --speed must be > 0 and --rounds >= 0", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(cfg.server.log_format, cfg.server.log_level)
    try:
        run(run_demo(cfg, speed=args.speed, rounds=args.rounds, seed=args.seed))
    except OSError as exc:
        print(
            f"bomstream: cannot listen on {cfg.server.host}:{cfg.server.port}: {_os_reason(exc)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _os_reason(exc: OSError) -> str:
    """The system's own wording (uvloop's messages differ from asyncio's)."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


if __name__ == "__main__":
    sys.exit(main())
