"""Operations on the models document: apply, delete, prune, merging discovered models, and finding a model by name
or alias.

These are pure edits of the in-memory document (the caller holds the store lock and writes once), so dry runs,
diffs and real applies share exactly one code path.

Apply follows kubectl's client-side apply: the last applied spec is kept in an annotation, and a field is removed
only when it was in the last applied spec and is gone from the new one. Fields set another way (an assigned port,
``athanor preset set``, ``athanor flavor``) survive an apply that does not mention them, and a rescan only ever
replaces ``artifact``, the detected half of a model.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from athanor import API_VERSION
from athanor.discovery.artifacts import Artifact, source_key
from athanor.errors import NotFoundError
from athanor.naming import unique_name
from athanor.ports import DEFAULT_RANGE, allocate_port
from athanor.spec.validate import Resource
from athanor.timestamps import utc_timestamp

LAST_APPLIED = "athanor.dev/last-applied"
DISCOVERED = "athanor.dev/discovered"
_ATOMIC = {"source", "portRange", "aliases"}

GATEWAY_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:8080",
    "serviceManager": "auto",
    "residency": {"policy": "single"},
    "idleTimeout": "30m",
    "startupTimeout": "120s",
    "portRange": {"start": DEFAULT_RANGE[0], "end": DEFAULT_RANGE[1]},
    "discovery": {"hfCache": True, "paths": []},
    "runtimes": {},
    "limits": {"maxRequestBytes": 32 * 2**20, "maxQueue": 64, "upstreamIdleTimeout": "10m"},
    "healthCheck": {"interval": "2s", "timeout": "3s", "failureThreshold": 3},
    "allowedHosts": [],
    "cors": {"allowOrigins": []},
    "auth": {},
    "integrations": {"pi": {"sync": False}},
    "privacy": {"runtimeLogs": "normal"},
    "telemetry": {"retention": {"maxRecords": 100_000, "maxAge": "720h"}},
    "parking": {"enabled": True, "budget": "4GiB"},
}

Resolver = Callable[[dict[str, Any]], Artifact | None]


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    action: str  # created, configured, unchanged, adopted, discovered, refreshed, pruned, deleted, missing

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} {self.action}"


def gateway_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The effective Gateway spec: defaults overlaid with what was applied."""
    applied = (doc.get("gateway") or {}).get("spec", {})
    return overlay(GATEWAY_DEFAULTS, applied)


