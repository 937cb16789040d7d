"""The operations behind the CLI, each one store transaction.

A command here reads specs, validates them against the store, and edits the store under its lock in one
all-or-nothing step: a validation error or any exception writes nothing. Only the CLI imports this module: what
the daemon's layers need too lives below it, the derivations of how a model runs in ``runtimes/resolve.py`` and
the shared transactions (scan, the models.json edit the service files follow, events) in ``registry.py``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from athanor import catalog
from athanor.catalog import Change, resolve_name
from athanor.discovery.scan import Discovery, discover
from athanor.errors import InvalidValueError
from athanor.registry import edit_models, record_events, service_files
from athanor.runtimes.presets import check_preset_value, parse_assignment
from athanor.spec.loader import load_sources
from athanor.spec.validate import Resource, validate_documents
from athanor.store import Store


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


def planned(store: Store, targets: Iterable[str], *, stdin: IO[str] | None = None) -> dict[str, Any]:
    """The models document as applying ``targets`` would leave it (validated, weights discovered), written
    nowhere: what ``render`` turns into manifests."""
    return apply(store, targets, dry_run=True, stdin=stdin).after


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


def delete_files(store: Store, targets: Iterable[str], stdin: IO[str] | None = None) -> list[Change]:
    with edit_models(store) as doc:
        resources = _read_resources(store, targets, stdin, doc)
        changes = [catalog.delete_resource(doc, res.kind, res.name) for res in resources]
    record_events(store, changes)
    _unpark(store, changes)
    return changes


def delete_model(store: Store, name: str) -> Change:
    with edit_models(store) as doc:
        change = catalog.delete_model(doc, resolve_name(doc, name))
    record_events(store, [change])
    _unpark(store, [change])
    return change


def _unpark(store: Store, changes: Iterable[Change]) -> None:
    """A deleted model's parked conversations go with it (a running gateway also clears them once it has stopped
    the model, since its stop parks the slots first)."""
    from athanor.parking import files

    for change in changes:
        if change.kind == "Model" and change.action == "deleted":
            files.clear(store.home, change.name)


def delete_recipe(store: Store, name: str) -> list[Change]:
    with edit_models(store) as doc:
        users = sorted(n for n, m in doc["models"].items() if m["spec"].get("recipe") == name)
        if users and name in doc["recipes"]:
            raise InvalidValueError(f"recipe {name!r} is used by {', '.join(users)}; change their recipe first")
        change = catalog.delete_resource(doc, "Recipe", name)
    record_events(store, [change])
    return [change]


def set_preset(store: Store, name: str, assignments: Iterable[str]) -> dict[str, Any]:
    pairs = [parse_assignment(a) for a in assignments]
    with edit_models(store) as doc:
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
    with edit_models(store) as doc:
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


def set_recipe(store: Store, name: str, recipe: str) -> str:
    """Point model ``name`` at another recipe (the TUI's preset editor): the edit ``apply`` would make of a new
    ``spec.recipe``, generation bumped when it changes. Returns the model's name."""
    from athanor.runtimes.resolve import recipes

    with edit_models(store) as doc:
        model = resolve_name(doc, name)
        known = recipes(doc)
        if recipe not in known:
            raise InvalidValueError(f"unknown recipe {recipe!r} (known: {', '.join(sorted(known))})")
        obj = doc["models"][model]
        changed = obj["spec"].get("recipe") != recipe
        obj["spec"]["recipe"] = recipe
        _bump(obj, changed)
        return model


def set_flavor(store: Store, name: str, flavor: str) -> Change:
    """MLX models run on mlx_lm.server (lm) or mlx_vlm.server (vlm); flavor picks which."""
    with edit_models(store) as doc:
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


def set_publish(store: Store, name: str, publish: bool) -> Change:
    """Expose (``spec.publish``) or hide a model: a hidden one is still routed by name, but not listed in
    ``/v1/models`` or pi. How it runs does not change, so the generation stays and a running model keeps running."""
    with edit_models(store) as doc:
        model_name = resolve_name(doc, name)
        spec = doc["models"][model_name]["spec"]
        changed = spec.get("publish", True) != publish
        if publish:
            spec.pop("publish", None)  # the default, as a fresh spec leaves it
        else:
            spec["publish"] = False
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
