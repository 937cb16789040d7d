"""Will a model fit this machine? A memory estimate per model, this machine's memory, and a verdict.

    estimate_model(doc, obj)          a registered model as it would run now (its effective preset)
    estimate_meta(meta, ...)          metadata alone: a Hub repo before download
    machine_memory()                  total and available bytes (macOS: vm_stat's unified memory)
    band(total, memory)               comfortable | tight | risky against available less headroom(total)
    recommended_context(doc, obj, m)  the largest context that stays comfortable (else tight)

How each part of the estimate is counted is in ``_estimate``; which metadata keys are read, and what discovery
does not record yet, in ``_shape``; the constants are checked against real runtimes by
benchmarks/fit_calibration.py. Importing this package is light: psutil loads only when memory is measured.
"""

from athanor.fit._budget import band, headroom, recommended_context
from athanor.fit._estimate import Estimate, estimate_meta, estimate_model
from athanor.fit._memory import Memory, machine_memory

__all__ = [
    "Estimate",
    "Memory",
    "band",
    "estimate_meta",
    "estimate_model",
    "headroom",
    "machine_memory",
    "recommended_context",
]
