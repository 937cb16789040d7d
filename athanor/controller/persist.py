"""Observed state written to state.json off the event loop, coalesced.

The daemon's record of its instances must never stall serving: state.json is shared with the CLI under a file
lock, and a CLI holding that lock (or a slow disk) would freeze every request if the write ran on the loop. So
phase changes only put the newest record of an instance (and any event) into a pending batch; one writer task
writes the batch in a worker thread, and whatever arrives meanwhile goes into the next batch. A write that fails
(the lock is held too long, the file is corrupt) is logged and retried with the next batch: serving goes on, and
the newest record of each instance wins.

A batch is written ``COALESCE_S`` after its first change, unless it must go at once: a record with a process handle
not written before (a runtime just spawned, or adopted: a daemon killed now must find it, or it would be left
running untracked, holding its port), and whatever someone waits for (``settled``: a command that reads its own
change; ``close``). A swap changes two instances four or five times within some 30 ms, and each write holds the
GIL for a millisecond or two (state.json keeps 500 events): written as they came, those writes slowed the very
start they recorded. Gathered, a swap is two writes: its new process at once, the rest after it.

What waits is bounded however long the writes keep failing: one record per instance (the newest; an instance
forgotten meanwhile waits as a removal), and the newest ``MAX_EVENTS`` events, since state.json keeps no more
than that anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

from athanor.errors import StoreError
from athanor.store import Store
from athanor.store.store import MAX_EVENTS

log = logging.getLogger("athanor.persist")

RETRY_DELAY_S = 1.0
COALESCE_S = 0.05  # how long a change waits for the others of its burst before they are written together


class StateWriter:
    def __init__(self, store: Store):
        self._store = store
        self._records: dict[str, dict[str, Any] | None] = {}  # None: remove the instance's record
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._dirty = asyncio.Event()
        self._hurry = asyncio.Event()  # set: what is pending must be written now
        self._handles: dict[str, Any] = {}  # the newest process handle queued per instance
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._closing = False
        self._queued = 0  # changes queued so far
        self._written = 0  # ... of which written
        self._progress = asyncio.Condition()

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Queue the newest record of instance ``name``; an older one still pending is dropped. A process handle
        it had not recorded yet is written at once."""
        self._records[name] = record
        handle = record.get("handle")
        if handle is not None and handle != self._handles.get(name):
            self._handles[name] = handle
            self._hurry.set()
        self._wake()

    def forget(self, name: str) -> None:
        """Queue the removal of instance ``name``'s record (its model was deleted); a record pending is dropped."""
        self._records[name] = None
        self._handles.pop(name, None)
        self._wake()

    def event(self, event: dict[str, Any]) -> None:
        """Queue an event; past ``MAX_EVENTS`` pending, the oldest is dropped (state.json would drop it too)."""
        self._events.append(event)
        self._wake()

    @property
    def pending(self) -> tuple[int, int]:
        """(records, events) waiting to be written."""
        return len(self._records), len(self._events)

    def _wake(self) -> None:
        self._queued += 1
        self._dirty.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="state-writer")

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            if not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), COALESCE_S)
            self._hurry.clear()
            self._dirty.clear()
            batch = self._queued
            records, events = self._records, list(self._events)
            self._records = {}
            self._events.clear()
            try:
                await asyncio.to_thread(self._write, records, events)
            except (StoreError, OSError) as exc:
                if self._closing:
                    log.error("cannot record the final state: %s", exc)
                    return
                if not self._failing:
                    log.error("cannot record state, serving goes on (retrying): %s", exc)
                self._failing = True
                self._records = {**records, **self._records}  # what arrived meanwhile is newer
                self._events = deque([*events, *self._events], maxlen=MAX_EVENTS)  # the newest, in order
                self._dirty.set()
                await asyncio.sleep(RETRY_DELAY_S)  # a retry interval, not synchronisation
                continue
            if self._failing:
                log.info("recording state again")
                self._failing = False
            async with self._progress:
                self._written = batch
                self._progress.notify_all()
            if self._closing and not self._dirty.is_set():
                return

    def _write(self, records: dict[str, dict[str, Any] | None], events: list[dict[str, Any]]) -> None:
        with self._store.state.edit(changes=True) as state:
            for name, record in records.items():
                if record is None:
                    state["instances"].pop(name, None)
                else:
                    state["instances"][name] = record
            if events:
                state["events"] = (state["events"] + events)[-MAX_EVENTS:]

    async def settled(self, timeout: float) -> bool:
        """Wait until everything queued so far is in state.json (at most ``timeout`` seconds), so that a command
        that changed a model reads its own change. False if the file stayed locked or unwritable meanwhile."""
        target = self._queued
        if self._written < target:
            self._hurry.set()
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self._written >= target), timeout)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        """Write what is pending, then stop (shutdown)."""
        self._closing = True
        if self._task is not None:
            self._dirty.set()
            self._hurry.set()
            await self._task
            self._task = None
