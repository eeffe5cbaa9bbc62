"""``bomstream publish``: send one event the way a worker does.

The event is checked by the gateway's own validation before anything is
sent (a bad one exits 2 with one line naming the problem), then sent through
:mod:`bomstream.publisher` to Redis (history appended and PUBLISHed in one
step when Redis history is on), or to the publish endpoint at ``--url``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import aiohttp
import orjson
from redis.exceptions import RedisError

from bomstream.config import Config
from bomstream.events import Event, EventRejected
from bomstream.publisher import AsyncPublisher, PublishSettings, prepare_event

EXIT_BAD_EVENT = 2


def build_event(args: argparse.Namespace) -> dict[str, Any]:
    """The event from the command line; ValueError names a bad argument."""
    event: dict[str, Any] = {"event_type": args.event_type, "bom_id": args.bom_id}
    if args.event_id:
        event["event_id"] = args.event_id
    if args.org:
        event["organization_id"] = args.org
    for name in ("state", "component", "payload"):
        text = getattr(args, name)
        if text is None:
            continue
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ValueError(f"--{name} is not valid JSON") from None
        if not isinstance(value, dict):
            raise ValueError(f"--{name} must be a JSON object")
        event[name] = value
    return event


def _fail(message: str, status: int) -> int:
    print(f"bomstream: {message}", file=sys.stderr)
    return status


async def publish_command(cfg: Config, args: argparse.Namespace) -> int:
    try:
        event = prepare_event(
            args.bom_id,
            build_event(args),
            max_event_bytes=cfg.limits.max_event_bytes,
            terminal_types=cfg.events.terminal_types,
        )
    except EventRejected as exc:
        return _fail(f"event rejected ({exc.code}): {exc.message}", EXIT_BAD_EVENT)
    except ValueError as exc:
        return _fail(str(exc), EXIT_BAD_EVENT)
    if cfg.redis.url and not args.url:
        return await _to_redis(cfg, event)
    return await _to_gateway(cfg, args, event)


async def _to_redis(cfg: Config, event: Event) -> int:
    publisher = AsyncPublisher.from_settings(PublishSettings.from_config(cfg))
    try:
        sent = await publisher.publish_event(event)
    except (RedisError, OSError) as exc:
        return _fail(f"cannot publish to Redis: {exc}", 1)
    finally:
        await publisher.close()
    if sent.duplicate:
        print(f"{sent.event_id} already published (not sent again)")
    else:
        print(f"{sent.event_id} published to Redis ({sent.receivers} subscribers)")
    return 0


async def _to_gateway(cfg: Config, args: argparse.Namespace, event: Event) -> int:
    base = args.url or f"http://{cfg.server.host}:{cfg.server.port}"
    token = args.token or cfg.auth.admin_token
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{base.rstrip('/')}/api/enrichment/events/{event.bom_id}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=event.data, headers=headers) as resp,
        ):
            text = await resp.text()
            if resp.status != 202:
                return _fail(f"{resp.status} {text}", 1)
    except aiohttp.ClientError as exc:
        return _fail(f"cannot reach {base}: {exc}", 1)
    print(orjson.loads(text)["event_id"])
    return 0
