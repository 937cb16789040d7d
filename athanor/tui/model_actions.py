"""The main view's store writes: expose/hide, delete (with or without the weights), rescan and the MLX flavor, each
through the library call its CLI command makes (``actions``, ``weights``, ``registry.scan``), followed by the same pi
sync. The running daemon sees models.json change at once, as it does after the CLI.

Every function here blocks on file locks and disk, so the screen runs it in a thread; each returns the lines the CLI
would print, for a notice. Errors are the library's own (``AthanorError``), shown with the CLI's message.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from athanor.store import Store
    from athanor.weights import Plan

MLX_FLAVORS = {"mlx-lm": "lm", "mlx-vlm": "vlm"}  # runtime -> the flavor ``athanor flavor`` names it by


def _store() -> Store:
    from athanor.store import open_store

    return open_store()


def _synced(store: Store, lines: list[str]) -> list[str]:
    """``lines`` plus what keeping pi in step said (``sync_clients``'s words; the store is saved by then)."""
    from athanor.errors import AthanorError
    from athanor.integrations import pi

    try:
        return lines + pi.sync_if_enabled(store, store.models.load())
    except (AthanorError, OSError) as exc:
        return lines + [f"the store is saved, but pi's models.json is not: {exc}; 'athanor sync pi' retries"]


def set_publish(name: str, publish: bool) -> list[str]:
    """``P``: list the model in /v1/models and pi again, or hide it from them (``actions.set_publish``)."""
    from athanor import actions

    store = _store()
    change = actions.set_publish(store, name, publish)
    return _synced(store, [f"{change}: {'exposed' if publish else 'hidden'}"])


def plan_files(name: str) -> Plan:
    """What ``athanor delete model NAME --files`` would remove from disk and keep (reads only)."""
    from athanor import weights

    return weights.plan(_store(), [name])


def delete(name: str, planned: Plan | None) -> list[str]:
    """``d``: forget the model (``actions.delete_model``), then remove the weights ``planned`` names, as
    ``athanor delete model NAME [--files]`` does; a removal that fails is said, the model stays deleted."""
    from athanor import actions

    store = _store()
    lines = _synced(store, [str(actions.delete_model(store, name))])
    if planned is not None:
        from athanor import weights

        outcome = weights.execute(store, planned)
        lines += outcome.lines()
        if (error := outcome.error()) is not None:
            lines.append(str(error))
    return lines


def rescan() -> list[str]:
    """``s``: ``athanor scan`` (the Gateway's discovery paths and the HF cache); its summary comes first."""
    from athanor import registry
    from athanor.cli.model_cmds import scan_summary

    store = _store()
    result = registry.scan(store)
    changes = [str(c) for c in result.changes]
    return _synced(store, [scan_summary(result), *changes, *result.warnings])


def switch_flavor(name: str, runtime: str) -> list[str]:
    """The flavor key: an MLX model on mlx-lm goes to mlx-vlm and back (``athanor flavor NAME vlm|lm``)."""
    from athanor import actions

    flavor = "lm" if MLX_FLAVORS.get(runtime) == "vlm" else "vlm"
    store = _store()
    change = actions.set_flavor(store, name, flavor)
    return _synced(store, [f"{change}: flavor {flavor}"])


class PiWatch:
    """Which models pi's ``athanor`` provider lists when the Gateway syncs pi (``integrations.pi.sync``): the
    ``[pi]`` marker. Read from the store, and again only when models.json changes."""

    def __init__(self) -> None:
        self._seen: tuple[int, int] | None = None
        self._names: frozenset[str] = frozenset()

    def names(self) -> frozenset[str]:
        from athanor import catalog
        from athanor.integrations import pi

        store = _store()
        try:
            st = os.stat(store.models.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            return frozenset()
        if stamp != self._seen:
            doc: dict[str, Any] = store.models.load()
            synced = (catalog.gateway_spec(doc)["integrations"].get("pi") or {}).get("sync")
            self._names = frozenset(m["id"] for m in pi.provider(doc)["models"]) if synced else frozenset()
            self._seen = stamp
        return self._names
