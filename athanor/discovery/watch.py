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

from athanor.discovery.hfcache import hf_cache_dir

log = logging.getLogger("athanor.watch")

DEBOUNCE_MS = 1000
RECHECK_S = 3.0  # how often the set of directories is looked at again (created, or changed by apply)


def watched_dirs(discovery: dict[str, Any]) -> list[Path]:
    """The directories the Gateway's ``spec.discovery`` scans, whether or not they exist yet."""
    dirs = []
    if discovery.get("hfCache", True):
        dirs.append(hf_cache_dir(discovery))
    dirs += [Path(p).expanduser() for p in discovery.get("paths", [])]
    return dirs


def _relevant(change: Any, path: str) -> bool:
    """Skip what a download writes on its way: partial blobs and locks. Their final rename counts."""
    return not (path.endswith((".incomplete", ".lock")) or "/.locks/" in path or path.endswith("/.locks"))


async def watch(discovery: Callable[[], dict[str, Any]], on_change: Callable[[], Awaitable[None]]) -> None:
    """Call ``on_change`` after each settled burst of changes in the directories ``discovery()`` names, and once
    each time the watch (re)starts, after its watches are set, so nothing that happened before is missed (a
    directory that appeared with a model already in it). Runs until cancelled."""
    import watchfiles

    while True:
        wanted = watched_dirs(discovery())
        present = [d for d in wanted if d.is_dir()]
        if not present:
            await asyncio.sleep(RECHECK_S)  # nothing to watch yet: look again later
            continue
        first = True
        try:
            async for changes in watchfiles.awatch(*present, watch_filter=_relevant, debounce=DEBOUNCE_MS,
                                                   rust_timeout=int(RECHECK_S * 1000), yield_on_timeout=True,
                                                   recursive=True):
                if changes or first:  # the first yield comes once the watches are set, changes or not
                    first = False
                    await on_change()
                now = watched_dirs(discovery())
                if now != wanted or [d for d in now if d.is_dir()] != present:
                    break  # a directory came or went, or the Gateway names others: watch anew
        except (OSError, RuntimeError) as exc:  # a watched directory removed under the watcher, a full inotify
            log.warning("watching %s failed (%s); trying again", ", ".join(map(str, present)), exc)
            await asyncio.sleep(RECHECK_S)  # a retry interval
