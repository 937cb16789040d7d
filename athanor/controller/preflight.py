"""What can be known about a start before anything is stopped to make room for it.

A start that is bound to fail must fail before the swap, not after: otherwise a model with unreadable weights,
a missing runtime or a squatted port evicts the healthy model on every retry and then fails anyway. These checks
touch the disk and the network stack (``find_runtime`` may even restore a wheel's library links), so the
controller runs them in a worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from athanor import views
from athanor.errors import ModelUnavailable, RuntimeNotFoundError
from athanor.ports import port_holder, port_is_free
from athanor.runtimes.launch import LaunchSpec, find_runtime
from athanor.runtimes.resolve import draft_path, launch_for, runtime_path


def unservable(obj: dict[str, Any] | None, name: str) -> str | None:
    """Why ``name`` cannot be served whatever happens next, from the stored document alone (cheap: no I/O)."""
    if obj is None:
        return f"model {name!r} no longer exists"
    if obj["spec"].get("residency") == "disabled":
        return f"model {name!r} is disabled (spec.residency)"
    artifact = obj.get("artifact")
    if not artifact:
        return (f"model {name!r}: weights not found: {views.source_text(obj['spec']['source'])} "
                "(see 'athanor describe model')")
    if artifact.get("problem"):
        return f"model {name!r}: weights unreadable: {artifact['problem']}"
    task = artifact.get("metadata", {}).get("task")
    if task and obj["spec"]["runtime"] != "llama-server":
        return (f"model {name!r} is an {task} model, and {obj['spec']['runtime']} serves generation only; serve a "
                "GGUF of it with llama-server")
    return None


Fingerprint = tuple[tuple[str, int, int, int, int], ...]


class LaunchMemo:
    """Each model's launch as last worked out, reused while nothing it was worked out from has changed.

    Working a launch out is most of a swap's preflight: the Gateway spec's defaults copied several times, the
    runtime looked up on PATH twice, the park key's hash of the weights' first bytes (about 0.4 ms of a 25 ms swap
    here, repeated for nothing on every swap back). A launch is reused only
    - for the same desired-state document: ``DesiredState`` replaces it on every change, so an apply, a scan or a
      hand edit of models.json works every launch out afresh;
    - while every file it names (the runtime binary, the weights, a projector, a draft) has the stat it had: it
      is there, still executable, and neither rebuilt nor re-downloaded (either changes the park key);
    - for llama-server only: an MLX start's identity also spans its Python packages (``parking/key.py``), and its
      load takes seconds, which a fraction of a millisecond does not change.
    A runtime installed since, earlier on PATH, is picked up at the next change of the document.
    """

    def __init__(self) -> None:
        self._launches: dict[str, tuple[dict[str, Any], Fingerprint, LaunchSpec]] = {}

    def get(self, doc: dict[str, Any], obj: dict[str, Any]) -> LaunchSpec | None:
        """The launch kept for ``obj``, if it still holds (None: work it out, then ``keep`` it)."""
        kept = self._launches.get(obj["metadata"]["name"])
        if kept is not None and kept[0] is doc and _fingerprint(kept[2], obj, doc) == kept[1]:
            return kept[2]
        return None

    def keep(self, doc: dict[str, Any], obj: dict[str, Any], launch: LaunchSpec) -> None:
        """Remember the launch just worked out for ``obj``, after every check of it passed."""
        name = obj["metadata"]["name"]
        fingerprint = _fingerprint(launch, obj, doc) if launch.runtime == "llama-server" else None
        if fingerprint is None:
            self._launches.pop(name, None)
        else:
            self._launches[name] = (doc, fingerprint, launch)


def _fingerprint(launch: LaunchSpec, obj: dict[str, Any], doc: dict[str, Any]) -> Fingerprint | None:
    """The stat of every file ``launch`` names; None when one cannot be read (the launch is then not kept)."""
    artifact = obj.get("artifact") or {}
    paths = [launch.argv[0], artifact.get("path"), artifact.get("mmproj"), draft_path(doc, obj)]
    try:
        return tuple((path, (st := os.stat(path)).st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
                     for path in paths if path)
    except OSError:
        return None


def prepare_launch(doc: dict[str, Any], obj: dict[str, Any], home: Path, *, local: bool = True,
                   memo: LaunchMemo | None = None) -> LaunchSpec:
    """How to start ``obj`` now, after every check a start can fail early on (``home``: the store's, where its
    runtime secret lives; see ``launch_for``). Raises ModelUnavailable. ``local``: the runtime runs on this
    machine, so its weights, binary and port are checked here; a cluster's pod has its own (``managers/base.py``).
    ``memo``: the launches of earlier starts, reused while nothing they came from changed (``LaunchMemo``: the
    files they name are looked at instead of looked up; the port is checked every time)."""
    name = obj["metadata"]["name"]
    problem = unservable(obj, name)
    if problem:
        raise ModelUnavailable(problem)
    if not local:
        launch = launch_for(doc, obj, home)
        assert launch is not None  # the artifact was checked above; the pod has the weights
        return launch
    kept = memo.get(doc, obj) if memo is not None else None
    if kept is not None:  # every file it names is there as it was when it passed the checks below
        return _port_free(name, kept)
    path = obj["artifact"]["path"]
    gone = ModelUnavailable(f"model {name!r}: weights not found on disk: {path} (moved or deleted since the last "
                            "scan; 'athanor scan' refreshes it)")
    if not os.path.exists(path):
        raise gone
    runtime = obj["spec"]["runtime"]
    configured = runtime_path(doc, runtime)
    try:
        find_runtime(runtime, configured)
    except RuntimeNotFoundError as exc:
        raise ModelUnavailable(f"model {name!r}: {exc}") from exc
    draft = obj["spec"].get("draft")
    if draft and draft_path(doc, obj) is None:
        raise ModelUnavailable(f"model {name!r}: its draft model {draft!r} (spec.draft) is neither a registered GGUF "
                               "model with weights on disk nor a .gguf file")
    launch = launch_for(doc, obj, home)
    if launch is None:  # gone since the check above
        raise gone
    launch = _port_free(name, launch)
    if memo is not None:
        memo.keep(doc, obj, launch)
    return launch


def _port_free(name: str, launch: LaunchSpec) -> LaunchSpec:
    if not port_is_free(launch.port, reuse_address=True):  # a runtime that cannot bind may never exit
        raise ModelUnavailable(f"model {name!r}: port {launch.port} is in use by {port_holder(launch.port)}; "
                               "set spec.port to a free one, or stop what holds it")
    return launch
