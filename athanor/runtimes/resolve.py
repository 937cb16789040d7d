"""How a stored model is run: from the models document to its recipes, effective preset, runtime and launch.

Pure derivations of the document (plus a look on disk for the runtime and a draft's weights), one place for all
of them: the controller starts what ``launch_for`` says, the service files render it, ``describe`` shows it, and
fit and pi read the same effective preset. They sit beside ``launch.py``, below every caller, so the daemon's
layers never reach up into the CLI's ``actions.py`` for them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from athanor import catalog
from athanor.parking import apc
from athanor.parking.files import key_dir
from athanor.parking.key import mlx_identity, park_key, unparkable
from athanor.quantities import parse_budget
from athanor.runtimes.args import effective_args, effective_env
from athanor.runtimes.launch import LaunchSpec, Target, binary_or_name, launch_spec
from athanor.runtimes.presets import BUILTIN_RECIPES, DEFAULT_RECIPE, EffectiveValue, Recipe, effective_preset
from athanor.runtimes.secret import secret_path


def recipes(doc: dict[str, Any]) -> dict[str, Recipe]:
    """Built-in recipes overlaid by the user's (a user recipe may shadow a built-in one)."""
    found = dict(BUILTIN_RECIPES)
    for name, obj in doc["recipes"].items():
        spec = obj["spec"]
        values = {k: v for k, v in spec.items() if k != "description"}
        found[name] = Recipe(name, spec.get("description", ""), values)
    return found


def effective_for(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, EffectiveValue]:
    """The model's preset as it runs: runtime defaults, then its recipe, then its own ``spec.preset``."""
    spec = obj["spec"]
    recipe_name = spec.get("recipe", DEFAULT_RECIPE)
    artifact = obj.get("artifact") or {}
    return effective_preset(
        spec["runtime"],
        context_length=artifact.get("metadata", {}).get("contextLength"),
        recipe=recipes(doc).get(recipe_name),
        preset=spec.get("preset", {}),
    )


def runtime_path(doc: dict[str, Any], runtime: str) -> str | None:
    """The executable the Gateway names for ``runtime`` (None: look it up)."""
    return catalog.gateway_spec(doc)["runtimes"].get(runtime, {}).get("path")


def draft_path(doc: dict[str, Any], obj: dict[str, Any]) -> str | None:
    """The draft model's weights (``spec.draft``: a registered GGUF model, else a .gguf path), or None."""
    draft = obj["spec"].get("draft")
    if not draft:
        return None
    other = doc["models"].get(draft)
    if other is not None:
        artifact = other.get("artifact") or {}
        return artifact.get("path") if artifact.get("format") == "gguf" else None
    path = os.path.expanduser(draft)
    return path if path.endswith(".gguf") and os.path.isfile(path) else None


def launch_for(doc: dict[str, Any], obj: dict[str, Any], home: Path) -> LaunchSpec | None:
    """How this model would be started now, or None while its weights are not on disk. ``home``: the store's home,
    under which the runtime's secret file lives (the one the controller writes before each start)."""
    artifact = obj.get("artifact")
    if not artifact:
        return None
    spec = obj["spec"]
    gateway = catalog.gateway_spec(doc)
    configured = runtime_path(doc, spec["runtime"])
    target = Target(obj["metadata"]["name"], spec["runtime"], artifact["path"], artifact.get("mmproj"),
                    tuple(artifact.get("capabilities", ())), draft_path(doc, obj))
    quiet = gateway["privacy"]["runtimeLogs"] == "errors"
    gateway_args = f"gateway runtimes.{spec['runtime']}.args"
    extra = [(arg, "spec.args" if where == "model" else gateway_args)
             for arg, where in effective_args(spec["runtime"], gateway, spec)]
    launch = launch_spec(target, effective_for(doc, obj), spec["port"], binary_or_name(spec["runtime"], configured),
                         quiet=quiet, extra_args=extra, extra_env=effective_env(spec["runtime"], gateway, spec),
                         secret_file=str(secret_path(home.absolute(), target.name)))
    if parking_refusal(doc, obj, launch) is not None:
        return launch
    if target.runtime == "mlx-vlm":  # its prefix cache writes to disk itself, told by variables (parking/apc.py)
        hashed, stat_only = mlx_identity(launch.argv, target.path)
        directory = str(key_dir(home.absolute(), target.name, park_key(launch.argv, hashed, stat_only=stat_only)))
        budget = parse_budget(gateway["parking"]["budget"], 0)
        return replace(launch, env={**launch.env, **apc.launch_env(directory, budget)}, park_dir=directory)
    key = park_key(launch.argv, [path for path in (target.path, target.mmproj, target.draft) if path])
    directory = str(key_dir(home.absolute(), target.name, key))
    at = len(launch.argv) - len(extra)  # before spec.args and the Gateway's: the user's args still come last
    return replace(launch, argv=[*launch.argv[:at], "--slot-save-path", directory, *launch.argv[at:]],
                   origins=(*launch.origins[:at], PARK_ORIGIN, PARK_ORIGIN, *launch.origins[at:]), park_dir=directory)


PARK_ORIGIN = "athanor: KV parking (gateway parking)"


def parking_refusal(doc: dict[str, Any], obj: dict[str, Any], launch: LaunchSpec) -> str | None:
    """Why this model's slots are not parked across its stops (None: they are; ``athanor/parking``)."""
    if not catalog.gateway_spec(doc)["parking"]["enabled"]:
        return "parking is off (gateway parking.enabled)"
    if obj["spec"].get("parking") is False:
        return "parking is off for this model (spec.parking)"
    artifact = obj.get("artifact") or {}
    facts = artifact.get("metadata", {})
    return unparkable(obj["spec"]["runtime"], facts, task=facts.get("task"), mmproj=artifact.get("mmproj"),
                      argv=launch.argv)
