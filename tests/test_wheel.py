"""The timer wheel behind stream heartbeats, on a real event loop."""

from __future__ import annotations

import asyncio

from bomstream.wheel import TimerWheel


async def test_members_are_served_repeatedly_until_removed() -> None:
    calls: list[str] = []
    twice = asyncio.Event()

    def due(member: str) -> None:
        calls.append(member)
        if calls.count("a") >= 2:
            twice.set()

    wheel: TimerWheel[str] = TimerWheel(0.04, due, slots=4)
    slot_a = wheel.add("a")
    slot_b = wheel.add("b")
    assert len(wheel) == 2
    await asyncio.wait_for(twice.wait(), 5)
    assert calls.count("b") >= 1
    wheel.remove("a", slot_a)
    wheel.remove("b", slot_b)
    assert len(wheel) == 0
    # With no members left the wheel holds no timer, so nothing fires later.
    assert wheel._handle is None
    served = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == served


async def test_a_member_may_remove_itself_when_served() -> None:
    served = asyncio.Event()
    slots: dict[str, int] = {}
    wheel: TimerWheel[str] = TimerWheel(0.02, lambda m: (wheel.remove(m, slots[m]), served.set()))
    slots["x"] = wheel.add("x")
    await asyncio.wait_for(served.wait(), 5)
    assert len(wheel) == 0
    assert wheel._handle is None


async def test_removing_a_stranger_changes_nothing() -> None:
    wheel: TimerWheel[str] = TimerWheel(10, lambda m: None, slots=8)
    slot = wheel.add("a")
    wheel.remove("b", slot)
    wheel.remove("a", (slot + 1) % 8)
    assert len(wheel) == 1
    wheel.remove("a", slot)
    assert len(wheel) == 0


async def test_a_new_member_waits_most_of_a_period_before_its_first_turn() -> None:
    served: list[int] = []
    wheel: TimerWheel[int] = TimerWheel(0.08, served.append, slots=8)
    wheel.add(1)
    # Drive the wheel tick by tick instead of by the clock: a new member sits
    # in the slot served last, seven ticks of eight away.
    assert wheel._handle is not None
    wheel._handle.cancel()
    for _ in range(7):
        wheel._fire()
        assert wheel._handle is not None
        wheel._handle.cancel()
    assert served == []
    wheel._fire()
    assert served == [1]
    assert wheel._handle is not None
    wheel._handle.cancel()