def resolve_name(doc: dict[str, Any], name: str) -> str:
    """A model's name from its name or one of its aliases; NotFoundError names close matches."""
    if name in doc["models"]:
        return name
    for model_name, obj in doc["models"].items():
        if name in obj["spec"].get("aliases", []):
            return model_name
    close = difflib.get_close_matches(name, list(doc["models"]), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see 'athanor get models'"
    raise NotFoundError(f"model {name!r} not found{hint}")


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _ATOMIC:
            out[key] = overlay(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def three_way_merge(live: dict[str, Any], last: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """kubectl's rule: set what ``new`` says, drop what only ``last`` said, keep everything else."""
    out = copy.deepcopy(live)
    for key in last:
        if key not in new:
            out.pop(key, None)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _ATOMIC:
            previous = last.get(key) if isinstance(last.get(key), dict) else {}
            out[key] = three_way_merge(out[key], previous, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _last_applied(obj: dict[str, Any]) -> dict[str, Any]:
    raw = obj["metadata"].get("annotations", {}).get(LAST_APPLIED)
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _new_object(kind: str, name: str, spec: dict[str, Any], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": name,
            "labels": {},
            "annotations": annotations,
            "generation": 1,
            "creationTimestamp": utc_timestamp(),
        },
        "spec": spec,
    }


def _apply_object(live: dict[str, Any] | None, res: Resource) -> dict[str, Any]:
    """Merge one applied resource into its live object, or create it."""
    metadata = res.body["metadata"]
    applied = {
        "metadata": {"labels": metadata.get("labels", {}), "annotations": metadata.get("annotations", {})},
        "spec": res.spec,
    }
    if live is None:
        obj = _new_object(res.kind, res.name, copy.deepcopy(res.spec), dict(applied["metadata"]["annotations"]))
        obj["metadata"]["labels"] = dict(applied["metadata"]["labels"])
    else:
        obj = copy.deepcopy(live)
        last = _last_applied(obj)
        last_meta = last.get("metadata", {})
        meta = obj["metadata"]
        obj["spec"] = three_way_merge(obj["spec"], last.get("spec", {}), res.spec)
        for part in ("labels", "annotations"):
            meta[part] = three_way_merge(meta.get(part, {}), last_meta.get(part, {}), applied["metadata"][part])
        if obj["spec"] != live["spec"]:
            meta["generation"] = live["metadata"].get("generation", 1) + 1
    obj["metadata"].setdefault("annotations", {})[LAST_APPLIED] = json.dumps(applied, sort_keys=True)
    return obj


def _action(live: dict[str, Any] | None, obj: dict[str, Any]) -> str:
    if live is None:
        return "created"
    return "unchanged" if obj == live else "configured"


def _taken_ports(doc: dict[str, Any]) -> set[int]:
    return {m["spec"]["port"] for m in doc["models"].values() if isinstance(m["spec"].get("port"), int)}


def _ensure_port(doc: dict[str, Any], obj: dict[str, Any]) -> None:
    if isinstance(obj["spec"].get("port"), int):
        return
    ports = gateway_spec(doc)["portRange"]
    taken = _taken_ports(doc)
    obj["spec"]["port"] = allocate_port(taken, ports["start"], ports["end"])


def find_by_source(doc: dict[str, Any], key: str) -> list[str]:
    return sorted(name for name, m in doc["models"].items() if source_key(m["spec"]["source"]) == key)


def is_discovered_only(obj: dict[str, Any]) -> bool:
    annotations = obj["metadata"].get("annotations", {})
    return annotations.get(DISCOVERED) == "true" and LAST_APPLIED not in annotations


def apply_resources(doc: dict[str, Any], resources: Iterable[Resource], resolve: Resolver) -> list[Change]:
    """Apply validated resources to ``doc`` in order: recipes and the gateway first, then models."""
    order = {"Recipe": 0, "Gateway": 1, "Model": 2}
    changes: list[Change] = []
    for res in sorted(resources, key=lambda r: order[r.kind]):
        if res.kind == "Gateway":
            live = doc.get("gateway")
            doc["gateway"] = _apply_object(live, res)
            action = _action(live, doc["gateway"])
        elif res.kind == "Recipe":
            live = doc["recipes"].get(res.name)
            doc["recipes"][res.name] = _apply_object(live, res)
            action = _action(live, doc["recipes"][res.name])
        else:
            action = _apply_model(doc, res, resolve)
        changes.append(Change(res.kind, res.name, action))
    return changes


def _apply_model(doc: dict[str, Any], res: Resource, resolve: Resolver) -> str:
    models = doc["models"]
    key = source_key(res.spec["source"])
    live = models.get(res.name)
    adopted = False
    if live is None:
        # A spec for weights already discovered under another name takes that model over, port and all.
        for other in find_by_source(doc, key):
            if is_discovered_only(models[other]):
                live = models.pop(other)
                live["metadata"]["name"] = res.name
                adopted = True
                break
    obj = _apply_object(live, res)
    if key in doc["ignoredSources"]:
        doc["ignoredSources"].remove(key)
    models[res.name] = obj
    _ensure_port(doc, obj)
    artifact = resolve(obj["spec"]["source"])
    obj["artifact"] = artifact.to_json() if artifact else None
    return "adopted" if adopted else _action(live, obj)


def prune(doc: dict[str, Any], keep: Iterable[Resource]) -> list[Change]:
    """Remove applied models and recipes that ``keep`` no longer names. Discovered models are never removed:
    an adopted one only forgets its applied configuration."""
    kept = {(r.kind, r.name) for r in keep}
    changes: list[Change] = []
    for name in sorted(doc["recipes"]):
        if ("Recipe", name) not in kept and LAST_APPLIED in doc["recipes"][name]["metadata"].get("annotations", {}):
            del doc["recipes"][name]
            changes.append(Change("Recipe", name, "pruned"))
    for name in sorted(doc["models"]):
        obj = doc["models"][name]
        annotations = obj["metadata"].get("annotations", {})
        if ("Model", name) in kept or LAST_APPLIED not in annotations:
            continue
        if annotations.get(DISCOVERED) == "true":
            del annotations[LAST_APPLIED]
            changes.append(Change("Model", name, "unadopted"))
        else:
            del doc["models"][name]
            changes.append(Change("Model", name, "pruned"))
    return changes


def delete_model(doc: dict[str, Any], name: str) -> Change:
    """Forget a model. Its files stay on disk; a discovered one is remembered so rescans do not bring it back."""
    obj = doc["models"].pop(name, None)
    if obj is None:
        raise NotFoundError(f"model {name!r} not found")
    if obj["metadata"].get("annotations", {}).get(DISCOVERED) == "true":
        key = source_key(obj["spec"]["source"])
        if key not in doc["ignoredSources"]:
            doc["ignoredSources"].append(key)
    return Change("Model", name, "deleted")


def delete_resource(doc: dict[str, Any], kind: str, name: str) -> Change:
    if kind == "Model":
        return delete_model(doc, name)
    if kind == "Recipe":
        if doc["recipes"].pop(name, None) is None:
            raise NotFoundError(f"recipe {name!r} not found")
        return Change("Recipe", name, "deleted")
    if not doc.get("gateway") or doc["gateway"]["metadata"]["name"] != name:
        raise NotFoundError(f"gateway {name!r} not found")
    doc["gateway"] = None
    return Change("Gateway", name, "deleted")


def sync_discovered(doc: dict[str, Any], found: Iterable[Artifact], resolve: Resolver) -> list[Change]:
    """Register new artifacts and refresh the detected facts of every model; touch nothing the user chose.

    Returns what changed: ``discovered`` (new), ``refreshed`` (the weights on disk changed), ``missing`` (they
    are gone). A model with none of these is unchanged and has no Change, so callers can count it.
    """
    changes: list[Change] = []
    by_key: dict[str, list[str]] = {}
    for name, obj in doc["models"].items():
        by_key.setdefault(source_key(obj["spec"]["source"]), []).append(name)
    ignored = set(doc["ignoredSources"])
    new: set[str] = set()
    for artifact in found:
        if artifact.key in by_key or artifact.key in ignored:
            continue
        name = unique_name(*_naming_parts(artifact), doc["models"])
        spec = {"runtime": artifact.default_runtime, "source": artifact.source}
        obj = _new_object("Model", name, copy.deepcopy(spec), {DISCOVERED: "true"})
        doc["models"][name] = obj
        by_key[artifact.key] = [name]
        _ensure_port(doc, obj)
        new.add(name)
        changes.append(Change("Model", name, "discovered"))
    for name in sorted(doc["models"]):
        action = _refresh_artifact(doc["models"][name], resolve)
        if action and name not in new:
            changes.append(Change("Model", name, action))
    return changes


def _refresh_artifact(obj: dict[str, Any], resolve: Resolver) -> str | None:
    """Replace the model's detected facts with what is on disk now; say how they changed (None: not at all)."""
    artifact = resolve(obj["spec"]["source"])
    # Through JSON, so that the fresh facts compare equal to the stored ones when nothing changed on disk.
    detected = json.loads(json.dumps(artifact.to_json())) if artifact else None
    before = obj.get("artifact")
    obj["artifact"] = detected
    if detected == before:
        return None
    return "missing" if detected is None else "refreshed"


def _naming_parts(artifact: Artifact) -> tuple[str | None, str | None]:
    """(repo, file) to derive a name from: the HF repo and file, or the loose file or directory name."""
    hf = artifact.source.get("hf")
    if hf:
        return hf["repo"], hf.get("file")
    if artifact.format == "gguf":
        return None, artifact.path.name
    return artifact.path.name, None


def prune_missing(doc: dict[str, Any]) -> list[Change]:
    """Forget discovered models whose files are gone (``scan --prune``)."""
    changes = []
    for name in sorted(doc["models"]):
        obj = doc["models"][name]
        if obj.get("artifact") is None and is_discovered_only(obj):
            del doc["models"][name]
            changes.append(Change("Model", name, "pruned"))
    return changes
