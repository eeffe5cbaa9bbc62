"""The ``bomstream loadtest`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from bomstream.config import Config
from bomstream.loadtest.options import LoadOptions, PublishVia
from bomstream.loadtest.pool import WorkerFailed
from bomstream.loadtest.report import Report
from bomstream.loadtest.run import run_load
from bomstream.loadtest.token import TokenMint, mint_token

DEFAULT_ORG = "loadtest-org"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gateway base URL (default: server.host/port from the config)")
    p.add_argument("--connections", type=int, default=100, metavar="N", help="streams to open")
    p.add_argument("--boms", type=int, default=10, metavar="B", help="BOMs to spread them over")
    p.add_argument(
        "--boms-per-stream",
        type=int,
        default=0,
        metavar="K",
        help="streams of K BOMs each (?bom_id=A&bom_id=B...); default: one BOM per stream",
    )
    p.add_argument("--connect-rate", type=float, default=2000.0, metavar="R", help="new streams/s")
    p.add_argument(
        "--source-ips",
        type=int,
        default=1,
        metavar="K",
        help="connect from 127.0.0.1..127.0.0.K to get past the ephemeral-port limit",
    )
    p.add_argument("--rate", type=float, default=0.0, help="events/s published in total")
    p.add_argument("--duration", type=float, default=0.0, metavar="S", help="seconds to publish")
    p.add_argument(
        "--hold", type=float, default=0.0, metavar="S", help="idle seconds after connect"
    )
    p.add_argument("--drain", type=float, default=5.0, metavar="S", help="wait for late deliveries")
    p.add_argument("--redis", metavar="URL", help="publish through this Redis (default: redis.url)")
    p.add_argument(
        "--http-publish", action="store_true", help="publish through the gateway's HTTP endpoint"
    )
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token for every stream")
    auth.add_argument(
        "--mint-token",
        action="store_true",
        help="sign a JWT per stream with auth.jwt_secret (org at auth.org_claim)",
    )
    p.add_argument("--org", help=f"organization of minted tokens and events ({DEFAULT_ORG})")
    p.add_argument("--token-ttl", type=float, default=3600.0, metavar="S")
    p.add_argument("--publish-token", help="token for HTTP publishing (default: auth.admin_token)")
    p.add_argument(
        "--gateway-pid",
        type=int,
        action="append",
        metavar="PID",
        help="sample this process's RSS/CPU; repeat for each worker of serve --workers N (summed)",
    )
    p.add_argument("--slow-consumers", type=int, default=0, metavar="N", help="streams that stall")
    p.add_argument("--no-reconnect", action="store_true", help="do not reopen dropped streams")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="client processes to spread the streams over (1: all in this one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")


def options_from(cfg: Config, args: argparse.Namespace) -> LoadOptions:
    url = args.url or f"http://{cfg.server.host}:{cfg.server.port}"
    redis_url = args.redis if args.redis is not None else cfg.redis.url
    via: PublishVia = "none"
    if args.rate > 0 and args.duration > 0:
        via = "redis" if redis_url and not args.http_publish else "http"
    org = args.org
    mint: TokenMint | None = None
    publish_token = args.publish_token or cfg.auth.admin_token or None
    if args.mint_token:
        secret, claim, ttl = cfg.auth.jwt_secret, cfg.auth.org_claim, args.token_ttl
        org = org or DEFAULT_ORG
        mint_token(secret, claim, org, subject="loadtest-check", ttl_s=ttl)  # fail early
        mint = TokenMint(secret, claim, org, ttl)
        if publish_token is None:
            publish_token = mint_token(
                secret, claim, org, subject="loadtest-publisher", ttl_s=ttl, role="service_role"
            )
    return LoadOptions(
        url=url,
        connections=args.connections,
        boms=args.boms,
        connect_rate=args.connect_rate,
        source_ips=args.source_ips,
        rate=args.rate,
        duration=args.duration,
        hold_s=args.hold,
        drain_s=args.drain,
        publish_via=via,
        redis_url=redis_url,
        channel_prefix=cfg.redis.channel_prefix,
        token=args.token or (None if args.mint_token else cfg.auth.admin_token or None),
        mint=mint,
        publish_token=publish_token,
        org=org,
        gateway_pids=tuple(args.gateway_pid or ()),
        reconnect=not args.no_reconnect,
        slow_consumers=args.slow_consumers,
        progress=not args.no_progress,
        workers=args.workers,
        boms_per_stream=args.boms_per_stream,
    )


def loadtest_command(cfg: Config, args: argparse.Namespace) -> int:
    if args.connections < 1 or args.boms < 1 or args.source_ips < 1:
        print(
            "bomstream: --connections, --boms and --source-ips must be at least 1", file=sys.stderr
        )
        return 2
    if not 0 <= args.boms_per_stream <= args.boms:
        print("bomstream: --boms-per-stream must be between 0 and --boms", file=sys.stderr)
        return 2
    if not 1 <= args.workers <= args.connections:
        print("bomstream: --workers must be between 1 and --connections", file=sys.stderr)
        return 2
    try:
        opts = options_from(cfg, args)
    except ValueError as exc:
        print(f"bomstream: {exc}", file=sys.stderr)
        return 2
    try:
        report = _run(opts)
    except WorkerFailed as exc:
        print(f"bomstream: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bomstream: interrupted; no report", file=sys.stderr)
        return 130
    print(report.table())
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(report.data, option=orjson.OPT_INDENT_2) + b"\n")
    d = report.data
    ok = d["connections"]["established"] > 0 and d["deliveries"]["lost"] == 0
    return 0 if ok else 1


def _run(opts: LoadOptions) -> Report:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(run_load(opts))
    return uvloop.run(run_load(opts))
