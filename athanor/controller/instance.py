"""One model's runtime instance and the only code that changes its phase.

    Standby -> Starting -> Ready -> Draining -> Stopping -> Standby
                  |          |         |           |
                  v          v         v           v
                Failed <-----+---------+-----------+   (a start error, a crash, a runtime that stopped
                                                        answering, or a stop its service manager failed)
    Starting -> Stopping (a stop aborts the start)
    Failed -> Starting (a new request retries, unless it keeps failing) | Stopping (a stop, or cleaning up)

``Draining`` is a stop under way that waits for the requests already in flight: new requests wait for what
comes next instead of going to the runtime. Every move goes through ``Instance.move``, which checks the table,
stamps the time, wakes every waiter and tells each subscribed observer ``(instance, old, new)``: persistence
now, metrics and the TUI later. Callers never read a phase and then act on it from outside; they ask the
controller to ``use`` a model and it decides.

A runtime process has an ``incarnation``: the count of processes this instance has run. Anything said about a
runtime ("it died") carries the incarnation it is about, so a report about a process that is already replaced
or already accounted for changes nothing: one crash is one failure, however many requests saw it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from athanor.controller.changes import Changes
from athanor.controller.phase import Phase, TransitionError
from athanor.managers.base import Handle
from athanor.runtimes.launch import LaunchSpec

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

__all__ = ["ALLOWED", "RUNNING", "Instance", "Observer", "Phase", "TransitionError"]

ALLOWED: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.STANDBY: frozenset({Phase.STARTING}),
    Phase.STARTING: frozenset({Phase.READY, Phase.FAILED, Phase.STOPPING}),
    Phase.READY: frozenset({Phase.DRAINING, Phase.FAILED}),
    Phase.DRAINING: frozenset({Phase.STOPPING, Phase.FAILED}),
    Phase.STOPPING: frozenset({Phase.STANDBY, Phase.FAILED}),  # Failed: the stop failed, the job may still run
    Phase.FAILED: frozenset({Phase.STARTING, Phase.STOPPING}),
}
RUNNING: Final = frozenset({Phase.STARTING, Phase.READY, Phase.DRAINING})  # a process of ours may be serving

Observer = Callable[["Instance", Phase, Phase], None]  # (instance, old phase, new phase)


@dataclass(eq=False)
class Instance:
    name: str
    phase: Phase = Phase.STANDBY
    phase_since: float = field(default_factory=time.time)
    message: str = ""
    handle: Handle | None = None  # the JSON handle its service manager made (it alone reads what is inside)
    launch: LaunchSpec | None = None
    generation: int = 0
    incarnation: int = 0
    inflight: int = 0
    waiting: int = 0
    last_used: float = 0.0
    failures: list[float] = field(default_factory=list)
    last_failure: dict[str, Any] | None = None
    missed_probes: int = 0  # consecutive liveness probes a ready runtime did not answer
    error_streak: int = 0  # consecutive requests it answered with a server error
    refusal: dict[str, Any] | None = None  # the last start refused before it began (memory, preflight)
    force_next: bool = False  # athanor start --force: the memory guard lets this start through
    keep_alive: float | None = None  # idle limit an Ollama client set (seconds; inf: never), until it unloads
    starting_since: float = 0.0  # monotonic time the current incarnation started
    load_seconds: float | None = None  # how long its start took (None: not started by this daemon)
    # The most tokens a request to this incarnation may have left in one of its slots (prompt and completion, as
    # the runtime reported them); None: not known (a request that reported none, a runtime re-attached). Parking
    # asks the runtime for its slots only when some slot may hold a conversation worth keeping.
    slot_tokens: int | None = None
    upstream: tuple[LaunchSpec, Any] | None = None  # (the launch it was made from, lease.Upstream): lease.upstream_of
    start_task: asyncio.Task[None] | None = None
    cleanup_task: asyncio.Task[None] | None = None  # stopping a failed runtime's process; a new start waits for it
    abort: asyncio.Event = field(default_factory=asyncio.Event)  # set: the start under way must give up
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the last request in flight leaves; made only while someone waits (``until_idle``): the request path
    # enters and leaves once per request, and an Event's set and clear cost two calls each time.
    _idle: asyncio.Event | None = field(default=None, init=False, repr=False)
    observers: list[Observer] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)  # the controller's: bumped by phases and counts (status feed)

    def __post_init__(self) -> None:
        self._idle = None  # compiled (athanor/native.py), a field left out of __init__ gets no default of its own

    def move(self, new: Phase, message: str = "") -> None:
        old = self.phase
        if new not in ALLOWED[old]:
            raise TransitionError(f"{self.name}: {old.value} -> {new.value} is not a valid transition")
        self.phase = new
        self.phase_since = time.time()
        if new is Phase.STARTING:
            self.incarnation += 1
            self.slot_tokens = None  # a start says 0 once its process is new; a re-attached one's are not known
            self.missed_probes = 0
            self.error_streak = 0
            self.starting_since = _monotonic()
            self.load_seconds = None
            self.abort = asyncio.Event()
        if new is Phase.READY:
            self.last_used = _monotonic()  # idle time counts from readiness, not from the last request
        elif new in (Phase.STANDBY, Phase.FAILED):
            self.keep_alive = None  # it held for that load only
        self.message = message
        # Wake everyone waiting on any change, then arm a fresh event for the next one.
        self.changed.set()
        self.changed = asyncio.Event()
        self.changes.bump()
        for observer in self.observers:
            observer(self, old, new)

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(instance, old, new)`` after every phase change, in the order observers subscribed.
        Observers run inside the change: they must not block or raise (queue the work instead)."""
        self.observers.append(observer)

    def enter(self) -> None:
        self.inflight += 1
        self.last_used = _monotonic()
        self.changes.bump()

    def leave(self) -> None:
        self.inflight -= 1
        self.last_used = _monotonic()
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None
        self.changes.bump()

    async def until_idle(self) -> None:
        """Until no request is in flight."""
        while self.inflight:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    def slot_used(self, tokens: int | None, incarnation: int) -> None:
        """A request to runtime ``incarnation`` is over; ``tokens``: what it may have left in a slot (None: not
        known)."""
        if incarnation != self.incarnation or self.slot_tokens is None:
            return
        self.slot_tokens = None if tokens is None else max(self.slot_tokens, tokens)

    def add_waiting(self, delta: int) -> None:
        """One more (1) or one fewer (-1) request waiting for this model to serve (``Lease``)."""
        self.waiting += delta
        self.changes.bump()
