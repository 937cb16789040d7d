"""Parking for mlx-vlm: its automatic prefix cache (APC) on disk, flushed before a stop and vouched for by athanor.

mlx_vlm.server (0.7.10, its PR #1114) keeps the K/V of every prefill's full blocks in safetensors shards under
``APC_DISK_PATH``, written in the background as it serves, and reads them back by the blocks' hashes on a later
request, even in a new process. So parking here is not a save and a restore but three guarantees around what the
runtime does by itself:

- ``launch_env``: the runtime writes its shards into this start's park directory (``park/<model>/<key>/``: athanor's
  key, since mlx-vlm's own namespace leaves the weights' content out and is cut at 128 characters), hashes blocks
  with sha256 (its default is Python's ``hash()`` of int tuples), and keeps within the park's budget.
- ``flush``: before the stop, wait until its background writer has nothing pending (``GET /v1/cache/stats``,
  ``disk_pending_bytes``): uvicorn's shutdown does not flush that queue, so a stop could lose the last prefill.
- ``seal`` and ``verify``: mlx-vlm checks a shard's header and nothing else, so a shard whose tensors were flipped
  under a valid header is restored silently, into a wrong answer. After the flush athanor writes a manifest of every
  shard's size and sha256; before the next start every shard it does not vouch for byte for byte is removed.

A shard is immutable once mlx-vlm has renamed it into place (only its mtime moves, on a hit), so a manifest stays
true until the runtime writes new shards, which the next park seals in turn. Shards written after the last seal
(a runtime that died, a daemon that was killed) have no manifest entry and go: a re-prefill, never a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from athanor.parking.files import SHARD_SUFFIX, file_sha256
from athanor.paths import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE
from athanor.quantities import GIB
from athanor.runtimes.launch import LaunchSpec
from athanor.store.files import atomic_write_text

if TYPE_CHECKING:
    import aiohttp

MANIFEST = "apc-manifest.json"
STATS_PATH = "/v1/cache/stats"
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.25
STATS_TIMEOUT_S = 5.0

# mlx-vlm skips a disk restore while the machine's available RAM is under this (its default is 2 GiB). The restored
# prefix lands in the K/V that the model's fit estimate already counts for its context (plus a copy while it is
# assembled), and the memory guard planned room for that before the start; the default's extra 2 GiB would only turn
# restores off on a small machine with a model loaded (an 8 GiB Mac, a shared CI runner) and bring back the
# re-prefill parking exists to avoid. Half a GiB still stops a restore when the machine is about to swap.
MIN_FREE_RAM_GB = "0.5"


class ApcError(Exception):
    """The runtime's cache could not be flushed; the message says why."""


def launch_env(directory: str | os.PathLike[str], budget_bytes: int) -> dict[str, str]:
    """The variables that turn mlx-vlm's disk cache on, into ``directory``, within ``budget_bytes``. mlx-vlm has no
    command-line flag for any of it (its ``server/cli.py``); these are what ``apc.from_env`` reads."""
    return {
        "APC_ENABLED": "1",
        "APC_DISK_ENABLED": "1",
        "APC_DISK_PATH": str(directory),
        # Stable across processes: the default hash is CPython's hash() of int tuples.
        "APC_HASH": "sha256",
        # It caps this model's directory as mlx-vlm writes: the whole park's budget is the most one model may hold
        # (the park as a whole is brought within it at each park, files.evict). mlx-vlm reads 0 as no cap at all,
        # so a budget of 0 is passed as one byte.
        "APC_DISK_MAX_GB": repr(max(budget_bytes, 1) / GIB),
        "APC_DISK_MIN_FREE_RAM_GB": MIN_FREE_RAM_GB,
    }


