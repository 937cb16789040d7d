"""Validate parsed documents: the JSON Schema first, then the rules a schema cannot express.

Every issue of every document is collected before anything is reported, so one run shows the user all that is
wrong. The output is a list of ``Resource`` objects that the catalog can apply without further checks.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from athanor.addresses import authority, parse_listen
from athanor.errors import SpecError, SpecIssue
from athanor.paths import data_path
from athanor.runtimes.args import arg_problems, env_problems
from athanor.runtimes.presets import BUILTIN_RECIPES, RUNTIMES, check_preset_value
from athanor.spec.loader import Document, JSONPath

_MAX_REPR = 60
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # a socket on every interface


@dataclass(frozen=True)
class Resource:
    """A validated document: ``body`` holds apiVersion, kind, metadata and spec (status is dropped).

    ``body`` is normalised for storing: a Model's ``source.path`` is absolute (see ``Document.resolve_path``).
    """

    kind: str
    name: str
    body: dict[str, Any]
    doc: Document

    @property
    def spec(self) -> dict[str, Any]:
        return self.body["spec"]

    def where(self) -> str:
        line, col = self.doc.locate(())
        return f"{self.doc.file}:{line}:{col}"


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    return json.loads(data_path("schema/athanor.schema.json").read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    # JSON Schema counts 8080.0 as an integer. athanor passes these values on as counts, ports and command-line
    # arguments (``--parallel 8.0`` is an error to llama-server; the compiled hot path takes ints only), so a spec
    # must write 8080.
    integers = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=integers)(schema())


def validate_documents(
    docs: Iterable[Document],
    *,
    stored_models: Mapping[str, Mapping[str, Any]] = {},
    stored_recipes: Iterable[str] = (),
    parse_issues: Iterable[SpecIssue] = (),
) -> list[Resource]:
    """Check every document; return resources or raise SpecError listing every issue found (with the
    ``parse_issues`` of documents that did not even parse, so one run reports everything)."""
    issues: list[SpecIssue] = list(parse_issues)
    resources: list[Resource] = []
    checkable: list[Resource] = []
    for doc in docs:
        found = _schema_issues(doc)
        issues += found
        res = _identify(doc)
        if res is None:
            continue
        if not found:
            resources.append(res)
        if not any(i.path.startswith(("kind", "metadata.name")) for i in found):
            checkable.append(res)  # cross-document rules still run on documents with unrelated schema errors
    said = {(issue.file, issue.path) for issue in issues}  # one message per field, the schema's or a rule's
    issues += [issue for issue in _cross_issues(checkable, stored_models, set(stored_recipes))
               if (issue.file, issue.path) not in said]
    if issues:
        raise SpecError(issues)
    return resources


def _identify(doc: Document) -> Resource | None:
    data = doc.data
    if not isinstance(data, dict) or data.get("kind") not in ("Gateway", "Model", "Recipe"):
        return None
    metadata, spec = data.get("metadata"), data.get("spec")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) or not isinstance(spec, dict):
        return None
    body = {k: v for k, v in data.items() if k != "status"}
    if data["kind"] == "Model":
        body["spec"] = _absolute_source(doc, spec)
    return Resource(data["kind"], metadata["name"], body, doc)


def _absolute_source(doc: Document, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with ``source.path`` made absolute against the document's file, so that apply, diff and the
    daemon all mean the same file whatever their working directory. ``doc.data`` keeps what was written."""
    draft = spec.get("draft")
    if isinstance(draft, str) and ("/" in draft or draft.endswith(".gguf") or draft.startswith("~")):
        spec = {**spec, "draft": doc.resolve_path(draft)}  # a path, not a model name
    source = spec.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("path"), str) or not source["path"]:
        return spec
    return {**spec, "source": {**source, "path": doc.resolve_path(source["path"])}}


def _schema_issues(doc: Document) -> list[SpecIssue]:
    if not isinstance(doc.data, dict):
        return [doc.issue((), "a document must be a mapping with apiVersion, kind, metadata and spec")]
    issues: list[SpecIssue] = []
    for error in _validator().iter_errors(doc.data):
        issues += _describe(doc, error)
    return issues


