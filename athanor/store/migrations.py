"""Store migrations: pure functions from schema version N to N+1.

Version 0 is a file without ``schemaVersion``: the registry of the original (Node.js) athanor, whose
``models.json`` is a list of models with slug, runtime, source, port and formula. Importing it keeps a user's
ports, presets and names when they move to this athanor.
"""

from __future__ import annotations

from typing import Any

from athanor import API_VERSION

_LEGACY_RUNTIMES = {"llama.cpp": "llama-server", "llama": "llama-server", "mlx": "mlx-lm"}


def models_v0_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    legacy = doc.get("models", [])
    if isinstance(legacy, dict):  # already keyed by name: only the version marker was missing
        return {**doc, "schemaVersion": 1}
    if not isinstance(legacy, list):
        raise ValueError("'models' is neither a list (legacy athanor) nor an object")
    models: dict[str, Any] = {}
    for entry in legacy:
        obj = _legacy_model(entry)
        models[obj["metadata"]["name"]] = obj
    return {"schemaVersion": 1, "gateway": None, "models": models, "recipes": {}, "ignoredSources": []}


def _legacy_model(entry: dict[str, Any]) -> dict[str, Any]:
    name = str(entry["slug"])
    runtime = _LEGACY_RUNTIMES.get(str(entry.get("runtime")), "llama-server")
    if runtime == "mlx-lm" and entry.get("mlxFlavor") == "vlm":
        runtime = "mlx-vlm"
    source_in = entry.get("source") or {}
    if source_in.get("type") == "hf" and source_in.get("repo"):
        hf = {"repo": source_in["repo"]}
        if source_in.get("file"):
            hf["file"] = source_in["file"]
        source: dict[str, Any] = {"hf": hf}
    else:
        source = {"path": str(entry["path"])}
    spec: dict[str, Any] = {"runtime": runtime, "source": source}
    if isinstance(entry.get("port"), int):
        spec["port"] = entry["port"]
    if entry.get("formula"):
        spec["recipe"] = str(entry["formula"])
    if entry.get("piAlias"):
        spec["aliases"] = [str(entry["piAlias"])]
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {
            "name": name,
            "labels": {},
            "annotations": {"athanor.dev/discovered": "true", "athanor.dev/migrated-from": "athanor-node"},
            "generation": 1,
            "creationTimestamp": entry.get("addedAt"),
        },
        "spec": spec,
        "artifact": None,
    }


def state_v0_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """Instances of the old supervisor are not ours to manage: start from an empty observed state."""
    return {"schemaVersion": 1, "instances": {}, "daemon": None, "events": []}
