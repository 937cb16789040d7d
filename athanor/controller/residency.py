"""Making room for a start: which loaded models it stops, and whether it then fits. One computation decides both.

A start meets two limits. The machine's: what is available now, plus what the models stopped for it give back,
less the headroom the OS keeps (``fit.headroom``). And under ``memory`` residency the budget's: the estimates of
the models that stay, plus the new one's, within ``residency.budget``. ``plan_room`` stops the least recently used
evictable models until both hold; under ``single`` residency every evictable model goes. When the machine's limit
cannot hold even with every evictable model gone, the memory guard (``memory_guard.py``) refuses the start with
nothing stopped. A start that only overruns the budget (pinned models can fill it) goes ahead with every evictable
model stopped: the budget is a target, the machine is a limit.

Why one computation: the guard once counted room as if every evictable model would stop, while eviction stopped
models only down to the budget's share of total memory, ignoring what was available. A model passed the guard,
nothing was evicted for it, and it started into swap.

``plan_room`` is pure (memory figures come in as arguments); ``plan_start`` adds the estimates and the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from athanor.fit import Estimate, Memory, estimate_model, headroom
from athanor.quantities import parse_budget


@dataclass(frozen=True)
class Resident:
    """A model with a runtime (loading, serving or draining), as the plan sees it."""

    name: str
    size: int  # its estimated bytes (0 when its model was deleted: nothing is known about it any more)
    last_used: float  # monotonic; the least recently used goes first
    evictable: bool  # False for pinned models


@dataclass(frozen=True)
class RoomPlan:
    """What a start of ``need`` bytes stops, and what the machine then has for it."""

    evict: tuple[str, ...]  # least recently used first
    need: int
    available: int  # available now
    freed: int  # what stopping ``evict`` gives back
    reserve: int  # kept for the OS
    usable: int  # what this machine can give a model at all: total less the reserve

    @property
    def room(self) -> int:
        """What the start would have after the evictions."""
        return self.available + self.freed - self.reserve

    @property
    def fits_beside(self) -> bool:
        """The machine holds it with every evicted model still loaded: their stops (drain, parking, exit) can
        overlap its start instead of preceding it."""
        return self.need <= min(self.available - self.reserve, self.usable)

    @property
    def fits(self) -> bool:
        """The machine holds it after the evictions (and could at all: estimates freed can overstate)."""
        return self.need <= min(self.room, self.usable)


def plan_room(need: int, residents: Sequence[Resident], memory: Memory, *, reserve: int,
              budget: int | None) -> RoomPlan:
    """Stop the least recently used evictable residents until the machine has ``need`` bytes to spare after
    ``reserve``, and (``budget`` not None: ``memory`` residency) the residents left plus ``need`` fit ``budget``;
    ``budget`` None (``single`` residency): every evictable resident goes. When nothing more can be stopped, the
    plan stops every evictable resident and ``fits`` says whether that is enough."""
    candidates = sorted((r for r in residents if r.evictable), key=lambda r: r.last_used)
    kept = sum(r.size for r in residents)
    freed = 0
    evict: list[str] = []
    for victim in candidates:
        enough_memory = memory.available + freed - reserve >= need
        within_budget = budget is not None and kept + need <= budget
        if enough_memory and within_budget:
            break
        evict.append(victim.name)
        freed += victim.size
        kept -= victim.size
    return RoomPlan(tuple(evict), need, memory.available, freed, reserve, memory.total - reserve)


class Estimates:
    """Each model's estimate under one desired-state document, worked out once. An estimate comes from the stored
    document (and the size of a projector or draft file it names), and ``DesiredState`` replaces the document on
    every change, so an apply or a scan starts afresh; a swap back and forth reuses them (two estimates were about a
    tenth of a millisecond of each swap's critical path here)."""

    def __init__(self) -> None:
        self._memo: tuple[dict[str, Any] | None, dict[str, Estimate]] = (None, {})

    def of(self, doc: dict[str, Any], obj: dict[str, Any]) -> Estimate:
        memo = self._memo  # one read: a worker thread planning under an older document keeps to its own
        if memo[0] is not doc:
            memo = self._memo = (doc, {})
        name = obj["metadata"]["name"]
        estimate = memo[1].get(name)
        if estimate is None:
            estimate = memo[1][name] = estimate_model(doc, obj)
        return estimate


def plan_start(doc: dict[str, Any], obj: dict[str, Any], residents: Sequence[tuple[str, float, bool]],
               residency: dict[str, Any], memory: Memory, estimates: Estimates | None = None,
               ) -> tuple[RoomPlan, Estimate]:
    """``plan_room`` for a start of ``obj`` under the Gateway's ``residency``, with every estimate taken from the
    stored document; ``residents``: (name, last used, evictable) of the models with a runtime; ``estimates``: those
    worked out for earlier starts. Estimates read stored metadata only, yet are not free: run it off the event
    loop."""
    estimated = (estimates or Estimates()).of
    estimate = estimated(doc, obj)
    models = doc["models"]
    sized = [Resident(name, estimated(doc, models[name]).total if name in models else 0, last_used, evictable)
             for name, last_used, evictable in residents]
    budget = (parse_budget(residency.get("budget", "80%"), memory.total) if residency["policy"] == "memory"
              else None)
    return plan_room(estimate.total, sized, memory, reserve=headroom(memory.total), budget=budget), estimate
