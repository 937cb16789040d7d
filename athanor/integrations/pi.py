"""pi, the terminal coding agent: an ``athanor`` provider in pi's models.json.

pi reads custom providers from ``models.json`` in its agent directory (``$PI_CODING_AGENT_DIR``, else
``~/.pi/agent``; athanor also honours ``$PI_HOME/agent`` after the first, as the tool it replaces did):
``{"providers": {NAME: {"baseUrl", "api", "apiKey", "compat", "models": [...]}}}``. athanor owns one entry,
``providers.athanor``, rebuilt from the store on every sync. Every other provider and every other key of the file
belongs to the user and is written back with the value it was read with. A file that is not plain JSON is refused
and left as it is: pi also accepts ``//`` comments and trailing commas, which a rewrite would lose.

pi resolves ``apiKey`` itself: a value starting with ``!`` is a shell command whose output is the key; a value
naming an environment variable that is set is that variable's value; anything else is the key as written. So the
key stays where the Gateway's ``auth`` keeps it: the provider names the variable (``auth.apiKeyEnv``) or a
command reading the key file (``auth.apiKeyFile``). Without auth pi still insists on a key, and the gateway
ignores the placeholder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from athanor import catalog
from athanor.errors import StoreCorruptError, StoreError
from athanor.integrations import KeySource, gateway_url, key_source
from athanor.paths import PRIVATE_FILE_MODE
from athanor.runtimes.presets import EffectiveValue
from athanor.runtimes.resolve import effective_for
from athanor.store import Store, atomic_write_text, locked

PROVIDER = "athanor"
FILENAME = "models.json"
API = "openai-completions"
NO_KEY = "athanor"
PI_MAX_TOKENS = 16384  # what pi asks for when a model names no limit
# llama-server and mlx_lm.server speak OpenAI's chat API without OpenAI's extras: no "developer" role, no
# reasoning_effort, no stored completions.
COMPAT = {"supportsDeveloperRole": False, "supportsReasoningEffort": False, "supportsStore": False}


def agent_dir(doc: dict[str, Any], override: str | None = None) -> Path:
    """``override`` (``--dir``), else the Gateway's ``integrations.pi.dir``, else ``$PI_CODING_AGENT_DIR``, else
    ``$PI_HOME/agent``, else ``~/.pi/agent``: where pi itself looks, unless told otherwise."""
    configured = override or (catalog.gateway_spec(doc)["integrations"].get("pi") or {}).get("dir")
    pi_home = os.environ.get("PI_HOME")
    raw = (configured or os.environ.get("PI_CODING_AGENT_DIR") or (pi_home and os.path.join(pi_home, "agent"))
           or "~/.pi/agent")
    return Path(os.path.abspath(os.path.expanduser(raw)))


def api_key(source: KeySource | None) -> str:
    """The ``apiKey`` value that makes pi send the gateway's key without the file holding it."""
    if source is None:
        return NO_KEY
    if source.env:
        return source.env
    return "!" + source.file_command()


