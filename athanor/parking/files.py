"""The park directory: slot files, the manifests that vouch for them, the disk budget, listing and clearing.

``$ATHANOR_HOME/park/<model>/<key>/slot-<id>.bin`` is what llama-server wrote; ``slot-<id>.json`` beside it is
athanor's manifest: the key, the slot, its token count, the file's size and sha256, when it was parked and when
last used. A slot file is restored only if its manifest matches it byte for byte (``verify``): llama-server aborts
on a truncated file (an assertion in ``state_seq_load_file``) and checks nothing but a magic number otherwise.

Park files hold conversations. Directories are 0700 and files 0600, nothing here logs their contents, and they
go when their model is deleted (``clear``), when its identity changes (``drop_other_keys``), or, least recently
used first, when the park outgrows its budget (``evict``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor.paths import PRIVATE_FILE_MODE, ensure_private_dir
from athanor.store.files import atomic_write_text

PARK_DIR = "park"
SLOT_SUFFIX = ".bin"
MANIFEST_SUFFIX = ".json"
ORPHAN_AGE_S = 600.0  # a slot file without a manifest this old is no save in progress: it goes first
SHARD_SUFFIX = ".safetensors"  # mlx-vlm's prefix-cache shards (apc.py), counted in the budget
NO_SLOT = -1  # the slot of a cache shard: it belongs to no llama-server slot


@dataclass(frozen=True)
class Parked:
    """One parked slot, as its manifest says."""

    model: str
    key: str
    slot: int
    tokens: int
    size: int
    sha256: str
    parked_at: float
    used_at: float
    path: Path

    @property
    def filename(self) -> str:
        """The name the runtime knows it by (relative to its ``--slot-save-path``)."""
        return self.path.name

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "key": self.key, "slot": self.slot, "tokens": self.tokens, "bytes": self.size,
                "parkedAt": self.parked_at, "usedAt": self.used_at}


def park_root(home: Path) -> Path:
    return home / PARK_DIR


def model_dir(home: Path, model: str) -> Path:
    return park_root(home) / model


def key_dir(home: Path, model: str, key: str) -> Path:
    """Where a start with ``key`` saves and finds its slots (its ``--slot-save-path``)."""
    return model_dir(home, model) / key


def slot_filename(slot: int) -> str:
    return f"slot-{slot}{SLOT_SUFFIX}"


def prepare(directory: Path) -> None:
    """Create the directory (0700, parents too) before the runtime is told to write there."""
    ensure_private_dir(directory)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def seal(directory: Path, model: str, key: str, slot: int, tokens: int) -> Parked:
    """Vouch for a slot file the runtime has just written: make it private, hash it, write its manifest."""
    path = directory / slot_filename(slot)
    os.chmod(path, PRIVATE_FILE_MODE)
    now = time.time()
    parked = Parked(model, key, slot, tokens, path.stat().st_size, file_sha256(path), now, now, path)
    _write_manifest(parked)
    return parked


def _manifest_path(slot_file: Path) -> Path:
    return slot_file.with_suffix(MANIFEST_SUFFIX)


def _write_manifest(parked: Parked) -> None:
    body = {"key": parked.key, "slot": parked.slot, "tokens": parked.tokens, "bytes": parked.size,
            "sha256": parked.sha256, "parkedAt": parked.parked_at, "usedAt": parked.used_at}
    atomic_write_text(_manifest_path(parked.path), json.dumps(body, sort_keys=True) + "\n")


def _read_manifest(manifest: Path, model: str, key: str) -> Parked | str:
    """The manifest's record, or why it cannot be trusted."""
    try:
        body = json.loads(manifest.read_text())
        parked = Parked(model, key, int(body["slot"]), int(body["tokens"]), int(body["bytes"]), str(body["sha256"]),
                        float(body["parkedAt"]), float(body["usedAt"]), manifest.with_suffix(SLOT_SUFFIX))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its manifest {manifest.name} is unreadable ({type(exc).__name__})"
    if body.get("key") != key:
        return f"its manifest {manifest.name} belongs to another runtime (key {body.get('key')!r}, not {key!r})"
    if parked.path.name != slot_filename(parked.slot):
        return f"its manifest {manifest.name} names slot {parked.slot}"
    return parked


def parked(home: Path, model: str, key: str) -> list[Parked]:
    """What the manifests of ``key`` say is parked (not yet verified against the files)."""
    found = []
    directory = key_dir(home, model, key)
    for manifest in sorted(directory.glob(f"*{MANIFEST_SUFFIX}")) if directory.is_dir() else ():
        record = _read_manifest(manifest, model, key)
        if isinstance(record, Parked):
            found.append(record)
    return found


def verify(home: Path, model: str, key: str) -> tuple[list[Parked], list[str]]:
    """The slot files of ``key`` that match their manifests, and a problem for each that does not. Files that fail
    are removed (with their manifests): they will never be offered to a runtime."""
    good: list[Parked] = []
    problems: list[str] = []
    directory = key_dir(home, model, key)
    if not directory.is_dir():
        return good, problems
    for slot_file in sorted(directory.glob(f"*{SLOT_SUFFIX}")):
        manifest = _manifest_path(slot_file)
        record = _read_manifest(manifest, model, key) if manifest.exists() else f"{slot_file.name} has no manifest"
        if isinstance(record, Parked):
            record = _check_file(record)
        if isinstance(record, Parked):
            good.append(record)
            continue
        problems.append(f"{slot_file.name}: {record}")
        _remove(slot_file, manifest)
    for manifest in directory.glob(f"*{MANIFEST_SUFFIX}"):
        if not manifest.with_suffix(SLOT_SUFFIX).exists():
            problems.append(f"{manifest.name}: its slot file is missing")
            _remove(manifest)
    return good, problems


