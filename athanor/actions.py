"""The operations behind the CLI (and, later, the daemon's admin API), each one store transaction.

A command here reads specs, validates them against the store, and edits the store under its lock in one
all-or-nothing step: a validation error or any exception writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from athanor import catalog
from athanor.catalog import Change
from athanor.discovery.scan import Discovery, discover
from athanor.errors import AthanorError, InvalidValueError, NotFoundError
from athanor.runtimes.args import effective_args, effective_env
from athanor.paths import athanor_home
from athanor.runtimes.launch import LaunchSpec, Target, binary_or_name, launch_spec
from athanor.runtimes.secret import secret_path
from athanor.runtimes.presets import (
    BUILTIN_RECIPES,
    DEFAULT_RECIPE,
    EffectiveValue,
    Recipe,
    check_preset_value,
    effective_preset,
    parse_assignment,
)
from athanor.spec.loader import load_sources
from athanor.spec.validate import Resource, validate_documents
from athanor.store import Store

MAX_EVENTS = 500


@dataclass
class ApplyResult:
    changes: list[Change]
    discovered: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    files: list[Any] = field(default_factory=list)  # service files written or removed (managers/files.py)


@contextlib.contextmanager
def _models(store: Store, dry_run: bool) -> Iterator[dict[str, Any]]:
    if dry_run:
        yield store.models.load()
    else:
        with store.models.edit() as doc:
            yield doc


def _read_resources(store: Store, targets: Iterable[str], stdin: IO[str] | None, doc: dict[str, Any]) -> list[Resource]:
    docs, parse_issues = load_sources(targets, stdin)
    return validate_documents(
        docs, stored_models=doc["models"], stored_recipes=doc["recipes"], parse_issues=parse_issues
    )


def apply(
    store: Store, targets: Iterable[str], *, dry_run: bool = False, prune: bool = False, stdin: IO[str] | None = None
) -> ApplyResult:
    """Validate every document, rescan, then apply them all, or nothing."""
    targets = list(targets)
    with _models(store, dry_run) as doc:
        resources = _read_resources(store, targets, stdin, doc)
        before = copy.deepcopy(doc)
        discovery = _discover_for(doc, resources)
        discovered = catalog.sync_discovered(doc, discovery.found, discovery.resolve)
        changes = catalog.apply_resources(doc, resources, discovery.resolve)
        if prune:
            changes += catalog.prune(doc, resources)
        after = copy.deepcopy(doc)
    result = ApplyResult(changes, discovered, discovery.warnings, before, after, resources)
    result.files = service_files(store, after, dry_run=dry_run)
    if not dry_run:
        record_events(store, [*discovered, *changes])
    return result


@contextlib.contextmanager
def _edit_models(store: Store) -> Iterator[dict[str, Any]]:
    """A locked edit of models.json; once it is written, the service files follow it."""
    with store.models.edit() as doc:
        yield doc
        after = copy.deepcopy(doc)
    service_files(store, after)


def service_files(store: Store, doc: dict[str, Any], *, dry_run: bool = False) -> list[Any]:
    """Bring the service manager's files in step with ``doc`` (nothing to do for the embedded supervisor).

    It runs once models.json is written: a failure here must say so, and a later apply or scan repairs it.
    """
    from athanor.managers import files

    try:
        return files.sync(store, doc, dry_run=dry_run)
    except (AthanorError, OSError) as exc:
        if dry_run:
            raise
        raise AthanorError(f"models.json is saved, but the service files are not: {exc}; once that is fixed, "
                           "'athanor apply' (or 'athanor scan') writes them") from exc


def _discover_for(doc: dict[str, Any], resources: list[Resource]) -> Discovery:
    """Discovery as configured by the gateway being applied, if any, else the stored one."""
    spec = catalog.gateway_spec(doc)
    for res in resources:
        if res.kind == "Gateway":
            spec = catalog.overlay(catalog.GATEWAY_DEFAULTS, res.spec)
    return discover(spec["discovery"])


def diff(store: Store, targets: Iterable[str], *, prune: bool = False, stdin: IO[str] | None = None) -> str:
    """A unified diff of what ``apply`` would change in the objects the targets name (and prune would remove)."""
    result = apply(store, targets, dry_run=True, prune=prune, stdin=stdin)
    chunks: list[str] = []
    for change in result.changes:
        old = _find(result.before, change.kind, change.name)
        new = _find(result.after, change.kind, change.name)
        if change.action == "adopted":
            old = next(
                (m for m in result.before["models"].values()
                 if catalog.source_key(m["spec"]["source"]) == catalog.source_key(new["spec"]["source"])),
                None,
            )
        old_text, new_text = _diff_text(old), _diff_text(new)
        if old_text == new_text:
            continue
        label = f"{change.kind.lower()}/{change.name}"
        chunks += difflib.unified_diff(
            old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), f"{label} (live)", f"{label} (applied)"
        )
    from athanor.managers import files

    return "".join(chunks) + files.diff(store, result.after)


def _find(doc: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
    if kind == "Gateway":
        gw = doc.get("gateway")
        return gw if gw and gw["metadata"]["name"] == name else None
    return doc["recipes" if kind == "Recipe" else "models"].get(name)


def _diff_text(obj: dict[str, Any] | None) -> str:
    if obj is None:
        return ""
    import yaml

    shown = copy.deepcopy(obj)
    shown.pop("artifact", None)
    shown["metadata"].get("annotations", {}).pop(catalog.LAST_APPLIED, None)
    return yaml.safe_dump(shown, sort_keys=True, default_flow_style=False)


@dataclass
class ScanResult:
    """What a scan did: the changes to print and record, and how many models it left as they were (a rescan
    that changed nothing must be able to say so)."""

    changes: list[Change]
    warnings: list[str]
    unchanged: int

    def count(self, action: str) -> int:
        return sum(1 for c in self.changes if c.action == action)


def scan(store: Store, extra_paths: tuple[str, ...] = (), *, prune: bool = False, record: bool = True) -> ScanResult:
    """Register what discovery finds and refresh every model's detected facts, in one store transaction.
    ``record``: write the changes to state.json's events (the daemon records them through its own event log)."""
    with _edit_models(store) as doc:
        spec = catalog.gateway_spec(doc)
        discovery = discover(spec["discovery"], extra_paths)
        changes = catalog.sync_discovered(doc, discovery.found, discovery.resolve)
        if prune:
            changes += catalog.prune_missing(doc)
        changed = {c.name for c in changes}
        unchanged = sum(1 for name in doc["models"] if name not in changed)
    if record:
        record_events(store, changes)
    return ScanResult(changes, discovery.warnings, unchanged)


