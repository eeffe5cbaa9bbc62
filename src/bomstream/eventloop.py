"""Runs a command's top-level coroutine on uvloop, the loop the gateway is built for."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(main)
    return uvloop.run(main)


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task has a cancellation pending.

    redis-py can swallow a cancellation that lands while a command is under
    way and return the command's result instead (seen with redis 8.1, on
    uvloop and on asyncio alike). An owner loop that then waits for its next
    piece of work would never end, and shutdown would wait on it for good;
    calling this at the top of such a loop honours the cancellation.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
