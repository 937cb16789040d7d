"""The background tasks the controller owns: starts, stops, clean-ups, probes, the monitor's duties.

Each is kept until it ends, so shutdown can wait for all of them, and a task that fails has its error logged
rather than lost (an asyncio task nobody awaits swallows its exception until it is garbage collected).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("athanor.controller")

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]  # (coroutine, task name) -> the task


class OwnedTasks:
    """Tasks started with ``spawn``: awaited by ``wait``, their failures logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def wait(self) -> None:
        """Until every task started so far has ended (their errors are already logged)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())
