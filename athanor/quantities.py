"""Quantities as written in specs: durations (``90s``, ``1h30m``, ``never``) and sizes (``24GiB``, ``80%``)."""

from __future__ import annotations

import re

GIB = 2**30  # bytes in a GiB: what sizes are shown and reasoned in (memory, tiers, headroom)

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KiB": 2**10, "MiB": 2**20, "GiB": GIB, "TiB": 2**40}


def parse_duration(text: str) -> float | None:
    """Seconds, or None for ``never`` / ``0`` (no limit). The schema has already checked the shape."""
    if text in ("never", "0"):
        return None
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(text))


def parse_budget(text: str, total_bytes: int) -> int:
    """Bytes from ``80%`` (of ``total_bytes``) or ``24GiB``."""
    if text.endswith("%"):
        return int(total_bytes * float(text[:-1]) / 100)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
