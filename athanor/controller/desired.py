"""Desired state: models.json as the daemon serves it, re-read when it changes on disk.

``apply`` and every other CLI command reach a running daemon this way, at once: each request resolves its model
first, which costs one stat (about a microsecond); the parse, the name index and the Gateway spec are redone
only on a change. A document that does not parse is reported once (an event, ``problem`` for the admin API's
status) and the last good one keeps serving until the file is readable again.

An inotify watch of the file in place of the per-request stat was tried: now and then the event loop read a
request that followed an ``apply`` before the watch's event, and served it from the old document
(``tests/reliability/test_slow_readers.py`` and ``tests/test_apply_reaches_requests.py`` catch it), so the stat
stays.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from athanor import catalog
from athanor.controller.events import Event
from athanor.errors import StoreError
from athanor.store import Store

log = logging.getLogger("athanor.controller")


class DesiredState:
    """The models document as last loaded (``doc``), its Gateway spec (``gateway``) and the name index."""

    def __init__(self, store: Store, emit: Callable[..., Event]):
        """``emit``: the event log's, for the store becoming unreadable and readable again."""
        self._store = store
        self._path = os.fspath(store.models.path)  # a str: stat'ed on every request, without pathlib's frames
        self._emit = emit
        self.doc: dict[str, Any] = {"models": {}, "recipes": {}, "gateway": None, "ignoredSources": []}
        self.gateway: dict[str, Any] = catalog.gateway_spec(self.doc)
        self.problem: str | None = None  # models.json is unreadable: serving goes on from the last good one
        self._stamp: object = None
        self._names: dict[str, str] = {}

    def refresh(self) -> dict[str, Any]:
        """The document, re-read first if it changed on disk since the last look."""
        try:
            st = os.stat(self._path)
            stamp: object = (st.st_ino, st.st_mtime_ns, st.st_size)  # every atomic write is a new inode
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            stamp = str(exc)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                doc = self._store.models.load()
            except StoreError as exc:
                self._broken(str(exc))
            else:
                self.doc, self._names, self.gateway = doc, name_index(doc["models"]), catalog.gateway_spec(doc)
                if self.problem is not None:
                    self._recovered()
        return self.doc

    def resolve(self, requested: str, *, refresh: bool = True) -> str | None:
        """A model's name from its name, an alias, or its discovered id (``org/repo`` or ``org/repo:file``).
        ``refresh=False``: the caller looked at the document for this request already."""
        if refresh:
            self.refresh()
        return self._names.get(requested)

    def setting(self, obj: dict[str, Any] | None, key: str) -> Any:
        """A model's own ``spec.<key>``, else the Gateway's (startupTimeout, idleTimeout)."""
        own = (obj or {}).get("spec", {}).get(key)
        return own if own is not None else self.gateway[key]

    def _broken(self, problem: str) -> None:
        log.error("%s; serving from the last good version", problem)
        self.problem = problem
        self._emit("Store", "models.json", "Warning", "StoreUnreadable",
                   f"{problem}; the gateway serves from the last good version")

    def _recovered(self) -> None:
        log.info("models.json is readable again")
        self.problem = None
        self._emit("Store", "models.json", "Normal", "StoreReadable", "models.json is readable again")


def name_index(models: dict[str, Any]) -> dict[str, str]:
    """Every name a client may use -> the model's name. Names win over aliases, aliases over HF ids."""
    names: dict[str, str] = {}
    for name, obj in models.items():
        hf = obj["spec"]["source"].get("hf")
        if hf:
            names[hf["repo"]] = name
            if hf.get("file"):
                names[f"{hf['repo']}:{hf['file']}"] = name
    for name, obj in models.items():
        names.update((alias, name) for alias in obj["spec"].get("aliases", ()))
    names.update((name, name) for name in models)
    return names
