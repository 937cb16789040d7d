"""The swap gate: who goes next when requests wait for a load or a swap.

Plain FIFO makes two clients alternating between two models pay one swap per request: the queue reads
``B A B A`` and every entry swaps. The gate admits waiters whose model is already loaded ahead of older waiters
that need a swap, so the same queue is served ``A A`` (no swap) then ``B B`` (one swap). Jumping the queue is
bounded: after ``max_jumps`` admissions ahead of it, the oldest waiter goes next whatever is loaded, so a busy
model cannot starve a waiting one.

One holder at a time, like a lock; ownership passes straight to the chosen waiter on release, so no newcomer can
slip in between. The choice itself is ``pick_next``, a pure function.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

MAX_JUMPS = 16


def pick_next(waiting: Sequence[str], loaded: Callable[[str], bool], jumps: int, max_jumps: int) -> int:
    """Index of the waiter to admit: the oldest whose model is loaded while the oldest waiter may still be
    passed over, else the oldest."""
    if jumps < max_jumps:
        for index, model in enumerate(waiting):
            if loaded(model):
                return index
    return 0


class SwapGate:
    def __init__(self, loaded: Callable[[str], bool], max_jumps: int = MAX_JUMPS):
        self._loaded = loaded
        self._max_jumps = max_jumps
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []
        self._held = False
        self._jumps = 0  # admissions ahead of the current oldest waiter

    @property
    def busy(self) -> bool:
        """Someone holds the gate or waits for it: a swap may be under way, so nobody takes a shortcut."""
        return self._held or bool(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, model: str) -> AsyncIterator[None]:
        await self._acquire(model)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, model: str) -> None:
        if not self.busy:
            self._held = True
            return
        entry = (model, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif entry[1].done() and not entry[1].cancelled():
                self._release()  # handed the gate, then cancelled before using it: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            index = pick_next([model for model, _ in self._waiters], self._loaded, self._jumps, self._max_jumps)
            _, future = self._waiters.pop(index)
            self._jumps = self._jumps + 1 if index else 0
            if not future.done():  # a cancelled waiter may not have removed itself yet
                future.set_result(None)
                return
        self._held = False
