"""The store transactions more than the CLI runs: the scan that registers what discovery finds, the locked edit of
models.json that the service files follow, and the events state.json records of both.

``scan`` is the daemon's as much as the CLI's: the cache watcher rescans when the HF cache changes, and ``pull``
registers what it downloaded through it. So it lives here, below the daemon and the hub, and the CLI's own
operations (``actions.py``: apply, diff, delete, preset, flavor) build on the same pieces.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from athanor import catalog
from athanor.catalog import Change
from athanor.discovery.scan import discover
from athanor.errors import AthanorError
from athanor.store import Store
from athanor.store.store import MAX_EVENTS
from athanor.timestamps import utc_timestamp


@contextlib.contextmanager
def edit_models(store: Store) -> Iterator[dict[str, Any]]:
    """A locked edit of models.json; once it is written, the service files follow it."""
    with store.models.edit() as doc:
        yield doc
        after = copy.deepcopy(doc)
    service_files(store, after)


def service_files(store: Store, doc: dict[str, Any], *, dry_run: bool = False) -> list[Any]:
    """Bring the service manager's files in step with ``doc`` (nothing to do for the embedded supervisor).

    It runs once models.json is written: a failure here must say so, and a later apply or scan repairs it.
    """
    from athanor.managers import files

    try:
        return files.sync(store, doc, dry_run=dry_run)
    except (AthanorError, OSError) as exc:
        if dry_run:
            raise
        raise AthanorError(f"models.json is saved, but the service files are not: {exc}; once that is fixed, "
                           "'athanor apply' (or 'athanor scan') writes them") from exc


@dataclass
class ScanResult:
    """What a scan did: the changes to print and record, and how many models it left as they were (a rescan
    that changed nothing must be able to say so)."""

    changes: list[Change]
    warnings: list[str]
    unchanged: int

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)


def scan(store: Store, extra_paths: tuple[str, ...] = (), *, prune: bool = False, record: bool = True) -> ScanResult:
    """Register what discovery finds and refresh every model's detected facts, in one store transaction.
    ``record``: write the changes to state.json's events (the daemon records them through its own event log)."""
    with edit_models(store) as doc:
        spec = catalog.gateway_spec(doc)
        discovery = discover(spec["discovery"], extra_paths)
        changes = catalog.sync_discovered(doc, discovery.found, discovery.resolve)
        if prune:
            changes += catalog.prune_missing(doc)
        changed = {c.name for c in changes}
        unchanged = sum(1 for name in doc["models"] if name not in changed)
    if record:
        record_events(store, changes)
    return ScanResult(changes, discovery.warnings, unchanged)


def record_events(store: Store, changes: Iterable[Change]) -> None:
    """The changes that changed something, as state.json events (its newest ``MAX_EVENTS`` kept)."""
    events = [
        {
            "time": utc_timestamp(),
            "kind": c.kind,
            "name": c.name,
            "type": "Warning" if c.action == "missing" else "Normal",
            "reason": c.action.capitalize(),
            "message": f"{c.kind.lower()}/{c.name} {c.action}",
        }
        for c in changes
        if c.action != "unchanged"
    ]
    if not events:
        return
    with store.state.edit() as state:
        state["events"] = (state["events"] + events)[-MAX_EVENTS:]
