"""Versioned JSON documents under ATHANOR_HOME and the locked read-modify-write cycle over them.

Two files, split by writer: ``models.json`` holds desired state (applied objects, discovered models, user
recipes) and is written by ``apply``/``scan``/``preset``; ``state.json`` holds observed state (instances, events)
and is written mostly by the daemon. Each carries ``schemaVersion``; older files are migrated in memory on read
and written back in the new shape on the next write. A newer file is refused rather than downgraded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.errors import StoreCorruptError, StoreError, StoreVersionError
from athanor.paths import athanor_home
from athanor.store import migrations
from athanor.store.files import atomic_write_text, locked, read_json

Migration = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class DocumentType:
    """The shape of one store file: its current version, how to build an empty one, how to migrate old ones."""

    filename: str
    version: int
    empty: Callable[[], dict[str, Any]]
    sections: dict[str, type]
    migrations: dict[int, Migration] = field(default_factory=dict)
    indent: int | None = 2  # None: compact, for a file rewritten often whose readers are programs


MODELS = DocumentType(
    filename="models.json",
    version=1,
    empty=lambda: {"schemaVersion": 1, "gateway": None, "models": {}, "recipes": {}, "ignoredSources": []},
    sections={"models": dict, "recipes": dict, "ignoredSources": list},
    migrations={0: migrations.models_v0_to_v1},
)

MAX_EVENTS = 500  # state.json keeps its newest this many events (whoever writes them: scan, apply, the daemon)

STATE = DocumentType(
    filename="state.json",
    version=1,
    empty=lambda: {"schemaVersion": 1, "instances": {}, "daemon": None, "events": []},
    sections={"instances": dict, "events": list},
    migrations={0: migrations.state_v0_to_v1},
    # The daemon rewrites it at every phase change, holding the GIL for the dump (and its 500 events): indented,
    # that took about 4x as long (3.6 ms against 0.9), and a swap's start waited on it.
    indent=None,
)


class VersionedFile:
    """One store file. ``load()`` for a consistent snapshot; ``edit()`` for a locked read-modify-write."""

    def __init__(self, path: Path, doctype: DocumentType):
        self.path = path
        self.doctype = doctype

    def load(self) -> dict[str, Any]:
        return self._read()[0]

    def _read(self) -> tuple[dict[str, Any], bool]:
        """The document, and whether it was migrated (so the next edit writes it back in the new shape)."""
        raw = read_json(self.path)
        if raw is None:
            return self.doctype.empty(), False
        migrated = isinstance(raw, dict) and raw.get("schemaVersion", 0) != self.doctype.version
        return self._upgrade(raw), migrated

    @contextlib.contextmanager
    def edit(self, *, changes: bool = False) -> Iterator[dict[str, Any]]:
        """Yield the document under the file lock; write it back atomically if the block changed it.
        ``changes``: the caller always changes it, so no copy is kept to find out (the daemon's state writer: a
        copy of state.json and the comparison cost milliseconds of the GIL at every phase change).

        An exception inside the block writes nothing: a failed apply leaves the store as it was.
        """
        with locked(self.path):
            doc, migrated = self._read()
            before = None if changes else copy.deepcopy(doc)
            yield doc
            if changes or migrated or doc != before:
                self.write(doc)

    def write(self, doc: dict[str, Any]) -> None:
        """Write ``doc`` atomically. Callers outside ``edit()`` must hold the lock themselves.

        A write the filesystem refuses (a full disk, a read-only mount, a quota) is a StoreError naming the file:
        the CLI prints it as one line, the daemon's state writer retries it, and the old file stays as it was.
        """
        doc["schemaVersion"] = self.doctype.version
        try:
            text = (json.dumps(doc, indent=self.doctype.indent, sort_keys=True) if self.doctype.indent else
                    json.dumps(doc, separators=(",", ":"), sort_keys=True))
            atomic_write_text(self.path, text + "\n")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write: {exc.strerror or exc}; the file is left as it was") from exc

    def _upgrade(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise StoreCorruptError(f"{self.path}: expected a JSON object at the top level; left untouched")
        version = raw.get("schemaVersion", 0)
        if not isinstance(version, int) or version < 0:
            raise StoreCorruptError(f"{self.path}: schemaVersion must be a non-negative integer, not {version!r}")
        if version > self.doctype.version:
            raise StoreVersionError(
                f"{self.path}: schemaVersion {version} was written by a newer athanor "
                f"(this one reads up to {self.doctype.version}); upgrade athanor"
            )
        doc = raw
        while version < self.doctype.version:
            try:
                doc = self.doctype.migrations[version](doc)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise StoreCorruptError(
                    f"{self.path}: cannot migrate from schemaVersion {version}: {exc}; left untouched"
                ) from exc
            version += 1
        empty = self.doctype.empty()
        for key, value in empty.items():
            doc.setdefault(key, value)
        for key, kind in self.doctype.sections.items():
            if not isinstance(doc[key], kind):
                raise StoreCorruptError(
                    f"{self.path}: '{key}' must be a JSON {'object' if kind is dict else 'array'}; left untouched"
                )
        return doc


class Store:
    """All of athanor's files under one home directory."""

    def __init__(self, home: Path):
        self.home = home
        self.models = VersionedFile(home / MODELS.filename, MODELS)
        self.state = VersionedFile(home / STATE.filename, STATE)

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"


def open_store(home: Path | None = None) -> Store:
    """The store under ``home`` (default ``$ATHANOR_HOME``); an existing home of ours is made private first."""
    home = home or athanor_home()
    tighten_home(home)
    return Store(home)


def tighten_home(home: Path) -> None:
    """Make an existing home of ours 0700, whatever mode it was made with (``mkdir`` under a 022 umask gives 0755,
    which lets other users read the specs, the logs and the key files' names).

    Only the home itself, only when it is ours and a directory: a missing home is not created here (read-only
    commands must not create it), and someone else's is left to fail where it is used.
    """
    try:
        info = home.stat()
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        try:
            os.chmod(home, stat.S_IMODE(info.st_mode) & ~0o077)
        except OSError as exc:
            raise StoreError(f"{home}: cannot make the athanor home private (mode 0700): {exc.strerror}") from exc
