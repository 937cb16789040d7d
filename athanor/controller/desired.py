"""Desired state: models.json as the daemon serves it, re-read when it changes on disk.

``apply`` and every other CLI command reach a running daemon this way, at once: each request looks whether
anything changed in the store's directory since the last request (``dirwatch.py``: one poll(2) of an inotify
watch, on Linux) and only then stats the file (elsewhere, on every request: about a microsecond); the parse, the
name index and the Gateway spec are redone only on a change. A document that does not parse is reported once (an
event, ``problem`` for the admin API's status) and the last good one keeps serving until the file is readable
again.

The watch is read by each request itself, not by the event loop: a watch whose events the loop delivered was
tried first, and now and then the loop read a request that followed an ``apply`` before the watch's event and
served it from the old document (``tests/reliability/test_slow_readers.py`` and
``tests/test_apply_reaches_requests.py`` catch it). The kernel queues the event before the rename returns, so a
poll at the request's own turn always finds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from athanor import catalog
from athanor.controller.dirwatch import DirectoryWatch
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
        self._watch: DirectoryWatch | None = None  # set at the first look, before the stat it vouches for

    def refresh(self) -> dict[str, Any]:
        """The document, re-read first if it changed on disk since the last look."""
        watch = self._watch
        if watch is None:
            watch = self._watch = DirectoryWatch(os.path.dirname(self._path))
        elif not watch.changed():
            return self.doc
        try:
            st = os.stat(self._path)
            stamp: object = (st.st_ino, st.st_mtime_ns, st.st_size)  # every atomic write is a new inode
        except FileNotFoundError:
            stamp = None
        except OSError as unreadable:  # compiled, a name keeps the type it was first bound to
            stamp = str(unreadable)
        if stamp != self._stamp:
            self._stamp = stamp
            if not watch.watching:  # none could be set (no directory yet, say): tried again at the next look
                self._watch = None
            try:
                doc = self._store.models.load()
            except StoreError as exc:
                self._broken(str(exc))
            else:
                self.doc, self._names, self.gateway = doc, name_index(doc["models"]), catalog.gateway_spec(doc)
                if self.problem is not None:
                    self._recovered()
        return self.doc

    def close(self) -> None:
        """Give back the watch (the controller's end)."""
        if self._watch is not None:
            self._watch.close()

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
