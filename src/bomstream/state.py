"""The gateway's typed application state, shared by the handlers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from bomstream.auth import Authenticator
from bomstream.broker import Broker
from bomstream.config import Config
from bomstream.history.recall import Recall
from bomstream.hub import Hub
from bomstream.logs import DropReporter
from bomstream.metrics import Metrics
from bomstream.protocol import HandedOver


@dataclass(slots=True)
class Gateway:
    cfg: Config
    hub: Hub
    broker: Broker
    metrics: Metrics
    auth: Authenticator
    recall: Recall
    # The index of this worker under ``serve --workers N``; None when the
    # process serves on its own.
    worker: int | None = None
    # Stream connections handed over from aiohttp (see stream.OpenStream).
    handed_over: HandedOver = field(default_factory=HandedOver)
    started_at: float = field(default_factory=time.monotonic)
    http_drops: DropReporter = field(
        default_factory=lambda: DropReporter(logging.getLogger("bomstream.api"), "http")
    )


GATEWAY = web.AppKey("gateway", Gateway)