def delete_files(store: Store, targets: Iterable[str], stdin: IO[str] | None = None) -> list[Change]:
    with _edit_models(store) as doc:
        resources = _read_resources(store, targets, stdin, doc)
        changes = [catalog.delete_resource(doc, res.kind, res.name) for res in resources]
    record_events(store, changes)
    return changes


def delete_model(store: Store, name: str) -> Change:
    with _edit_models(store) as doc:
        change = catalog.delete_model(doc, resolve_name(doc, name))
    record_events(store, [change])
    return change


def delete_recipe(store: Store, name: str) -> list[Change]:
    with _edit_models(store) as doc:
        users = sorted(n for n, m in doc["models"].items() if m["spec"].get("recipe") == name)
        if users and name in doc["recipes"]:
            raise InvalidValueError(f"recipe {name!r} is used by {', '.join(users)}; change their recipe first")
        change = catalog.delete_resource(doc, "Recipe", name)
    record_events(store, [change])
    return [change]


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


def set_preset(store: Store, name: str, assignments: Iterable[str]) -> dict[str, Any]:
    pairs = [parse_assignment(a) for a in assignments]
    with _edit_models(store) as doc:
        obj = doc["models"][resolve_name(doc, name)]
        runtime = obj["spec"]["runtime"]
        problems = [f"{k}: {p}" for k, v in pairs if (p := check_preset_value(runtime, k, v))]
        if problems:
            raise InvalidValueError("; ".join(problems))
        preset = obj["spec"].setdefault("preset", {})
        before = dict(preset)
        preset.update(pairs)
        _bump(obj, before != preset)
        return dict(preset)


def unset_preset(store: Store, name: str, keys: Iterable[str]) -> dict[str, Any]:
    with _edit_models(store) as doc:
        obj = doc["models"][resolve_name(doc, name)]
        preset = obj["spec"].get("preset", {})
        missing = [k for k in keys if k not in preset]
        if missing:
            raise InvalidValueError(f"not set on {obj['metadata']['name']}: {', '.join(missing)}")
        for key in keys:
            del preset[key]
        if not preset:
            obj["spec"].pop("preset", None)
        _bump(obj, True)
        return dict(preset)


def set_flavor(store: Store, name: str, flavor: str) -> Change:
    """MLX models run on mlx_lm.server (lm) or mlx_vlm.server (vlm); flavor picks which."""
    with _edit_models(store) as doc:
        model_name = resolve_name(doc, name)
        obj = doc["models"][model_name]
        if obj["spec"]["runtime"] == "llama-server":
            raise InvalidValueError(f"{model_name} is a GGUF model served by llama-server; flavor applies to MLX models")
        runtime = "mlx-vlm" if flavor == "vlm" else "mlx-lm"
        changed = obj["spec"]["runtime"] != runtime
        obj["spec"]["runtime"] = runtime
        _drop_foreign_preset_keys(obj)
        _bump(obj, changed)
    return Change("Model", model_name, "configured" if changed else "unchanged")


def _drop_foreign_preset_keys(obj: dict[str, Any]) -> None:
    preset = obj["spec"].get("preset")
    if preset:
        runtime = obj["spec"]["runtime"]
        for key in [k for k, v in preset.items() if check_preset_value(runtime, k, v)]:
            del preset[key]


def _bump(obj: dict[str, Any], changed: bool) -> None:
    if changed:
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1


def recipes(doc: dict[str, Any]) -> dict[str, Recipe]:
    """Built-in recipes overlaid by the user's (a user recipe may shadow a built-in one)."""
    found = dict(BUILTIN_RECIPES)
    for name, obj in doc["recipes"].items():
        spec = obj["spec"]
        values = {k: v for k, v in spec.items() if k != "description"}
        found[name] = Recipe(name, spec.get("description", ""), values)
    return found


def effective_for(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, EffectiveValue]:
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


def launch_for(doc: dict[str, Any], obj: dict[str, Any]) -> LaunchSpec | None:
    """How this model would be started now, or None while its weights are not on disk."""
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
    return launch_spec(target, effective_for(doc, obj), spec["port"], binary_or_name(spec["runtime"], configured),
                       quiet=quiet, extra_args=extra, extra_env=effective_env(spec["runtime"], gateway, spec),
                       secret_file=str(secret_path(athanor_home().absolute(), target.name)))


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


def record_events(store: Store, changes: Iterable[Change]) -> None:
    events = [
        {
            "time": catalog.now_iso(),
            "kind": c.kind,
            "name": c.name,
            "type": "Warning" if c.action == "missing" else "Normal",
            "reason": c.action.capitalize(),
            "message": f"{c.kind.lower()}/{c.name} {c.action}",
        }
        for c in changes
        if c.action != "unchanged"
    ]
    if not events:
        return
    with store.state.edit() as state:
        state["events"] = (state["events"] + events)[-MAX_EVENTS:]
