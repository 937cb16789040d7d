"""Which loaded models restart when their spec changes, and which only take note.

``apply`` bumps a model's generation when its spec changes. A loaded model started from an older generation is
reloaded at once (only that model's job), unless what its runtime runs did not change (an alias, a label, the
idle limit): then it keeps serving and counts as started from the new generation. What a runtime runs can also
change while the generation stays (a recipe it uses was edited, the Gateway names another runtime binary, a scan
found its files changed): the drift check compares the argv of each loaded runtime with what its spec says now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

from athanor.controller.events import Event
from athanor.controller.instance import Instance, Phase
from athanor.controller.tasks import Spawn
from athanor.errors import ModelUnavailable
from athanor.runtimes.resolve import launch_for

log = logging.getLogger("athanor.controller")


class SpecChanges:
    """Reloads under way, one per model; the controller's stop and start do the work."""

    def __init__(self, doc: Callable[[], dict[str, Any]], save: Callable[[Instance], None],
                 event: Callable[..., Event], stop: Callable[[str], Coroutine[Any, Any, None]],
                 make_ready: Callable[[Instance], Coroutine[Any, Any, None]], stopping: Callable[[str], bool],
                 spawn: Spawn, home: Path):
        """``doc``: the models document as last loaded (not re-read); ``stopping``: whether a stop of a model is
        under way; ``home``: the store's (the runtime secrets' files are under it, and in a launch's argv)."""
        self._home = home
        self._doc = doc
        self._save = save
        self._event = event
        self._stop = stop
        self._make_ready = make_ready
        self._stopping = stopping
        self._spawn = spawn
        self._reloading: set[str] = set()

    def reloading(self, name: str) -> bool:
        return name in self._reloading

    async def follow(self, inst: Instance) -> bool:
        """A ready model's spec changed: True when what it runs did not (an alias, a label, the idle limit), so
        the runtime keeps serving and now counts as started from the new generation. False: it must restart."""
        obj = self._doc()["models"].get(inst.name)
        incarnation = inst.incarnation
        if obj is None or inst.launch is None:
            return False
        doc = self._doc()
        launch = await asyncio.to_thread(launch_for, doc, obj, self._home)  # looks for the runtime on disk
        if inst.incarnation != incarnation or inst.phase is not Phase.READY:
            return False
        generation = obj["metadata"].get("generation", 1)
        if launch != inst.launch:
            return False
        if inst.generation != generation:
            inst.generation = generation
            self._save(inst)
            self._event("Model", inst.name, "Normal", "SpecObserved",
                        f"generation {generation} applied: nothing the runtime runs changed, it keeps serving",
                        generation=generation)
        return True

    def reload_soon(self, inst: Instance) -> None:
        """Reload ``inst`` in a task of its own (the monitor decided it)."""
        self._spawn(self.reload(inst), f"reload-{inst.name}")

    async def reload(self, inst: Instance) -> None:
        """A loaded model whose spec changed is restarted from the new one at once (only that model's job), as
        ``apply`` promises, unless what it runs is unchanged; a failure is recorded like any other start's."""
        if inst.name in self._reloading:
            return
        self._reloading.add(inst.name)
        try:
            await self._reload_now(inst)
        finally:
            self._reloading.discard(inst.name)

    async def _reload_now(self, inst: Instance) -> None:
        if await self.follow(inst):
            return
        obj = self._doc()["models"].get(inst.name)
        if obj is not None:
            self._event("Model", inst.name, "Normal", "SpecChanged",
                        f"generation {obj['metadata'].get('generation', 1)} changes how it runs: restarting it "
                        "after its requests finish", generation=obj["metadata"].get("generation", 1))
        await self._stop(inst.name)
        try:
            await self._make_ready(inst)
        except ModelUnavailable as exc:
            log.warning("%s: reloading it failed: %s", inst.name, exc)

    async def reload_drifted(self, instances: Iterable[Instance]) -> None:
        """Reload a loaded model whose job would run differently now although its spec kept its generation: a
        recipe it uses was edited, the Gateway names another runtime binary, or a scan found its files changed.
        Its service file already says so (apply rewrote it); the runtime must follow."""
        doc = self._doc()
        loaded = [(i, i.incarnation, i.launch.argv, doc["models"].get(i.name)) for i in instances
                  if i.phase is Phase.READY and i.launch is not None and i.launch.argv]

        def drifted() -> list[tuple[Instance, int]]:  # launch_for looks on disk for the runtime: off the loop
            found = []
            for inst, incarnation, argv, obj in loaded:
                launch = launch_for(doc, obj, self._home) if obj else None
                if launch is not None and launch.argv != argv:
                    found.append((inst, incarnation))
            return found

        for inst, incarnation in await asyncio.to_thread(drifted):
            if inst.incarnation == incarnation and inst.phase is Phase.READY and not self._stopping(inst.name):
                log.info("%s: what it runs changed: reloading it", inst.name)
                self.reload_soon(inst)
