"""The preflight memory guard: a model that would push the machine into swap (on a Mac, possibly a kernel panic)
is refused before anything starts, and before anything is evicted for it.

The question is not "is there room now" but "could there be room": what is available now, plus what stopping the
models a start may evict would give back, less the headroom the OS needs. A model that cannot fit even with
every evictable model stopped is refused at once, with nothing stopped (Ollama's known failure is to empty the
machine first and then fail anyway). A model bigger than the machine's usable memory is refused the same way.
The spec can allow it (``spec.allowOvercommit``, the Gateway's ``residency.allowOvercommit``), and so can
``athanor start --force`` for one start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Verdict:
    """Why a start is refused for memory (``problem``), or None when it may go ahead."""

    problem: str | None
    need: int
    room: int  # what could be made available: available now + what evictions free - headroom


def check(doc: dict[str, Any], obj: dict[str, Any], evictable: list[dict[str, Any]]) -> Verdict:
    """Whether ``obj`` can start, given the models a start may evict (their stored objects). Reads the machine's
    memory (on macOS through vm_stat): run it off the event loop."""
    from athanor.fit import estimate_model, headroom, machine_memory

    name = obj["metadata"]["name"]
    estimate = estimate_model(doc, obj)
    memory = machine_memory()
    reserve = headroom(memory.total)
    freeable = sum(estimate_model(doc, other).total for other in evictable)
    room = memory.available + freeable - reserve
    usable = memory.total - reserve
    need = estimate.total
    parts = (f"weights {_gib(estimate.weights)}, KV cache {_gib(estimate.kv_cache)} at context {estimate.context}"
             + (f", projector {_gib(estimate.projector)}" if estimate.projector else "")
             + (f", draft {_gib(estimate.draft)}" if estimate.draft else ""))
    fixes = ("lower spec.preset.ctxSize, pick a smaller quantization, or allow it with spec.allowOvercommit / "
             f"'athanor start --force {name}'")
    if need > usable:
        return Verdict(f"not enough memory, ever: model {name!r} needs about {_gib(need)} ({parts}), more than this "
                       f"machine can give a model ({_gib(memory.total)} total, {_gib(reserve)} kept for the "
                       f"system): {fixes}", need, room)
    if need > room:
        evicting = f", {_gib(freeable)} of it by stopping other models" if freeable else ""
        return Verdict(f"not enough memory: model {name!r} needs about {_gib(need)} ({parts}), but only "
                       f"{_gib(max(room, 0))} can be made available now ({_gib(memory.available)} available"
                       f"{evicting}, {_gib(reserve)} kept for the system); nothing was stopped for it: {fixes}",
                       need, room)
    return Verdict(None, need, room)


def overcommit_allowed(gateway: dict[str, Any], obj: dict[str, Any]) -> bool:
    return bool(obj["spec"].get("allowOvercommit") or gateway["residency"].get("allowOvercommit"))


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"