def _describe(doc: Document, error: Any) -> list[SpecIssue]:
    from jsonschema.exceptions import best_match

    path: JSONPath = tuple(error.absolute_path)
    validator, schema_part, instance = error.validator, error.schema, error.instance
    if validator in ("oneOf", "anyOf") and error.context:
        if "x-message" in schema_part:
            return [_issue(doc, path, schema_part["x-message"])]
        return _describe(doc, best_match(error.context))
    if validator == "additionalProperties":
        allowed = sorted(schema_part.get("properties", {}))
        return [
            doc.issue(path + (key,), f"unknown field (valid: {', '.join(allowed)})", key=True)
            for key in instance
            if key not in allowed
        ]
    if validator == "required":
        missing = [name for name in error.validator_value if name not in instance]
        return [_issue(doc, path, f"missing required field {name!r}") for name in missing]
    if "x-message" in schema_part:
        subject = "" if isinstance(instance, (dict, list)) else f"{_short(instance)} "
        return [_issue(doc, path, subject + schema_part["x-message"])]
    if validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [_issue(doc, path, f"expected {expected}, got {_json_type(instance)} {_short(instance)}")]
    if validator == "const":
        return [_issue(doc, path, f"must be {error.validator_value!r}, not {_short(instance)}")]
    return [_issue(doc, path, error.message if len(error.message) < 200 else error.message[:200] + "...")]


def _issue(doc: Document, path: JSONPath, message: str) -> SpecIssue:
    return doc.issue(path, message, key=bool(path) and isinstance(path[-1], str))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}.get(type(value), "null")


def _cross_issues(
    resources: list[Resource], stored_models: Mapping[str, Mapping[str, Any]], stored_recipes: set[str]
) -> list[SpecIssue]:
    """Rules that span documents or need the store: duplicates, references, runtime-specific keys."""
    issues: list[SpecIssue] = []
    seen: dict[tuple[str, str], Resource] = {}
    for res in resources:
        first = seen.setdefault((res.kind, res.name), res)
        if first is not res:
            issues.append(
                _issue(res.doc, ("metadata", "name"), f"duplicate {res.kind} {res.name!r} (first at {first.where()})")
            )
    gateways = [r for r in resources if r.kind == "Gateway"]
    for extra in gateways[1:]:
        if extra.name != gateways[0].name:
            issues.append(
                _issue(extra.doc, ("metadata", "name"), f"only one Gateway may exist (first at {gateways[0].where()})")
            )
    recipes = set(BUILTIN_RECIPES) | stored_recipes | {r.name for r in resources if r.kind == "Recipe"}
    for res in resources:
        if res.kind == "Model":
            issues += _model_issues(res, recipes)
        elif res.kind == "Recipe":
            for runtime in RUNTIMES:
                issues += _preset_issues(res, ("spec", runtime), runtime)
        elif res.kind == "Gateway":
            for runtime in RUNTIMES:
                issues += _args_issues(res, ("spec", "runtimes", runtime, "args"), runtime)
                issues += _env_issues(res, ("spec", "runtimes", runtime, "env"))
            start, end = _get(res.spec, "portRange", "start"), _get(res.spec, "portRange", "end")
            if isinstance(start, int) and isinstance(end, int) and start > end:
                issues.append(_issue(res.doc, ("spec", "portRange"), "start must not be greater than end"))
            issues += _listen_issues(res)
    issues += _alias_issues([r for r in resources if r.kind == "Model"], stored_models)
    return issues


def _listen_issues(res: Resource) -> list[SpecIssue]:
    """A Gateway's addresses: ports in range (the schema checks only the shape, and a port above 65535 would wrap
    around silently when bound), and ``ollama.listen`` another socket than ``listen``: one port cannot be bound
    twice, and ``listen`` answers Ollama's API already."""
    issues: list[SpecIssue] = []
    addresses: dict[str, tuple[str, int]] = {}
    gateway_schema = schema()["$defs"]["gatewaySpec"]["properties"]
    pattern = re.compile(gateway_schema["listen"]["pattern"])
    for key, path in (("listen", ("spec", "listen")), ("ollama.listen", ("spec", "ollama", "listen"))):
        value = _get(res.body, *path)
        if value is None and key == "listen":
            value = gateway_schema["listen"]["default"]
        elif not isinstance(value, str) or not pattern.match(value):
            continue  # absent, or the schema said so
        host, port = parse_listen(value)
        if not 1 <= port <= 65535:
            issues.append(_issue(res.doc, path, f"port {port} is out of range: must be 1 to 65535"))
        else:
            addresses[key] = (host, port)
    main, ollama = addresses.get("listen"), addresses.get("ollama.listen")
    if main and ollama and main[1] == ollama[1] and (main[0] == ollama[0] or {main[0], ollama[0]} & _WILDCARDS):
        issues.append(_issue(res.doc, ("spec", "ollama", "listen"),
                             f"{authority(*ollama)} collides with spec.listen ({authority(*main)}): both bind port "
                             f"{main[1]}; choose another port (spec.listen answers Ollama's API too, so spec.ollama "
                             "may also go)"))
    return issues


