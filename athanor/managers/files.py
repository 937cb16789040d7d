"""Service files kept in step with the store: ``apply`` writes a plist or unit for every model, ``diff`` shows
what would change in them, and a deleted model's file goes with it.

Only files athanor names (``dev.athanor.model.*.plist``, ``athanor-model-*.service``) are ever written or removed;
a file is rewritten only when its bytes change, so a job that is not loaded is never touched and a loaded one
sees a change only when its model's spec changed (the daemon then reloads that one job).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor import catalog
from athanor.managers import Managers, jobs, resolve_manager
from athanor.managers.base import LABEL_PREFIX, UNIT_PREFIX, ServiceManager
from athanor.managers.shared import write_if_changed
from athanor.runtimes.resolve import launch_for
from athanor.store import Store

_MODEL_FILES = {"launchd": (f"{LABEL_PREFIX}model.", ".plist"), "systemd": (f"{UNIT_PREFIX}model-", ".service")}


@dataclass(frozen=True)
class FileChange:
    path: Path
    action: str  # created, configured, deleted

    def __str__(self) -> str:
        return f"file/{self.path.name} {self.action}"


def manager_for(store: Store, doc: dict[str, Any]) -> ServiceManager:
    """The manager models run under: the configured one, or for ``auto`` the one the running gateway said it
    uses (its record in state.json), else the one the gateway is installed with, else the embedded supervisor."""
    gateway = catalog.gateway_spec(doc)
    configured = gateway["serviceManager"]
    if configured == "auto":
        from athanor.liveness import daemon_record
        from athanor.managers import installed_gateway

        record = daemon_record(store) or {}
        installed = installed_gateway(store.home, gateway)
        configured = record.get("manager") or (installed[0].name if installed else "process")
    return Managers(store.home).get(resolve_manager(configured), gateway)


def desired(store: Store, doc: dict[str, Any], manager: ServiceManager) -> dict[Path, bytes]:
    """Every model's service file, as the manager renders it now (models whose weights are missing have none)."""
    files: dict[Path, bytes] = {}
    for name, obj in doc["models"].items():
        launch = launch_for(doc, obj, store.home)
        if launch is not None:
            files.update(manager.files(jobs.model_job(name, launch, store.home)))
    return files


def _ours(manager: ServiceManager, directory: Path | None) -> list[Path]:
    prefix, suffix = _MODEL_FILES.get(manager.name, ("", ""))
    if directory is None or not prefix or not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix))


def plan(store: Store, doc: dict[str, Any], manager: ServiceManager) -> tuple[dict[Path, bytes], list[Path]]:
    """(files to write, files to remove) to bring the manager's directory in step with ``doc``."""
    want = desired(store, doc, manager)
    write = {p: b for p, b in want.items() if not p.exists() or p.read_bytes() != b}
    remove = [p for p in _ours(manager, getattr(manager, "directory", None)) if p not in want]
    return write, remove


def sync(store: Store, doc: dict[str, Any], *, dry_run: bool = False) -> list[FileChange]:
    """Write what changed, remove what no model needs any more; then let the manager reread its files."""
    manager = manager_for(store, doc)
    write, remove = plan(store, doc, manager)
    changes = [FileChange(p, "configured" if p.exists() else "created") for p in write]
    changes += [FileChange(p, "deleted") for p in remove]
    if dry_run or not changes:
        return changes
    for path, content in write.items():
        write_if_changed(path, content)
    for path in remove:
        path.unlink(missing_ok=True)
    reload = getattr(manager, "reload_files", None)
    if reload is not None:
        reload()
    return changes


def diff(store: Store, doc: dict[str, Any]) -> str:
    """A unified diff of the service files ``sync`` would write or remove for ``doc``."""
    manager = manager_for(store, doc)
    write, remove = plan(store, doc, manager)
    chunks: list[str] = []
    for path, content in sorted(write.items()):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        chunks += difflib.unified_diff(old.splitlines(keepends=True), content.decode().splitlines(keepends=True),
                                       f"file/{path.name} (live)", f"file/{path.name} (applied)")
    for path in remove:
        chunks += difflib.unified_diff(path.read_text(encoding="utf-8").splitlines(keepends=True), [],
                                       f"file/{path.name} (live)", f"file/{path.name} (applied)")
    return "".join(chunks)