async def flush(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float) -> dict[str, Any]:
    """Wait until the runtime's background writer has written every queued shard; returns its last cache stats.
    Polls with an interval that grows from 10 ms to 250 ms. Raises ApcError when the cache is off, the runtime
    does not answer, or writes are still pending after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    interval = POLL_FIRST_S
    while True:
        stats = await _stats(session, launch, min(STATS_TIMEOUT_S, max(deadline - time.monotonic(), 0.1)))
        if not stats.get("enabled") or "disk_pending_bytes" not in stats:
            raise ApcError("the runtime's prefix cache has no disk tier (APC off or its directory unusable)")
        pending = int(stats["disk_pending_bytes"] or 0)
        if pending == 0:
            return stats
        if time.monotonic() + interval > deadline:
            raise ApcError(f"{pending} bytes still waiting to be written after {timeout:g} s")
        await asyncio.sleep(interval)  # the runtime's writer works meanwhile; nothing to wake us sooner
        interval = min(interval * 2, POLL_MAX_S)


async def _stats(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float) -> dict[str, Any]:
    import aiohttp  # here: resolve.py imports this module for launch_env, and `athanor get` must stay light

    from athanor.addresses import authority
    from athanor.runtimes.secret import secret_headers

    try:
        async with session.get(f"http://{authority(launch.host, launch.port)}{STATS_PATH}",
                               headers=secret_headers(launch.secret),
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise ApcError(f"GET {STATS_PATH} answered HTTP {resp.status}")
            body = json.loads(text)
    except TimeoutError as exc:
        raise ApcError(f"GET {STATS_PATH}: no answer in {timeout:g} s") from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise ApcError(f"GET {STATS_PATH}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(body, dict):
        raise ApcError(f"GET {STATS_PATH} answered {type(body).__name__}, not an object")
    return body


def shards(directory: Path) -> list[Path]:
    """Every shard under ``directory`` (mlx-vlm writes into a namespace directory below it), canonical or not."""
    return sorted(directory.rglob(f"*{SHARD_SUFFIX}")) if directory.is_dir() else []


def seal(directory: Path, key: str) -> tuple[int, int]:
    """Vouch for the shards the runtime has written (after ``flush``): make each private (and the namespace
    directory mlx-vlm made for them), then write the manifest of their sizes and sha256 (0600, atomically).
    Returns (shards, bytes)."""
    vouched: dict[str, dict[str, Any]] = {}
    for path in shards(directory):
        try:
            os.chmod(path.parent, PRIVATE_DIR_MODE)
            os.chmod(path, PRIVATE_FILE_MODE)
            vouched[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size,
                                                               "sha256": file_sha256(path)}
        except FileNotFoundError:
            continue  # evicted by the runtime meanwhile (its own cap)
    _write_manifest(directory, key, vouched)
    return len(vouched), sum(entry["bytes"] for entry in vouched.values())


def verify(directory: Path, key: str) -> list[str]:
    """Before a start: remove every shard the manifest does not vouch for byte for byte, so the runtime never
    reads one. Returns a problem for each shard removed; shards that no manifest of this key vouches for at all
    (missing, unreadable or foreign) are one problem together. The manifest is rewritten to what is left."""
    found = shards(directory)
    vouched, untrusted = _read_manifest(directory, key)
    problems: list[str] = []
    if untrusted and found:
        problems.append(f"{len(found)} shard{'s' if len(found) != 1 else ''} removed: {untrusted}")
    kept: dict[str, dict[str, Any]] = {}
    for path in found:
        name = path.relative_to(directory).as_posix()
        if untrusted:
            problem = None  # counted above
        elif name not in vouched:
            problem = "not in the manifest (written after the last park)"
        else:
            problem = _mismatch(path, vouched[name])
            if problem is None:
                kept[name] = vouched[name]
                continue
        if problem:
            problems.append(f"{path.name}: {problem}")
        with contextlib.suppress(OSError):
            path.unlink()
    if kept != vouched or (untrusted and (directory / MANIFEST).exists()):
        _write_manifest(directory, key, kept)
    return problems


def _write_manifest(directory: Path, key: str, vouched: dict[str, dict[str, Any]]) -> None:
    body = {"key": key, "runtime": "mlx-vlm", "sealedAt": time.time(), "shards": vouched}
    atomic_write_text(directory / MANIFEST, json.dumps(body, sort_keys=True) + "\n")


def _read_manifest(directory: Path, key: str) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(shard name -> {bytes, sha256}, None), or ({}, why none of them can be trusted)."""
    path = directory / MANIFEST
    if not path.exists():
        return {}, "no manifest vouches for them (written after the last park, or never parked)"
    try:
        body = json.loads(path.read_text())
        found = {str(name): {"bytes": int(entry["bytes"]), "sha256": str(entry["sha256"])}
                 for name, entry in body["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return {}, f"the manifest is unreadable ({type(exc).__name__})"
    if body.get("key") != key:
        return {}, f"the manifest belongs to another runtime (key {body.get('key')!r}, not {key!r})"
    return found, None


def _mismatch(path: Path, entry: dict[str, Any]) -> str | None:
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{size} bytes where the manifest says {entry['bytes']} (truncated or rewritten)"
        if file_sha256(path) != entry["sha256"]:
            return "its contents do not match the manifest's sha256 (corrupted or replaced)"
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    return None
