"""This machine's memory: total, and what a new model can take without pushing anything out."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Memory:
    """Bytes. ``available``: what can be had without swapping (macOS: free + inactive + speculative + purgeable
    pages as vm_stat counts them; elsewhere psutil's available, Linux's MemAvailable)."""

    total: int
    available: int


def machine_memory() -> Memory:
    import psutil

    vm = psutil.virtual_memory()
    if sys.platform == "darwin":
        available = _vm_stat_available()
        if available is not None:
            return Memory(vm.total, available)
    return Memory(vm.total, vm.available)


_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_COUNT = re.compile(r'^"?Pages (free|inactive|speculative|purgeable)"?:\s+(\d+)\.?\s*$', re.MULTILINE)


def _vm_stat_available() -> int | None:
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_vm_stat(out)


def parse_vm_stat(text: str) -> int | None:
    """(free + inactive + speculative + purgeable) x page size from ``vm_stat``'s output, None if it is not that.
    On Apple Silicon unified memory, inactive and purgeable pages are what the kernel hands over without
    swapping, and psutil's figure leaves them out."""
    size = _PAGE_SIZE.search(text)
    counts = {kind: int(n) for kind, n in _COUNT.findall(text)}
    if not size or "free" not in counts:
        return None
    return sum(counts.values()) * int(size.group(1))
