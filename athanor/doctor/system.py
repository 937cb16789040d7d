"""The checks of what lies under athanor on this machine: the platform, its memory, athanor's store and the HF cache
that discovery scans. Each reads a file system or the OS; none asks a process.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from athanor import views
from athanor.discovery.hfcache import hf_cache_location
from athanor.doctor.check import Check
from athanor.doctor.context import Context
from athanor.doctor.updates import athanor_upgrade
from athanor.errors import StoreError, StoreVersionError


def check_platform(ctx: Context) -> Iterator[Check]:
    python = f"Python {platform.python_version()} ({sys.executable})"
    if ctx.system not in ("Darwin", "Linux"):
        yield Check(False, "platform", f"{ctx.system} {ctx.machine}, {python}: athanor supports macOS and Linux",
                    "run athanor on macOS or Linux", required=True)
        return
    name = "macOS" if ctx.system == "Darwin" else ctx.system
    yield Check(True, "platform", f"{name} {ctx.machine}, {python}")


def check_memory(ctx: Context) -> Iterator[Check]:
    import psutil

    memory = psutil.virtual_memory()
    yield Check(True, "memory", f"{views.human_bytes(memory.total)} total, {views.human_bytes(memory.available)} "
                                "available")


def check_store(ctx: Context) -> Iterator[Check]:
    """The store's files read (how many models are registered), or each one that does not, with its fix."""
    if ctx.store_errors:
        for path, exc in ctx.store_errors.items():
            yield _unreadable_store_file(ctx, path, exc)
        return
    home = ctx.store.home
    models = len(ctx.doc["models"])
    exists = "" if home.is_dir() else " (not created yet)"
    yield Check(True, "store", f"{home}{exists}: {models} model{'' if models == 1 else 's'} registered")


def _unreadable_store_file(ctx: Context, path: Path, exc: StoreError) -> Check:
    """A file a newer athanor wrote is read by upgrading; a corrupt one is moved aside (a moved models file leaves
    no model registered: scan and apply register them again)."""
    if isinstance(exc, StoreVersionError):
        return Check(False, "store", str(exc), athanor_upgrade(), required=True)
    fix = f"mv {shlex.quote(str(path))} {shlex.quote(f'{path}.broken')}"
    if path == ctx.store.models.path:
        fix += "; then athanor scan, athanor apply -f SPECS"
    return Check(False, "store", str(exc), fix, required=True)


def tree_size(root: Path) -> tuple[int, int, int]:
    """(bytes, files, entries that could not be read) under ``root``: symlinks not followed (a snapshot's links to blobs
    are not counted again), hard links counted once."""
    total = files = unreadable = 0
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            unreadable += 1
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        if info.st_nlink > 1:
                            key = (info.st_dev, info.st_ino)
                            if key in seen:
                                continue
                            seen.add(key)
                        total += info.st_size
                        files += 1
                except OSError:
                    unreadable += 1
    return total, files, unreadable


def check_hf_cache(ctx: Context) -> Iterator[Check]:
    """Where the HF cache is, how much it holds, and whether all of it can be read (a model in an unreadable part
    is never found)."""
    path, source = hf_cache_location(ctx.gateway["discovery"])
    where = f"{path} (from {source})"
    if not ctx.gateway["discovery"].get("hfCache", True):
        where += ", not scanned (spec.discovery.hfCache: false)"
    if not path.exists():
        yield Check(True, "hf cache", f"{where}: does not exist yet (nothing downloaded)")
        return
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        yield Check(False, "hf cache", f"{where}: not a readable directory", f"chmod u+rx {shlex.quote(str(path))}")
        return
    size, files, unreadable = tree_size(path)
    repos = sum(1 for p in path.glob("models--*") if p.is_dir())
    detail = f"{where}: {repos} model repo{'' if repos == 1 else 's'}, {views.human_bytes(size) if size else '0B'}"
    detail += f" in {files} file{'' if files == 1 else 's'}"
    if unreadable:
        yield Check(False, "hf cache", f"{detail}; {unreadable} entries unreadable",
                    f"chmod -R u+rX {shlex.quote(str(path))}")
        return
    yield Check(True, "hf cache", detail)
