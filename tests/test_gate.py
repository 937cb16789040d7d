"""The swap gate's order: loaded models first (bounded), then the oldest waiter; cancellation never wedges it."""

from __future__ import annotations

import asyncio

import pytest

from athanor.controller.gate import SwapGate, pick_next


@pytest.mark.parametrize(("waiting", "loaded", "jumps", "expected"), [
    (["b", "a", "b", "a"], {"a"}, 0, 1),   # a loaded waiter goes ahead of the older one needing a swap
    (["b", "a"], {"a"}, 3, 0),             # ... until the oldest has been passed over max_jumps times
    (["b", "c"], {"a"}, 0, 0),             # nobody's model is loaded: plain FIFO
    (["a", "b"], {"a", "b"}, 0, 0),        # several loaded (memory residency): the oldest of them
    (["b", "a"], set(), 0, 0),
])
def test_pick_next(waiting, loaded, jumps, expected):
    assert pick_next(waiting, loaded.__contains__, jumps, 3) == expected


async def _order(gate: SwapGate, models: list[str], cancel: set[int] = frozenset()) -> list[str]:
    """Queue one waiter per model behind a holder, release, and return the order they were admitted in."""
    admitted: list[str] = []

    async def waiter(model: str) -> None:
        async with gate.hold(model):
            admitted.append(model)
            await asyncio.sleep(0)  # let the others pile up behind while this one holds the gate

    first = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.hold("holder"):
            first.set()
            await release.wait()

    held = asyncio.create_task(holder())
    await first.wait()
    tasks = []
    for model in models:
        tasks.append(asyncio.create_task(waiter(model)))
        await asyncio.sleep(0)  # enqueue in this order
    for index in cancel:
        tasks[index].cancel()
    release.set()
    await asyncio.gather(held, *tasks, return_exceptions=True)
    assert not gate.busy
    return admitted


def test_waiters_for_the_loaded_model_are_admitted_first():
    gate = SwapGate({"a"}.__contains__)
    assert asyncio.run(_order(gate, ["b", "a", "b", "a"])) == ["a", "a", "b", "b"]


def test_jumping_the_queue_is_bounded():
    gate = SwapGate({"a"}.__contains__, max_jumps=2)
    assert asyncio.run(_order(gate, ["b", "a", "a", "a", "c"])) == ["a", "a", "b", "a", "c"]


def test_nothing_loaded_is_fifo():
    gate = SwapGate(lambda model: False)
    assert asyncio.run(_order(gate, ["c", "b", "a"])) == ["c", "b", "a"]


def test_cancelled_waiters_are_skipped():
    gate = SwapGate(lambda model: False)
    assert asyncio.run(_order(gate, ["a", "b", "c"], cancel={0, 2})) == ["b"]


def test_a_waiter_cancelled_after_being_admitted_passes_the_gate_on():
    async def scenario() -> list[str]:
        gate = SwapGate(lambda model: False)
        admitted: list[str] = []
        async with gate.hold("holder"):
            first = asyncio.create_task(gate.hold("first").__aenter__())
            await asyncio.sleep(0)

            async def second() -> None:
                async with gate.hold("second"):
                    admitted.append("second")

            task = asyncio.create_task(second())
            await asyncio.sleep(0)
        first.cancel()  # admitted by the release above, cancelled before it ran
        await asyncio.gather(first, return_exceptions=True)
        await task
        assert not gate.busy
        return admitted

    assert asyncio.run(scenario()) == ["second"]
