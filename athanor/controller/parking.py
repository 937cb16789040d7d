"""The controller's two parking steps: save a runtime's slots before it stops, restore them before it serves.

``before_start`` runs as the start begins: it makes the park directory, drops files of the model's older keys and
verifies the parked files against their manifests in a worker thread, while the runtime loads. ``restore`` runs
between "runtime ready" and "Ready": the requests queued for the model wait meanwhile, and the time counts as part
of the load. ``park`` runs after a stop has drained the runtime and before its process is stopped.

Neither step can make a start or a stop fail on its own. A file that does not match its manifest is removed and
never offered (llama-server aborts on a truncated one). A restore the runtime refuses is reported with the reason
from its log, and the slot is erased before anyone is served, since a failed restore can leave the K/V corrupted
(llama.cpp #27068); if even the erase fails, the start fails and the next request gets a fresh runtime. Every
outcome is an event (``Parked``, ``Restored``, ``ParkRejected``, ``ParkFailed``, ``RestoreRefused``,
``ParkEvicted``): metrics count them and the feed shows them.

An mlx-vlm runtime parks differently (``parking/apc.py``): its prefix cache writes shards to the park directory
while it serves and reads them back itself on the first request, so ``park`` waits for its writer and seals the
shards with a manifest, ``before_start`` removes any shard the manifest does not vouch for, and there is nothing
to restore.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from athanor.controller.instance import Instance
from athanor.managers import logs
from athanor.parking import apc, files, slots
from athanor.quantities import parse_budget
from athanor.runtimes.launch import LaunchSpec

log = logging.getLogger("athanor.controller")

SLOT_TIMEOUT_S = 120.0  # one save or restore: gigabytes of K/V at disk speed
LIST_TIMEOUT_S = 5.0
MIN_TOKENS = 32  # fewer is no conversation (a health check's test generation, a title request): prefilling it
# again costs less than writing, verifying and restoring a file, which a swap would wait for
LOG_ERROR = re.compile(r"^\S+ E (?!srv +send_error)")  # "0.02.674.000 E state_seq_load_file: ..." (not the echo
# of the HTTP error the restore already answered)

Emit = Callable[..., Any]  # EventLog.emit(kind, name, type, reason, message, **extra)
Verified = tuple[list[files.Parked], list[str]]


class Parking:
    def __init__(self, session: aiohttp.ClientSession, home: Path, gateway: Callable[[], dict[str, Any]],
                 emit: Emit, logs_dir: Path):
        self._session = session
        self._home = home
        self._gateway = gateway
        self._emit = emit
        self._logs_dir = logs_dir

    # ------------------------------------------------------------------ start

    def before_start(self, name: str, launch: LaunchSpec) -> asyncio.Future[Verified] | None:
        """Verify what is parked for this start, in a worker thread, while the runtime loads (its directory was
        made with the preflight: the runtime checks it exists). None when this start does not park."""
        if not launch.park_dir:
            return None
        directory = Path(launch.park_dir)

        def prepare() -> Verified:
            dropped = files.drop_other_keys(self._home, name, directory.name)
            if dropped:
                log.info("%s: removed park files of %d older key(s)", name, len(dropped))
            if launch.runtime == "mlx-vlm":  # nothing to restore: its cache reads the shards on the first request
                return [], apc.verify(directory, directory.name)
            return files.verify(self._home, name, directory.name)

        verified = asyncio.ensure_future(asyncio.to_thread(prepare))
        verified.add_done_callback(lambda done: done.cancelled() or done.exception())  # a start that failed first
        return verified

    async def restore(self, inst: Instance, verified: asyncio.Future[Verified] | None) -> None:
        """Restore every verified parked slot into the runtime that just became ready. Raises SlotError when a
        refused restore could not be undone (the start must fail: its K/V cannot be trusted)."""
        if verified is None:
            return
        launch = inst.launch
        assert launch is not None and launch.park_dir
        what = "cache shard" if launch.runtime == "mlx-vlm" else "slot"
        try:
            good, problems = await verified  # before Ready: no request reaches a shard or slot being removed
        except OSError as exc:
            self._emit("Model", inst.name, "Warning", "ParkRejected",
                       f"the park directory {launch.park_dir} could not be read or made ({exc}): nothing restored")
            return
        for problem in problems:
            self._emit("Model", inst.name, "Warning", "ParkRejected",
                       f"parked {what} not restored: {problem}; removed, the conversation is prefilled anew")
        if not good:
            return
        started = time.monotonic()
        restored: list[slots.SlotResult] = []
        for record in good:
            try:
                restored.append(await slots.act(self._session, launch, record.slot, "restore", record.filename,
                                                SLOT_TIMEOUT_S))
            except slots.SlotError as exc:
                await self._restore_failed(inst, launch, record, exc)
                continue
            await asyncio.to_thread(files.touch, record)
        if restored:
            self._emit("Model", inst.name, "Normal", "Restored",
                       f"restored {_amount(restored)} in {_ms(started)} ms: the conversation continues without "
                       "a prefill", **_figures(restored, started))

    async def _restore_failed(self, inst: Instance, launch: LaunchSpec, record: files.Parked,
                              error: slots.SlotError) -> None:
        reason = await asyncio.to_thread(self._runtime_says, inst.name)
        await asyncio.to_thread(files.discard, Path(launch.park_dir or ""), record.slot)
        self._emit("Model", inst.name, "Warning", "RestoreRefused",
                   f"slot {record.slot} was not restored ({error}{'; the runtime says: ' + reason if reason else ''});"
                   " its file is removed, the slot erased, and the conversation is prefilled anew",
                   slot=record.slot)
        await slots.act(self._session, launch, record.slot, "erase", None, LIST_TIMEOUT_S)  # raises: start fails

    def _runtime_says(self, name: str) -> str:
        """The runtime's last error lines: llama-server gives its reason for a refused restore only in its log.
        (Error lines name what failed, never a prompt.)"""
        tail = logs.tail(self._logs_dir / f"{name}.log", 20)
        errors = [line.strip() for line in tail if LOG_ERROR.match(line)]
        return " | ".join(errors[-2:])

    # ------------------------------------------------------------------ stop

    async def park(self, inst: Instance) -> None:
        """Save the runtime's slots that hold a conversation, then keep the park within its budget. Never raises:
        a runtime that cannot park is stopped all the same."""
        launch = inst.launch
        if launch is None or not launch.park_dir or inst.handle is None:
            return
        directory = Path(launch.park_dir)
        if launch.runtime == "mlx-vlm":
            await self._park_apc(inst, launch, directory)
            return
        if inst.slot_tokens is not None and inst.slot_tokens < MIN_TOKENS:
            return  # no request it served left a conversation worth keeping: not even worth asking
        started = time.monotonic()
        saved: list[slots.SlotResult] = []
        try:
            held = await slots.occupied(self._session, launch, LIST_TIMEOUT_S)
            for slot, tokens in held:
                if tokens < MIN_TOKENS:
                    continue
                result = await slots.act(self._session, launch, slot, "save", files.slot_filename(slot),
                                         SLOT_TIMEOUT_S)
                if result.tokens:
                    await asyncio.to_thread(files.seal, directory, inst.name, directory.name, slot, result.tokens)
                    saved.append(result)
        except (slots.SlotError, OSError) as exc:
            self._park_failed(inst, "slots", exc)
            return
        if not saved:
            return
        self._emit("Model", inst.name, "Normal", "Parked", f"parked {_amount(saved)} in {_ms(started)} ms",
                   **_figures(saved, started))
        await self._keep_budget()

    async def _park_apc(self, inst: Instance, launch: LaunchSpec, directory: Path) -> None:
        """mlx-vlm wrote its shards while it served: wait for its writer, then vouch for what is on disk."""
        started = time.monotonic()
        try:
            await apc.flush(self._session, launch, SLOT_TIMEOUT_S)
            count, size = await asyncio.to_thread(apc.seal, directory, directory.name)
        except (apc.ApcError, OSError) as exc:
            self._park_failed(inst, "prefix cache", exc)
            return
        if not count:
            return
        self._emit("Model", inst.name, "Normal", "Parked",
                   f"parked {count} cache shard{'s' if count != 1 else ''} ({size / 1e6:.1f} MB) in {_ms(started)} ms",
                   shards=count, bytes=size, seconds=round(time.monotonic() - started, 4))
        await self._keep_budget()

    def _park_failed(self, inst: Instance, what: str, error: Exception) -> None:
        self._emit("Model", inst.name, "Warning", "ParkFailed",
                   f"its {what} {'were' if what == 'slots' else 'was'} not parked ({error}); the next start prefills "
                   "anew")

    async def _keep_budget(self) -> None:
        budget = parse_budget(self._gateway()["parking"]["budget"], 0)
        for record in await asyncio.to_thread(files.evict, self._home, budget):
            what = f"slot {record.slot}" if record.slot != files.NO_SLOT else f"cache shard {record.path.name}"
            self._emit("Model", record.model, "Normal", "ParkEvicted",
                       f"parked {what} ({record.size} bytes) removed: the park is over its budget "
                       f"(parking.budget {self._gateway()['parking']['budget']})", bytes=record.size)


def _amount(results: list[slots.SlotResult]) -> str:
    tokens = sum(r.tokens for r in results)
    size = sum(r.size for r in results)
    return f"{len(results)} slot{'s' if len(results) != 1 else ''} ({tokens:,} tokens, {size / 1e6:.1f} MB)"


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _figures(results: list[slots.SlotResult], started: float) -> dict[str, Any]:
    return {"slots": len(results), "tokens": sum(r.tokens for r in results), "bytes": sum(r.size for r in results),
            "seconds": round(time.monotonic() - started, 4)}
