"""A simulated enrichment worker: seed-shaped events for BOMs of several sizes,
paced like a real batch job, with some failed and not-found parts and, when
asked, a job that fails part way. ``bomstream demo`` feeds it to the gateway.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

Publish = Callable[[dict[str, Any]], Awaitable[None]]

DEMO_ORG = "org-demo"

# (mpn, manufacturer, category): real part numbers, so the feed reads like a real BOM.
CATALOGUE: tuple[tuple[str, str, str], ...] = (
    ("GRM188R71H104KA93D", "Murata", "Capacitor"),
    ("CL21A106KAYNNNE", "Samsung Electro-Mechanics", "Capacitor"),
    ("RC0603FR-0710KL", "Yageo", "Resistor"),
    ("ERJ-3EKF1002V", "Panasonic", "Resistor"),
    ("STM32F407VGT6", "STMicroelectronics", "Microcontroller"),
    ("ATMEGA328P-AU", "Microchip", "Microcontroller"),
    ("ESP32-WROOM-32E", "Espressif", "RF module"),
    ("TPS62130RGTR", "Texas Instruments", "DC/DC converter"),
    ("NCP1117ST33T3G", "onsemi", "LDO regulator"),
    ("LM317T", "Texas Instruments", "Linear regulator"),
    ("BSS138", "onsemi", "MOSFET"),
    ("IRLML6344TRPBF", "Infineon", "MOSFET"),
    ("AO3401A", "Alpha & Omega", "MOSFET"),
    ("1N4148W-7-F", "Diodes Incorporated", "Diode"),
    ("SN74LVC1G14DBVR", "Texas Instruments", "Logic"),
    ("TLV9062IDR", "Texas Instruments", "Op-amp"),
    ("W25Q128JVSIQ", "Winbond", "Flash memory"),
    ("FT232RL-REEL", "FTDI", "USB interface"),
    ("USB4105-GF-A", "GCT", "Connector"),
    ("B82422H1103K", "TDK", "Inductor"),
    ("ABM8-16.000MHZ-B2-T", "Abracon", "Crystal"),
    ("LTST-C191KRKT", "Lite-On", "LED"),
)
SUPPLIERS = ("DigiKey", "Mouser", "Arrow", "Farnell", "LCSC")
FAILURES = (
    "supplier API timed out after 3 retries",
    "ambiguous match: several manufacturers list this MPN",
    "supplier returned malformed pricing data",
)
NOT_FOUND = "no supplier lists this part number"


@dataclass(frozen=True, slots=True)
class SimulatedBom:
    bom_id: str
    filename: str
    items: int
    batch_size: int = 10
    fail_rate: float = 0.04
    not_found_rate: float = 0.05
    # Fraction of the items after which the whole job fails (None: it completes).
    fail_job_at: float | None = None
    job_error: str = "enrichment job failed"


DEMO_BOMS: tuple[SimulatedBom, ...] = (
    SimulatedBom("demo-led-driver", "led-driver.csv", 12, batch_size=4, not_found_rate=0.1),
    SimulatedBom("demo-sensor-board", "sensor-board-rev-b.csv", 36, batch_size=8),
    SimulatedBom("demo-power-supply", "psu-600w.csv", 80, batch_size=10, fail_rate=0.06),
    SimulatedBom(
        "demo-motor-controller",
        "motor-controller.csv",
        64,
        batch_size=8,
        fail_job_at=0.45,
        job_error="supplier API quota exhausted (HTTP 429); the job will be retried later",
    ),
    SimulatedBom("demo-mainboard", "mainboard-rev-c.csv", 240, batch_size=20),
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Job:
    """One run of one BOM: its counters and how each event is shaped."""

    def __init__(self, spec: SimulatedBom, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.enriched = 0
        self.failed = 0
        self.not_found = 0
        self.batch = 0
        self.batches = math.ceil(spec.items / spec.batch_size)
        self.stage = "queued"
        self.status = "enriching"
        self.started_at = _now()
        self.project = "proj-" + spec.bom_id.removeprefix("demo-")

    def state(self, **extra: Any) -> dict[str, Any]:
        total = self.spec.items
        done = self.enriched + self.failed + self.not_found
        state: dict[str, Any] = {
            "status": self.status,
            "total_items": total,
            "enriched_items": self.enriched,
            "failed_items": self.failed,
            "not_found_items": self.not_found,
            "pending_items": total - done,
            "percent_complete": round(100.0 * done / total, 1) if total else 100.0,
            "current_stage": self.stage,
            "current_batch": self.batch,
            "total_batches": self.batches,
            "started_at": self.started_at,
        }
        state.update(extra)
        return state

    def event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": str(uuid.uuid4()),
            "event_type": event_type,
            "bom_id": self.spec.bom_id,
            "organization_id": DEMO_ORG,
            "project_id": self.project,
            "payload": {"filename": self.spec.filename},
            "created_at": _now(),
        }
        event.update(fields)
        if "state" not in event:
            event["state"] = self.state()
        return event

    def component(self, n: int) -> tuple[str, dict[str, Any]]:
        """The event type and component of line item ``n``, with its outcome drawn."""
        rng = self.rng
        line_item_id = f"{self.spec.bom_id}-L{n:04d}"
        roll = rng.random()
        if roll < self.spec.not_found_rate:
            self.not_found += 1
            comp: dict[str, Any] = {
                "line_item_id": line_item_id,
                "mpn": f"INT-{rng.randrange(10000, 99999)}",
                "manufacturer": "unknown",
                "status": "not_found",
                "error_message": NOT_FOUND,
            }
            return "enrichment.component.failed", comp
        mpn, manufacturer, category = rng.choice(CATALOGUE)
        if roll < self.spec.not_found_rate + self.spec.fail_rate:
            self.failed += 1
            comp = {
                "line_item_id": line_item_id,
                "mpn": mpn,
                "manufacturer": manufacturer,
                "status": "failed",
                "error_message": rng.choice(FAILURES),
            }
            return "enrichment.component.failed", comp
        self.enriched += 1
        comp = {
            "line_item_id": line_item_id,
            "mpn": mpn,
            "manufacturer": manufacturer,
            "status": "enriched",
            "enrichment_data": {
                "supplier": rng.choice(SUPPLIERS),
                "price": round(rng.lognormvariate(-1.5, 1.6), 4),
                "stock": rng.randrange(0, 250_000),
                "lifecycle_status": rng.choices(("Active", "NRND", "Obsolete"), (90, 7, 3))[0],
                "category": category,
            },
        }
        return "enrichment.component.completed", comp


async def run_job(
    spec: SimulatedBom, publish: Publish, rng: random.Random, speed: float = 1.0
) -> str:
    """Publish one run of ``spec``; returns the terminal event type it ended with."""

    async def pause(low: float, high: float) -> None:
        await asyncio.sleep(rng.uniform(low, high) / speed)

    job = _Job(spec, rng)
    await publish(job.event("enrichment.started"))
    fail_after = None if spec.fail_job_at is None else int(spec.items * spec.fail_job_at)
    n = 0
    for batch in range(1, job.batches + 1):
        job.batch = batch
        job.stage = "fetching"
        await publish(job.event("enrichment.progress"))
        # A batch's supplier look-up takes a while before parts come back.
        await pause(0.3, 0.9)
        job.stage = "matching"
        for _ in range(min(spec.batch_size, spec.items - n)):
            n += 1
            event_type, comp = job.component(n)
            comp["updated_at"] = _now()
            await publish(job.event(event_type, component=comp))
            if fail_after is not None and n >= fail_after:
                job.status = "failed"
                job.stage = "failed"
                state = job.state(failed_at=_now(), error_message=spec.job_error)
                await publish(
                    job.event("enrichment.failed", state=state, payload={"error": spec.job_error})
                )
                return "enrichment.failed"
            await pause(0.04, 0.35)
        job.stage = "saving"
        await publish(job.event("enrichment.progress"))
        await pause(0.1, 0.3)
    job.status = "completed"
    job.stage = "done"
    await publish(job.event("enrichment.completed", state=job.state(completed_at=_now())))
    return "enrichment.completed"


async def run_rounds(
    boms: Sequence[SimulatedBom],
    publish: Publish,
    *,
    speed: float = 1.0,
    rounds: int = 0,
    seed: int | None = None,
    stagger_s: float = 1.5,
    between_rounds_s: float = 20.0,
) -> None:
    """Run every BOM once per round, starts staggered; ``rounds = 0`` runs until cancelled.

    Each round reuses the BOM ids (a new ``enrichment.started`` begins a new
    run), so a monitor address printed once keeps working.
    """
    rng = random.Random(seed)
    done = 0
    while rounds == 0 or done < rounds:
        async with asyncio.TaskGroup() as group:
            for i, spec in enumerate(boms):
                job_rng = random.Random(rng.random())
                job = functools.partial(run_job, spec, publish, job_rng, speed)
                group.create_task(_delayed(i * stagger_s / speed, job), name=spec.bom_id)
        done += 1
        if rounds == 0 or done < rounds:
            await asyncio.sleep(between_rounds_s / speed)


async def _delayed(delay: float, job: Callable[[], Awaitable[str]]) -> str:
    await asyncio.sleep(delay)
    return await job()
