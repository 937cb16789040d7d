"""Service managers: what runs a model's runtime (embedded supervisor, launchd, systemd)."""

from __future__ import annotations

from pathlib import Path

LABEL_PREFIX = "dev.athanor."


def resolve_manager(configured: str) -> str:
    """``auto`` is the embedded supervisor: it works on any machine without touching the user's login items."""
    return "process" if configured == "auto" else configured


def service_file_path(manager: str, model: str, home: Path | None = None) -> Path | None:
    """Where the service file for ``model`` lives under ``manager`` (None for the embedded supervisor)."""
    home = home or Path.home()
    if manager == "launchd":
        return home / "Library" / "LaunchAgents" / f"{LABEL_PREFIX}{model}.plist"
    if manager == "systemd":
        return home / ".config" / "systemd" / "user" / f"athanor-{model}.service"
    return None