def _check_file(record: Parked) -> Parked | str:
    try:
        size = record.path.stat().st_size
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    if size != record.size:
        return f"{size} bytes where its manifest says {record.size} (truncated or rewritten)"
    if file_sha256(record.path) != record.sha256:
        return "its contents do not match its manifest's sha256 (corrupted or replaced)"
    return record


def touch(record: Parked) -> None:
    """Mark a parked slot used now (restored): the budget evicts least recently used first."""
    with contextlib.suppress(OSError):
        _write_manifest(Parked(**{**record.__dict__, "used_at": time.time()}))


def discard(directory: Path, slot: int) -> None:
    """Forget one slot's file (a restore the runtime refused)."""
    path = directory / slot_filename(slot)
    _remove(path, _manifest_path(path))


def drop_other_keys(home: Path, model: str, key: str) -> list[str]:
    """Remove ``model``'s park files of every other key: its weights, binary or cache settings changed, so those
    files can never be restored again. Returns the keys removed."""
    root = model_dir(home, model)
    gone = []
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        if directory.name != key and directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            gone.append(directory.name)
    return gone


def clear(home: Path, model: str | None = None) -> int:
    """Remove what is parked for ``model`` (None: for every model). Returns the bytes freed."""
    root = model_dir(home, model) if model else park_root(home)
    freed = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    if model:
        shutil.rmtree(root, ignore_errors=True)
    elif root.is_dir():
        for child in root.iterdir():
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    return freed


def listing(home: Path, model: str | None = None) -> list[Parked]:
    """Everything parked (for ``model``), newest use first: what ``athanor park ls`` prints. An mlx-vlm key's
    cache shards are one entry (``NO_SLOT``, their total size, the newest shard's time)."""
    found = _slots(home, model)
    for name, key, shards in _shard_groups(home, model):
        found.append(Parked(name, key, NO_SLOT, 0, sum(shard.size for shard in shards), "",
                            min(shard.parked_at for shard in shards), max(shard.used_at for shard in shards),
                            key_dir(home, name, key)))
    return sorted(found, key=lambda p: p.used_at, reverse=True)


def _keys(home: Path, model: str | None) -> list[tuple[str, str]]:
    root = park_root(home)
    models = [model] if model else sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [(name, key.name) for name in models if model_dir(home, name).is_dir()
            for key in sorted(model_dir(home, name).iterdir()) if key.is_dir()]


def _slots(home: Path, model: str | None = None) -> list[Parked]:
    return [record for name, key in _keys(home, model) for record in parked(home, name, key)]


def _shard_groups(home: Path, model: str | None) -> list[tuple[str, str, list[Parked]]]:
    groups: dict[tuple[str, str], list[Parked]] = {}
    for shard in cache_shards(home):
        if model is None or shard.model == model:
            groups.setdefault((shard.model, shard.key), []).append(shard)
    return [(name, key, shards) for (name, key), shards in sorted(groups.items())]


def cache_shards(home: Path) -> list[Parked]:
    """mlx-vlm's prefix-cache shards (``apc.py``) as the budget sees them: no slot (``NO_SLOT``), and their mtime
    as their last use (mlx-vlm touches a shard when it reads it back)."""
    found = []
    root = park_root(home)
    for path in root.rglob(f"*{SHARD_SUFFIX}") if root.is_dir() else ():
        with contextlib.suppress(OSError, ValueError, IndexError):
            model, key = path.relative_to(root).parts[:2]
            st = path.stat()
            found.append(Parked(model, key, NO_SLOT, 0, st.st_size, "", st.st_mtime, st.st_mtime, path))
    return found


def evict(home: Path, budget: int) -> list[Parked]:
    """Remove parked slots and mlx-vlm cache shards, least recently used first, until the park fits ``budget``
    bytes (slot files without a manifest older than ``ORPHAN_AGE_S`` go first). Returns what was removed. (A shard
    gone from under its manifest is only dropped from it at the next start: ``apc.verify``.)"""
    root = park_root(home)
    if not root.is_dir():
        return []
    now = time.time()
    total = 0
    for path in root.rglob(f"*{SLOT_SUFFIX}"):
        with contextlib.suppress(OSError):
            st = path.stat()
            if not _manifest_path(path).exists() and now - st.st_mtime > ORPHAN_AGE_S:
                _remove(path)
                continue
            total += st.st_size
    shards = cache_shards(home)
    total += sum(shard.size for shard in shards)
    removed = []
    for record in sorted([*_slots(home), *shards], key=lambda p: p.used_at):
        if total <= budget:
            break
        _remove(record.path, _manifest_path(record.path))
        total -= record.size
        removed.append(record)
    return removed


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
