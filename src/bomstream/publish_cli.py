"""``bomstream publish``: send one event the way a worker does."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from bomstream.config import Config


def build_event(args: argparse.Namespace) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": args.event_id or str(uuid.uuid4()),
        "event_type": args.event_type,
        "bom_id": args.bom_id,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if args.org:
        event["organization_id"] = args.org
    for name in ("state", "component", "payload"):
        text = getattr(args, name)
        if text is not None:
            try:
                event[name] = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ValueError(f"--{name} is not valid JSON") from None
    return event


async def publish_command(cfg: Config, args: argparse.Namespace) -> int:
    try:
        event = build_event(args)
    except ValueError as exc:
        print(f"bomstream: {exc}", file=sys.stderr)
        return 2
    body = orjson.dumps(event)
    if cfg.redis.url and not args.url:
        client = aioredis.Redis.from_url(cfg.redis.url)
        try:
            receivers = await client.publish(cfg.redis.channel_prefix + args.bom_id, body)
        except (RedisError, OSError) as exc:
            print(f"bomstream: cannot publish to Redis: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()
        print(f"{event['event_id']} published to Redis ({receivers} subscribers)")
        return 0
    base = args.url or f"http://{cfg.server.host}:{cfg.server.port}"
    token = args.token or cfg.auth.admin_token
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base.rstrip('/')}/api/enrichment/events/{args.bom_id}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers) as resp,
        ):
            text = await resp.text()
            if resp.status != 202:
                print(f"bomstream: {resp.status} {text}", file=sys.stderr)
                return 1
    except aiohttp.ClientError as exc:
        print(f"bomstream: cannot reach {base}: {exc}", file=sys.stderr)
        return 1
    print(orjson.loads(text)["event_id"])
    return 0