def _model_issues(res: Resource, recipes: set[str]) -> list[SpecIssue]:
    issues = []
    recipe = res.spec.get("recipe")
    if isinstance(recipe, str) and recipe not in recipes:
        known = ", ".join(sorted(recipes))
        issues.append(_issue(res.doc, ("spec", "recipe"), f"unknown recipe {recipe!r} (known: {known})"))
    runtime = res.spec.get("runtime")
    if runtime not in RUNTIMES:
        return issues  # the schema already said so
    issues += _preset_issues(res, ("spec", "preset"), runtime)
    issues += _args_issues(res, ("spec", "args"), runtime)
    issues += _env_issues(res, ("spec", "env"))
    if res.spec.get("draft") is not None and runtime != "llama-server":
        issues.append(_issue(res.doc, ("spec", "draft"), f"speculative decoding needs llama-server, not {runtime}"))
    hf = _get(res.spec, "source", "hf")
    if not isinstance(hf, dict):
        return issues
    file = hf.get("file")
    if runtime == "llama-server" and file is None:
        issues.append(_issue(res.doc, ("spec", "source", "hf"), "llama-server needs 'file': which .gguf in the repo"))
    elif runtime == "llama-server" and isinstance(file, str) and not file.endswith(".gguf"):
        issues.append(_issue(res.doc, ("spec", "source", "hf", "file"), "llama-server serves .gguf files"))
    elif runtime != "llama-server" and file is not None:
        issues.append(_issue(res.doc, ("spec", "source", "hf", "file"), f"{runtime} serves a whole repo; drop 'file'"))
    return issues


def _get(data: Any, *path: str) -> Any:
    for part in path:
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _preset_issues(res: Resource, path: JSONPath, runtime: str) -> list[SpecIssue]:
    values = _get(res.body, *path)
    if not isinstance(values, dict):
        return []
    issues = []
    for name, value in values.items():
        problem = check_preset_value(runtime, name, value)
        if problem:
            issues.append(res.doc.issue(path + (name,), problem, key=True))
    return issues


def _args_issues(res: Resource, path: JSONPath, runtime: str) -> list[SpecIssue]:
    """Flags in ``args`` that athanor manages itself are refused, naming the field that sets them."""
    args = _get(res.body, *path)
    if not isinstance(args, list):
        return []
    return [_issue(res.doc, path + (i,), why) for i, why in arg_problems(runtime, args)]


def _env_issues(res: Resource, path: JSONPath) -> list[SpecIssue]:
    env = _get(res.body, *path)
    if not isinstance(env, dict):
        return []
    return [res.doc.issue(path + (name,), why, key=True) for name, why in env_problems(env)]


def _alias_issues(models: list[Resource], stored_models: Mapping[str, Mapping[str, Any]]) -> list[SpecIssue]:
    """A name or alias must mean one model: across this apply and the models already stored."""
    applying = {m.name for m in models}
    owner: dict[str, str] = {}
    for name, obj in stored_models.items():
        if name in applying:
            continue
        owner[name] = name
        for alias in _get(obj, "spec", "aliases") or []:
            owner[alias] = name
    for m in models:
        owner.setdefault(m.name, m.name)
    issues = []
    for m in models:
        aliases = m.spec.get("aliases")
        for i, alias in enumerate(aliases if isinstance(aliases, list) else []):
            if not isinstance(alias, str):
                continue
            holder = owner.setdefault(alias, m.name)
            if holder != m.name:
                issues.append(_issue(m.doc, ("spec", "aliases", i), f"{alias!r} already names model {holder!r}"))
    return issues
