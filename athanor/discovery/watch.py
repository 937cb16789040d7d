"""Watching the HF cache and the Gateway's model directories, so a model another tool downloads is servable
within seconds and a deleted one is marked missing, without a restart or an ``athanor scan``.

watchfiles (inotify, FSEvents) reports changes; they are debounced, and files a download is still writing
(``*.incomplete``, lock files) are ignored, so a multi-gigabyte pull causes one rescan when it completes rather
than one a second while it runs. A directory that does not exist yet (a fresh machine's HF cache) is looked
for again every few seconds and watched once it appears.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from athanor.discovery.hfcache import default_cache_dir

log = logging.getLogger("athanor.watch")

DEBOUNCE_MS = 1000
RECHECK_S = 3.0  # how often the set of directories is looked at again (created, or changed by apply)


def watched_dirs(discovery: dict[str, Any]) -> list[Path]:
    """The directories the Gateway's ``spec.discovery`` scans, whether or not they exist yet."""
    dirs = []
    if discovery.get("hfCache", True):
        cache_dir = discovery.get("hfCacheDir")
        dirs.append(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    dirs += [Path(p).expanduser() for p in discovery.get("paths", [])]
    return dirs


def _relevant(change: Any, path: str) -> bool:
    """Skip what a download writes on its way: partial blobs and locks. Their final rename counts."""
    return not (path.endswith((".incomplete", ".lock")) or "/.locks/" in path or path.endswith("/.locks"))


async def watch(discovery: Callable[[], dict[str, Any]], on_change: Callable[[], Awaitable[None]]) -> None:
    """Call ``on_change`` after each settled burst of changes in the directories ``discovery()`` names (and
    once whenever a watched directory appears). Runs until cancelled."""
    import watchfiles

    while True:
        wanted = watched_dirs(discovery())
        present = [d for d in wanted if d.is_dir()]
        if not present:
            await asyncio.sleep(RECHECK_S)  # nothing to watch yet: look again later
            if any(d.is_dir() for d in watched_dirs(discovery())):
                await on_change()
            continue
        stop = asyncio.Event()
        recheck = asyncio.create_task(_until_dirs_change(discovery, wanted, present, stop))
        try:
            async for _ in watchfiles.awatch(*present, watch_filter=_relevant, debounce=DEBOUNCE_MS,
                                             stop_event=stop, recursive=True):
                await on_change()
        finally:
            recheck.cancel()
        if stop.is_set():
            await on_change()  # a directory appeared or the Gateway names others: scan what is there now


async def _until_dirs_change(discovery: Callable[[], dict[str, Any]], wanted: list[Path], present: list[Path],
                             stop: asyncio.Event) -> None:
    while True:
        await asyncio.sleep(RECHECK_S)  # a polling interval for directories coming and going
        now = watched_dirs(discovery())
        if now != wanted or [d for d in now if d.is_dir()] != present:
            stop.set()
            return
