"""What every check of ``athanor doctor`` returns: one line of the report, and whether it fails the run.

Its own module so that the check modules and the CLI share the one shape without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GATEWAY_FIX = "athanor apply -f GATEWAY.yaml"  # the user's own Gateway spec: doctor cannot know its file


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    ok: bool
    name: str
    detail: str
    fix: str | None = None  # the command that fixes a failure (None when ok)
    required: bool = False  # a failure keeps something registered from being served: exit 1

    def line(self) -> str:
        text = f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text} -> fix: {self.fix}"

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "name": self.name, "detail": self.detail, "fix": self.fix, "required": self.required}


def failed(checks: Iterable[Check]) -> bool:
    """Whether a required check failed (doctor's exit code 1)."""
    return any(c.required and not c.ok for c in checks)
