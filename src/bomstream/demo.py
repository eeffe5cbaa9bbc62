"""``bomstream demo``: the gateway on the embedded broker, fed by the enrichment
simulator, with the monitor addresses printed to open in a browser."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from typing import Any, TextIO

import orjson

from bomstream.config import Config
from bomstream.events import parse_event
from bomstream.server import RunningGateway, start
from bomstream.simulator import DEMO_BOMS, Publish, run_rounds

log = logging.getLogger("bomstream.demo")


def broker_publisher(running: RunningGateway) -> Publish:
    """Publish the way the HTTP endpoint does: validate, then hand to the broker."""
    gw = running.gateway

    async def publish(obj: dict[str, Any]) -> None:
        event = parse_event(
            orjson.dumps(obj),
            obj["bom_id"],
            max_bytes=gw.cfg.limits.max_event_bytes,
            terminal_types=gw.cfg.events.terminal_types,
        )
        await gw.broker.publish(event)

    return publish


def demo_config(cfg: Config) -> Config:
    """The demo always runs on the embedded broker, whatever the config names."""
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=""))


def print_addresses(running: RunningGateway, out: TextIO) -> None:
    base = running.url
    print(f"bomstream demo: gateway on {base} (embedded broker, simulated enrichment)", file=out)
    print(f"  all BOMs:  {base}/", file=out)
    for spec in DEMO_BOMS:
        print(f"  monitor:   {base}/monitor?bom={spec.bom_id}", file=out)
    print("Ctrl-C stops it.", file=out, flush=True)


async def run_demo(
    cfg: Config,
    *,
    speed: float = 1.0,
    rounds: int = 0,
    seed: int | None = None,
    out: TextIO = sys.stdout,
) -> None:
    """Serve and simulate until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start(demo_config(cfg))
    generator = asyncio.create_task(
        run_rounds(DEMO_BOMS, broker_publisher(running), speed=speed, rounds=rounds, seed=seed),
        name="simulator",
    )
    print_addresses(running, out)
    stopping = asyncio.create_task(stop.wait(), name="stop-signal")
    try:
        await asyncio.wait({generator, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if generator.done():
            # Finite rounds are over (or the simulator broke): keep serving the
            # results until told to stop, but let a failure be seen at once.
            generator.result()
            await stopping
    finally:
        for task in (generator, stopping):
            task.cancel()
        # Both are awaited whatever they ended with; an error already surfaced above.
        await asyncio.gather(generator, stopping, return_exceptions=True)
        await running.stop()
        log.info("demo stopped")
