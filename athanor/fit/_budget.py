"""Whether an estimate fits: OS headroom, bands, and the context a model can afford here."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

from athanor.fit._estimate import estimate_model
from athanor.fit._memory import Memory
from athanor.fit._shape import read_shape
from athanor.quantities import GIB

# (machine size, headroom) corners of the curve; flat outside them, linear between.
HEADROOM_CURVE = ((8 * GIB, 2 * GIB), (64 * GIB, 6 * GIB), (128 * GIB, 8 * GIB))
COMFORTABLE_SHARE = 0.75  # of the budget
SMALLEST_CONTEXT = 512


def headroom(total: int) -> int:
    """Memory left to the OS and everything else, on a machine of ``total`` bytes.

    ``available`` already leaves out what runs now; headroom is for what comes while the model runs: the OS's
    own wired memory, file cache and compressor room, and the browser tab or build started later. 2 GiB is what a
    small macOS or Linux desktop needs to stay responsive, so machines up to 8 GiB keep that. At 64 GiB, 6 GiB: the
    low end of the 6-8 GiB macOS wants on big Macs (AGENTS.md step 3), and bigger machines run bigger
    workloads beside their models; 8 GiB from 128 GiB up. Linear in between, since the OS's page tables and caches
    and what people run beside the models grow with the machine.
    """
    (low, low_room), *_ = HEADROOM_CURVE
    if total <= low:
        return low_room
    for (x0, y0), (x1, y1) in pairwise(HEADROOM_CURVE):
        if total <= x1:
            return y0 + (y1 - y0) * (total - x0) // (x1 - x0)
    return HEADROOM_CURVE[-1][1]


def band(estimate_total: int, memory: Memory) -> str:
    """``comfortable``, ``tight`` or ``risky`` against the budget: available memory less ``headroom``.

    - comfortable: at most 75% of the budget. The quarter left covers the estimate's error (in the calibration
      never under on llama-server, 4-15% over for SmolLM2; MLX on the CPU peaks above it while it prefills long
      prompts) and what serving adds that no estimate sees: llama-server's prompt cache in RAM (--cache-ram),
      image buffers, an MLX cache growing past the context counted.
    - tight: within the budget. It loads, but other programs growing can push the machine into swap.
    - risky: over the budget. It needs memory other programs hold now: swap at best, an out-of-memory kill or (on
      macOS under memory pressure) a panic at worst.
    """
    budget = memory.available - headroom(memory.total)
    if budget > 0 and estimate_total <= budget * COMFORTABLE_SHARE:
        return "comfortable"
    if budget > 0 and estimate_total <= budget:
        return "tight"
    return "risky"


def candidate_contexts(window: int) -> list[int]:
    """Powers of two and the halfway steps between them (512, 768, 1024, 1536, ...) below ``window``, then the
    window itself."""
    sizes: list[int] = []
    power = SMALLEST_CONTEXT
    while power < window:
        sizes += [c for c in (power, power * 3 // 2) if c < window]
        power *= 2
    return sizes + [window]


def recommended_context(doc: dict[str, Any], obj: dict[str, Any], memory: Memory) -> int | None:
    """The largest candidate context (``candidate_contexts``, bounded by the model's own window) at which the
    model stays comfortable, else the largest at which it is tight; None when even the smallest is risky or the
    weights are not on disk."""
    artifact = obj.get("artifact")
    if not artifact:
        return None
    window = read_shape(artifact.get("metadata") or {}).context_length or estimate_model(doc, obj).context
    return largest_context(window, lambda context: estimate_model(doc, obj, context=context).total, memory)


def largest_context(window: int, total_at: Callable[[int], int], memory: Memory) -> int | None:
    """``recommended_context`` for any estimate: ``total_at(context)`` is the estimate's total at that context."""
    tight = None
    for context in reversed(candidate_contexts(window)):
        fit = band(total_at(context), memory)
        if fit == "comfortable":
            return context
        if fit == "tight" and tight is None:
            tight = context
    return tight
