"""One model's runtime instance and the only code that changes its phase.

    Standby -> Starting -> Ready -> Stopping -> Standby
                  |          |
                  v          v
                Failed <-----+   (start error, or the process died)
    Failed -> Starting (a new request retries, unless it keeps crashing) | Standby (stop)

Every move goes through ``Instance.move``, which checks the table, stamps the time, wakes every waiter and tells
the listener (the controller persists it). Callers never read a phase and then act on it from outside; they
ask the controller to ``use`` a model and it decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from athanor.managers.process import ProcessHandle
from athanor.runtimes.launch import LaunchSpec


class Phase(str, Enum):
    STANDBY = "Standby"
    STARTING = "Starting"
    READY = "Ready"
    STOPPING = "Stopping"
    FAILED = "Failed"


ALLOWED: dict[Phase, set[Phase]] = {
    Phase.STANDBY: {Phase.STARTING},
    Phase.STARTING: {Phase.READY, Phase.FAILED, Phase.STOPPING},
    Phase.READY: {Phase.STOPPING, Phase.FAILED},
    Phase.STOPPING: {Phase.STANDBY},
    Phase.FAILED: {Phase.STARTING, Phase.STANDBY, Phase.STOPPING},
}


class TransitionError(RuntimeError):
    """A phase change the table forbids: a bug in the controller, never a user error."""


@dataclass
class Instance:
    name: str
    phase: Phase = Phase.STANDBY
    phase_since: float = field(default_factory=time.time)
    message: str = ""
    handle: ProcessHandle | None = None
    launch: LaunchSpec | None = None
    generation: int = 0
    inflight: int = 0
    waiting: int = 0
    draining: bool = False  # being stopped: requests already in flight finish, new ones wait for what comes next
    last_used: float = 0.0
    failures: list[float] = field(default_factory=list)
    last_failure: dict[str, Any] | None = None
    start_task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    on_change: Callable[[Instance, Phase], None] | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    def move(self, new: Phase, message: str = "") -> None:
        old = self.phase
        if new not in ALLOWED[old]:
            raise TransitionError(f"{self.name}: {old.value} -> {new.value} is not a valid transition")
        self.phase = new
        self.phase_since = time.time()
        if new is Phase.STARTING:
            self.draining = False
        if new is Phase.READY:
            self.last_used = time.monotonic()  # idle time counts from readiness, not from the last request
        self.message = message
        # Wake everyone waiting on any change, then arm a fresh event for the next one.
        self.changed.set()
        self.changed = asyncio.Event()
        if self.on_change:
            self.on_change(self, old)

    def enter(self) -> None:
        self.inflight += 1
        self.last_used = time.monotonic()
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        self.last_used = time.monotonic()
        if self.inflight == 0:
            self.idle.set()
