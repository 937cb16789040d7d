"""The preflight memory guard: a model that would push the machine into swap (on a Mac, possibly a kernel panic)
is refused before anything starts, and before anything is evicted for it.

The question is not "is there room now" but "could there be room": what is available now, plus what stopping the
models this start would evict gives back, less the headroom the OS needs. Which models those are, and so what
they give back, is decided once, by ``residency.plan_room``: the guard judges the very evictions that will be
made. A model that cannot fit even with every evictable model stopped is refused at once, with nothing stopped
(Ollama's known failure is to empty the machine first and then fail anyway). A model bigger than the machine's
usable memory is refused the same way. The spec can allow it (``spec.allowOvercommit``, the Gateway's
``residency.allowOvercommit``), and so can ``athanor start --force`` for one start.
"""

from __future__ import annotations

from typing import Any

from athanor.controller.residency import RoomPlan
from athanor.fit import Estimate
from athanor.quantities import GIB


def refusal(name: str, estimate: Estimate, plan: RoomPlan) -> str | None:
    """Why a start of model ``name`` (``estimate``) under ``plan`` is refused for memory, or None when the machine
    holds it after the plan's evictions."""
    if plan.fits:
        return None
    parts = (f"weights {_gib(estimate.weights)}, KV cache {_gib(estimate.kv_cache)} at context {estimate.context}"
             + (f", projector {_gib(estimate.projector)}" if estimate.projector else "")
             + (f", draft {_gib(estimate.draft)}" if estimate.draft else ""))
    fixes = ("lower spec.preset.ctxSize, pick a smaller quantization, or allow it with spec.allowOvercommit / "
             f"'athanor start --force {name}'")
    if plan.need > plan.usable:
        return (f"not enough memory, ever: model {name!r} needs about {_gib(plan.need)} ({parts}), more than this "
                f"machine can give a model ({_gib(plan.usable + plan.reserve)} total, {_gib(plan.reserve)} kept "
                f"for the system): {fixes}")
    evicting = f", {_gib(plan.freed)} of it by stopping other models" if plan.freed else ""
    return (f"not enough memory: model {name!r} needs about {_gib(plan.need)} ({parts}), but only "
            f"{_gib(max(plan.room, 0))} can be made available now ({_gib(plan.available)} available"
            f"{evicting}, {_gib(plan.reserve)} kept for the system); nothing was stopped for it: {fixes}")


def overcommit_allowed(gateway: dict[str, Any], obj: dict[str, Any]) -> bool:
    return bool(obj["spec"].get("allowOvercommit") or gateway["residency"].get("allowOvercommit"))


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"
