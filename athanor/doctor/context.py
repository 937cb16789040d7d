"""What the checks read, gathered once: the store, the running gateway, the platform and the runtimes.

Gathering never fails and changes nothing. A store file that cannot be read is kept for the store check to report,
and the other checks go on with an empty document; the runtimes are probed once, here, because both the runtime
check and the update check read what was found.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor import catalog
from athanor.doctor.probe import RuntimeInfo, probe_runtime
from athanor.errors import StoreError
from athanor.liveness import daemon_record
from athanor.managers import systemd_user_available
from athanor.runtimes.launch import RUNTIMES
from athanor.runtimes.resolve import runtime_path
from athanor.store import Store


@dataclass
class Context:
    """Everything the checks read, gathered once."""

    store: Store
    doc: dict[str, Any]
    gateway: dict[str, Any]
    state: dict[str, Any]
    daemon: dict[str, Any] | None
    store_errors: dict[Path, StoreError] = field(default_factory=dict)  # store file -> why it cannot be read
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    runtimes: dict[str, RuntimeInfo] = field(default_factory=dict)  # only those this platform can run

    @classmethod
    def gather(cls, store: Store) -> Context:
        errors: dict[Path, StoreError] = {}
        try:
            doc = store.models.load()
        except StoreError as exc:
            doc = store.models.doctype.empty()
            errors[store.models.path] = exc
        try:
            state = store.state.load()
            daemon = daemon_record(store)
        except StoreError as exc:
            state, daemon = store.state.doctype.empty(), None
            errors[store.state.path] = exc
        ctx = cls(store, doc, catalog.gateway_spec(doc), state, daemon, errors)
        for runtime in RUNTIMES:
            if ctx.mlx_applies or runtime == "llama-server":
                ctx.runtimes[runtime] = probe_runtime(runtime, runtime_path(doc, runtime))
        return ctx

    @functools.cached_property
    def systemd(self) -> bool:
        """Whether a systemd user manager answers (asked once: it runs ``systemctl``)."""
        return self.system == "Linux" and systemd_user_available()

    @property
    def mlx_applies(self) -> bool:
        """MLX runs on Apple Silicon and (on the CPU) on Linux; not on Intel Macs."""
        return not (self.system == "Darwin" and self.machine != "arm64")

    def users(self, runtime: str) -> list[str]:
        """The registered models that may be served with ``runtime`` (disabled ones never are)."""
        return sorted(name for name, obj in self.doc["models"].items()
                      if obj["spec"].get("runtime") == runtime and obj["spec"].get("residency") != "disabled")