def provider(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``athanor`` provider for the store's models: every one the gateway serves, by name."""
    return {
        "baseUrl": gateway_url(doc) + "/v1",
        "api": API,
        "apiKey": api_key(key_source(doc)),
        "compat": dict(COMPAT),
        "models": [model_entry(doc, obj) for _, obj in sorted(doc["models"].items())
                   if obj["spec"].get("residency") != "disabled" and obj["spec"].get("publish", True)
                   and _generates(obj)],
    }


def model_entry(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """One model as pi lists it: its context window, what it answers at most, whether it takes images."""
    name = obj["metadata"]["name"]
    effective = effective_for(doc, obj)
    entry: dict[str, Any] = {"id": name, "name": name, "input": ["text", "image"] if _vision(obj) else ["text"]}
    window = _context_window(obj, effective)
    cap = effective.get("maxTokens")
    max_tokens = int(cap.value) if cap else PI_MAX_TOKENS
    if window:
        entry["contextWindow"] = window
        max_tokens = min(max_tokens, window)
    entry["maxTokens"] = max_tokens
    return entry


def _context_window(obj: dict[str, Any], effective: dict[str, EffectiveValue]) -> int | None:
    """The context the runtime is started with (``ctxSize``; 0 means the model's own), else the model's own."""
    ctx = effective.get("ctxSize")
    if ctx is not None and ctx.value:
        return int(ctx.value)
    length = ((obj.get("artifact") or {}).get("metadata") or {}).get("contextLength")
    return int(length) if length else None


def _generates(obj: dict[str, Any]) -> bool:
    """A chat model (not an embedding or reranking one, which an agent cannot talk to)."""
    capabilities = (obj.get("artifact") or {}).get("capabilities") or ["text"]
    return "text" in capabilities


def _vision(obj: dict[str, Any]) -> bool:
    """Served with its vision tower: the vlm flavor of an MLX model, or a GGUF with a projector beside it."""
    runtime = obj["spec"]["runtime"]
    return runtime == "mlx-vlm" or (runtime == "llama-server" and bool((obj.get("artifact") or {}).get("mmproj")))


@dataclass(frozen=True)
class SyncResult:
    """What a sync did to pi's file (or would do, in a dry run)."""

    path: Path
    added: list[str]
    removed: list[str]
    updated: list[str]
    unchanged: int
    provider: str | None  # "created" or "updated" when baseUrl, api, apiKey or compat changed
    written: bool
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.updated or self.provider)

    def lines(self) -> list[str]:
        """``provider/athanor created``, ``model/NAME added``, ...: one line per change."""
        suffix = " (dry run)" if self.dry_run else ""
        out = [f"provider/{PROVIDER} {self.provider}{suffix}"] if self.provider else []
        for action, names in (("added", self.added), ("removed", self.removed), ("updated", self.updated)):
            out += [f"model/{name} {action}{suffix}" for name in names]
        return out

    def summary(self) -> str:
        counts = (f"{len(self.added)} added, {len(self.removed)} removed, {len(self.updated)} updated, "
                  f"{self.unchanged} unchanged")
        if self.dry_run:
            return f"pi: {counts}; {self.path} not written (dry run)"
        return f"pi: {counts}; {'wrote' if self.written else 'already up to date:'} {self.path}"


def sync(store: Store, *, directory: str | None = None, dry_run: bool = False) -> SyncResult:
    """Rewrite ``providers.athanor`` in pi's models.json from the store, leaving everything else as it was.

    Syncs from several athanor processes are serialised, and each reads the store under that lock, so the last
    one written reflects the latest store. Nothing is written when nothing changed.
    """
    with _serialised(store, dry_run):
        doc = store.models.load()
        path = agent_dir(doc, directory) / FILENAME
        target = path.resolve() if path.is_symlink() else path  # a symlinked file (dotfiles) stays a symlink
        data, mode = _read(target)
        providers = data.setdefault("providers", {})
        old = providers.get(PROVIDER)
        new = provider(doc)
        result = _compare(path, old if isinstance(old, dict) else None, new, dry_run)
        if result.changed and not dry_run:
            providers[PROVIDER] = new
            try:
                atomic_write_text(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                                  mode=PRIVATE_FILE_MODE if mode is None else mode)
            except OSError as exc:
                raise StoreError(f"{target}: cannot write: {exc.strerror or exc}") from exc
            return dataclasses.replace(result, written=True)
        return result


def sync_if_enabled(store: Store, doc: dict[str, Any]) -> list[str]:
    """``sync`` when the Gateway in ``doc`` asks for it (``integrations.pi.sync``); what changed, to print.

    For apply, scan, delete, preset, flavor and discovery: silent when nothing changed. Errors are raised;
    callers report them as warnings, since the store itself is saved."""
    if not (catalog.gateway_spec(doc)["integrations"].get("pi") or {}).get("sync"):
        return []
    result = sync(store)
    if not result.changed:
        return []
    return [f"pi: {line}" for line in result.lines()] + [result.summary()]


@contextlib.contextmanager
def _serialised(store: Store, dry_run: bool) -> Iterator[None]:
    if dry_run:
        yield
        return
    with locked(store.home / "pi-sync"):
        yield


def _read(path: Path) -> tuple[dict[str, Any], int | None]:
    """pi's file as a dict (empty when there is none) and its permission bits (None: no file yet)."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return {}, None
    except UnicodeDecodeError as exc:
        raise StoreCorruptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); left untouched") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not text.strip():
        return {}, mode
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreCorruptError(
            f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}); left untouched. athanor rewrites only "
            "plain JSON (pi also accepts // comments and trailing commas, which a rewrite would lose)"
        ) from exc
    if not isinstance(data, dict):
        raise StoreCorruptError(f"{path}: expected a JSON object at the top level; left untouched")
    if not isinstance(data.get("providers", {}), dict):
        raise StoreCorruptError(f"{path}: 'providers' must be a JSON object; left untouched")
    return data, mode


def _compare(path: Path, old: dict[str, Any] | None, new: dict[str, Any], dry_run: bool) -> SyncResult:
    listed = (old or {}).get("models")
    before = {m.get("id"): m for m in (listed if isinstance(listed, list) else []) if isinstance(m, dict)}
    after = {m["id"]: m for m in new["models"]}
    added = sorted(n for n in after if n not in before)
    removed = sorted(str(n) for n in before if n not in after)
    updated = sorted(n for n in after if n in before and before[n] != after[n])
    provider_change = None
    if old is None:
        provider_change = "created"
    elif old != new and not (added or removed or updated):
        provider_change = "updated"  # its settings, or the order or shape of its models list
    elif {k: v for k, v in old.items() if k != "models"} != {k: v for k, v in new.items() if k != "models"}:
        provider_change = "updated"
    return SyncResult(
        path=path,
        added=added,
        removed=removed,
        updated=updated,
        unchanged=sum(1 for n in after if n in before) - len(updated),
        provider=provider_change,
        written=False,
        dry_run=dry_run,
    )
