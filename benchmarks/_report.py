"""Figures with targets: medians with min-max over rounds, a pass/miss mark, the table, JSON, and a comparison.

A figure's raw values are one per round (or one per run for a figure measured once); the median decides the
mark. A target is ``("<=", bound)`` or ``(">=", bound)`` against a number, or ``("<=", "other-key")`` against
another figure's median (athanor against a peer); ``None`` marks a figure reported for reference.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Target = tuple[str, float | str] | None


@dataclass(frozen=True)
class Row:
    key: str  # the figure's key in the raw values
    name: str
    unit: str  # printed after the value: "ms", "x", "MiB", ...
    target: Target = None
    digits: int = 2


def median(values: list[float]) -> float:
    return statistics.median(values)


def _bound(target: Target, raw: dict[str, list[float]]) -> float | None:
    if target is None:
        return None
    bound = target[1]
    if isinstance(bound, str):
        return median(raw[bound]) if raw.get(bound) else None
    return bound


def mark(row: Row, raw: dict[str, list[float]]) -> str:
    bound = _bound(row.target, raw)
    if row.target is None or bound is None or not raw.get(row.key):
        return "-"
    value = median(raw[row.key])
    ok = value <= bound if row.target[0] == "<=" else value >= bound
    return "PASS" if ok else "MISS"


def target_text(row: Row, rows: dict[str, Row]) -> str:
    if row.target is None:
        return "-"
    op, bound = row.target
    if isinstance(bound, str):
        return f"{op} {rows[bound].name}" if bound in rows else f"{op} {bound}"
    return f"{op} {bound:g} {row.unit}".rstrip()


def value_text(row: Row, values: list[float]) -> str:
    if not values:
        return "not measured"
    mid = f"{median(values):.{row.digits}f}"
    if len(values) == 1:
        return f"{mid} {row.unit}".rstrip()
    return f"{mid} {row.unit} ({min(values):.{row.digits}f}-{max(values):.{row.digits}f})"


def table(headers: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def figures_table(sections: list[tuple[str, list[Row]]], raw: dict[str, list[float]]) -> str:
    """Every row: name, median (min-max), target, mark; one block per section."""
    by_key = {row.key: row for _, rows in sections for row in rows}
    blocks = []
    for title, rows in sections:
        lines = [[row.name, value_text(row, raw.get(row.key, [])), target_text(row, by_key), mark(row, raw)]
                 for row in rows]
        blocks.append(f"{title}\n" + table(["figure", "median (min-max over rounds)", "target", "mark"], lines))
    return "\n\n".join(blocks)


def rows_json(sections: list[tuple[str, list[Row]]], raw: dict[str, list[float]]) -> list[dict[str, Any]]:
    by_key = {row.key: row for _, rows in sections for row in rows}
    out = []
    for section, rows in sections:
        for row in rows:
            values = raw.get(row.key, [])
            out.append({"section": section, "key": row.key, "name": row.name, "unit": row.unit,
                        "median": median(values) if values else None,
                        "min": min(values) if values else None, "max": max(values) if values else None,
                        "target": target_text(row, by_key), "mark": mark(row, raw)})
    return out


def compare(old_path: Path, new: dict[str, Any]) -> str:
    """The medians of this run against those saved in ``old_path``: old, new, delta and delta % per figure."""
    old = {row["key"]: row for row in json.loads(old_path.read_text())["figures"]}
    lines = []
    for row in new["figures"]:
        before = old.get(row["key"])
        if before is None or before["median"] is None or row["median"] is None:
            continue
        delta = row["median"] - before["median"]
        pct = f"{delta / before['median'] * 100:+.1f}%" if before["median"] else "-"
        lines.append([row["name"], f"{before['median']:.3g}", f"{row['median']:.3g}", f"{delta:+.3g} {row['unit']}",
                      pct, f"{before['mark']} -> {row['mark']}"])
    return table(["figure", "old", "new", "delta", "delta %", "mark"], lines)
