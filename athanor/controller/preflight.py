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


def prepare_launch(doc: dict[str, Any], obj: dict[str, Any], home: Path, *, local: bool = True) -> LaunchSpec:
    """How to start ``obj`` now, after every check a start can fail early on (``home``: the store's, where its
    runtime secret lives; see ``launch_for``). Raises ModelUnavailable. ``local``: the runtime runs on this
    machine, so its weights, binary and port are checked here; a cluster's pod has its own (``managers/base.py``)."""
    name = obj["metadata"]["name"]
    problem = unservable(obj, name)
    if problem:
        raise ModelUnavailable(problem)
    if not local:
        launch = launch_for(doc, obj, home)
        assert launch is not None  # the artifact was checked above; the pod has the weights
        return launch
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
    if not port_is_free(launch.port, reuse_address=True):  # a runtime that cannot bind may never exit
        raise ModelUnavailable(f"model {name!r}: port {launch.port} is in use by {port_holder(launch.port)}; "
                               "set spec.port to a free one, or stop what holds it")
    return launch
