"""A model's weights on disk, removed on request (``athanor delete ... --files``).

Two steps, so the CLI can show exactly what will go and ask first:

- ``plan(store, names)`` reads the registry (never writes) and says what removing these models' weights would
  remove, with sizes, and what it keeps because another registered model still uses it.
- ``execute(store, plan)`` removes it, once the registry entries are deleted. It checks the registry again
  first (a file some model uses now is kept), reports every file it could not remove with its reason, and
  lets scans find the same weights again when they are downloaded anew (``ignoredSources``).

Hugging Face cache weights go through huggingface_hub's own cache API: the model's revision is removed with
``delete_revisions``, which frees only the blobs no other revision uses. When another registered model uses the
same revision (another quantization of one GGUF repo), only this model's files go (``delete_files``). Loose
weights (``spec.source.path``) are the GGUF file (every shard of a split one, and its mmproj when no other
registered model uses it) or the MLX directory. Symbolic links are left alone: only what they point at is the
weights, and that belongs to whoever made the link.

huggingface_hub is imported only when a plan needs the cache, so the CLI starts light.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from athanor import catalog
from athanor.discovery.artifacts import shards, source_key
from athanor.discovery.hfcache import hf_cache_dir
from athanor.errors import AthanorError
from athanor.store import Store
from athanor.views import human_bytes


@dataclass
class Removal:
    """One thing to remove: loose files or a directory (``paths``), or an HF cache deletion (``strategy``)."""

    label: str  # what the user is shown: a path, or the repo and revision
    size_bytes: int
    size_text: str
    models: tuple[str, ...]
    paths: tuple[Path, ...] = ()
    directory: bool = False  # paths are directories (an MLX model), removed with what they hold
    strategy: Any = None  # huggingface_hub's DeleteCacheStrategy
    hf: tuple[str, tuple[str, ...]] | None = None  # ("revisions", commits) or ("files", snapshot paths), to redo it

    def targets(self) -> list[Path]:
        """Every path this removal deletes (for checking that no registered model uses one)."""
        return list(self.paths) if self.strategy is None else _strategy_targets(self.strategy)


@dataclass
class Kept:
    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass
class Plan:
    models: list[str]
    removals: list[Removal] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # models with nothing on disk to remove
    keys: set[str] = field(default_factory=set)  # ignoredSources entries to reconsider once the files are gone
    cache_dir: Path | None = None

    @property
    def size_bytes(self) -> int:
        return sum(r.size_bytes for r in self.removals)

    def keep(self, what: str, reason: str) -> None:
        if not any(k.what == what for k in self.kept):  # an mmproj two deleted models share is said once
            self.kept.append(Kept(what, reason))

    def lines(self) -> list[str]:
        """What will be removed (one line each, with its size), then what is kept and why."""
        out = [f"  {r.label}  ({r.size_text})" for r in self.removals]
        out += [f"kept: {k}" for k in self.kept]
        out += self.notes
        return out


@dataclass
class Outcome:
    removed: list[Removal] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "PATH: reason"
    left: list[str] = field(default_factory=list)  # paths still on disk after a failure
    still_ignored: list[str] = field(default_factory=list)  # sources scans keep ignoring (other copies remain)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for r in self.removed:
            if r.strategy is not None:
                out.append(f"removed {r.label}: freed {r.size_text}")
            else:
                out.append(f"removed {r.label} ({r.size_text})")
        out += [f"kept {k}" for k in self.kept]
        out += self.notes
        for key in self.still_ignored:
            where = "in the Hugging Face cache (another revision)" if key.startswith("hf:") else "on disk"
            out.append(f"note: {key} is still {where}, so scans keep ignoring it until a spec names it")
        return out

    def error(self) -> AthanorError | None:
        """The error to end with when something could not be removed; the registry is already consistent."""
        if not self.failures:
            return None
        left = ", ".join(self.left) if self.left else "nothing"
        return AthanorError("\n".join([
            *(f"cannot remove {f}" for f in self.failures),
            f"the models stay deleted; left on disk: {left}",
        ]))


# ------------------------------------------------------------------------------------------------- planning


def models_named_by(store: Store, targets: Iterable[str], stdin: IO[str] | None = None) -> list[str]:
    """The Model names the ``-f`` specs name (validated as ``delete -f`` validates them)."""
    from athanor.spec.loader import load_sources
    from athanor.spec.validate import validate_documents

    doc = store.models.load()
    docs, issues = load_sources(targets, stdin)
    resources = validate_documents(docs, stored_models=doc["models"], stored_recipes=doc["recipes"],
                                   parse_issues=issues)
    return [res.name for res in resources if res.kind == "Model"]


def plan(store: Store, names: Iterable[str]) -> Plan:
    """What deleting these models' weights removes and keeps. Reads only; raises NotFoundError for a bad name."""
    doc = store.models.load()
    chosen: list[str] = []
    for name in names:
        resolved = catalog.resolve_name(doc, name)
        if resolved not in chosen:
            chosen.append(resolved)
    result = Plan(chosen, cache_dir=hf_cache_dir(catalog.gateway_spec(doc)["discovery"]))
    users = _Users(doc, exclude=set(chosen))
    hf_models: list[tuple[str, dict[str, Any]]] = []
    for name in chosen:
        obj = doc["models"][name]
        result.keys.add(source_key(obj["spec"]["source"]))
        if "hf" in obj["spec"]["source"]:
            hf_models.append((name, obj))
        else:
            _plan_loose(result, users, name, obj)
    if hf_models:
        _plan_hf(result, users, hf_models)
    return result


def _plan_loose(result: Plan, users: _Users, name: str, obj: dict[str, Any]) -> None:
    artifact = obj.get("artifact") or {}
    path = Path(artifact.get("path") or os.path.expanduser(obj["spec"]["source"]["path"])).absolute()
    if not os.path.lexists(path):
        result.notes.append(f"model/{name}: {path} is not on disk; nothing to remove")
        return
    if path.is_dir() and not path.is_symlink():
        candidates = [path]
    else:
        candidates = shards(path)
        if artifact.get("mmproj"):
            candidates.append(Path(artifact["mmproj"]))
    planned = {p for r in result.removals for p in r.paths}
    for candidate in candidates:
        if candidate in planned:
            continue  # two models being deleted share it (an mmproj): remove it once
        if not os.path.lexists(candidate):
            result.notes.append(f"model/{name}: {candidate} is not on disk")
            continue
        if candidate.is_symlink():
            result.keep(str(candidate), f"a symbolic link (to {os.readlink(candidate)}); athanor removes only the "
                                        "files themselves, remove the link yourself")
            continue
        who = users.of(candidate)
        if who:
            result.keep(str(candidate), _used_by(who))
            continue
        nested = _nested_models(candidate) if candidate.is_dir() else []
        if nested:
            more = f" and {len(nested) - 1} more" if len(nested) > 1 else ""
            result.keep(str(candidate), f"it also holds other weights ({nested[0]}{more}); remove it yourself")
            continue
        size = _tree_size(candidate)
        label = f"{candidate}{os.sep}" if candidate.is_dir() else str(candidate)
        result.removals.append(Removal(label, size, human_bytes(size) if size else "0B", (name,), (candidate,),
                                       directory=candidate.is_dir()))


def _plan_hf(result: Plan, users: _Users, models: list[tuple[str, dict[str, Any]]]) -> None:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache_dir = result.cache_dir
    assert cache_dir is not None
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        info = None
    except (OSError, ValueError) as exc:
        raise AthanorError(f"{cache_dir}: cannot scan the Hugging Face cache: {exc}; nothing was deleted") from exc
    revisions = {}
    if info is not None:
        revisions = {(repo.repo_id, rev.commit_hash): (repo, rev)
                     for repo in info.repos if repo.repo_type == "model" for rev in repo.revisions}
    # The models of one revision are decided together: deleting two quantizations of one repo frees it whole.
    groups: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for name, obj in models:
        artifact = obj.get("artifact") or {}
        repo_id = obj["spec"]["source"]["hf"]["repo"]
        commit = artifact.get("revision")
        if not commit or not artifact.get("path"):
            result.notes.append(f"model/{name}: {repo_id} is not in the Hugging Face cache; nothing to remove")
        elif (repo_id, commit) not in revisions:
            result.notes.append(f"model/{name}: {repo_id} revision {commit[:7]} is not in the Hugging Face cache at "
                                f"{cache_dir}; nothing to remove")
        else:
            groups.setdefault((repo_id, commit), []).append((name, obj))
        result.keys.update(_same_repo_keys(repo_id))
    whole: dict[str, list[tuple[str, tuple[str, ...]]]] = {}  # repo -> [(commit, models)]
    for (repo_id, commit), members in groups.items():
        names = tuple(n for n, _ in members)
        strategy = info.delete_revisions(commit)
        who = users.of_any(_strategy_targets(strategy))
        if not who:
            whole.setdefault(repo_id, []).append((commit, names))
            continue
        _, revision = revisions[(repo_id, commit)]
        _plan_hf_files(result, users, info, repo_id, revision, members, who)
    for repo_id, commits in whole.items():
        strategy = info.delete_revisions(*(c for c, _ in commits))
        names = tuple(n for _, ns in commits for n in ns)
        short = ", ".join(c[:7] for c, _ in commits)
        if strategy.repos:
            where = ", ".join(str(p) for p in sorted(strategy.repos))
            label = f"Hugging Face cache: {repo_id} revision {short}, the last one: all of {where}"
        else:
            where = ", ".join(str(p) for p in sorted(strategy.snapshots))
            label = f"Hugging Face cache: {repo_id} revision {short} ({where})"
        result.removals.append(Removal(label, strategy.expected_freed_size, strategy.expected_freed_size_str,
                                       names, strategy=strategy, hf=("revisions", tuple(c for c, _ in commits))))


def _plan_hf_files(result: Plan, users: _Users, info: Any, repo_id: str, revision: Any,
                   members: list[tuple[str, dict[str, Any]]], revision_users: list[str]) -> None:
    """Another registered model uses this revision: remove only these models' own files, if nobody uses them."""
    short = revision.commit_hash[:7]
    files = []
    for name, obj in members:
        for own in _model_paths(obj):
            who = users.of(own)
            if who:
                result.keep(str(own), _used_by(who))
                continue
            files += [f for f in revision.files if f not in files and _within(Path(f.file_path), own)]
    result.keep(f"the rest of {repo_id} revision {short} ({revision.snapshot_path})", _used_by(revision_users))
    if not files:
        return
    names = tuple(n for n, _ in members)
    delete_files = getattr(info, "delete_files", None)
    if delete_files is None:  # huggingface_hub before delete_files: it can only remove whole revisions
        result.keep(", ".join(str(f.file_path) for f in files),
                    "this huggingface_hub removes whole revisions only; upgrade it to remove single files")
        return
    strategy = delete_files(*files)
    listed = ", ".join(sorted(f.file_name for f in files))
    result.removals.append(Removal(f"Hugging Face cache: {repo_id} revision {short}, {listed}",
                                   strategy.expected_freed_size, strategy.expected_freed_size_str, names,
                                   strategy=strategy, hf=("files", tuple(str(f.file_path) for f in files))))


def _same_repo_keys(repo_id: str) -> set[str]:
    return {f"hf:{repo_id}", f"hf:{repo_id}:*"}  # the repo's MLX model and any of its files


def _model_paths(obj: dict[str, Any]) -> list[Path]:
    """The paths a model's weights are: every GGUF shard and its mmproj, or its MLX directory."""
    artifact = obj.get("artifact") or {}
    source = obj["spec"]["source"]
    raw = artifact.get("path") or (os.path.expanduser(source["path"]) if "path" in source else None)
    if not raw:
        return []
    path = Path(raw).absolute()
    paths = [path] if artifact.get("format") == "mlx" or path.is_dir() else shards(path)
    if artifact.get("mmproj"):
        paths.append(Path(artifact["mmproj"]).absolute())
    return paths


def _nested_models(top: Path) -> list[str]:
    """Weights below an MLX directory that are not part of it (a .gguf, another MLX directory): a directory
    holding those is not removed whole."""
    from athanor.discovery.mlx import is_mlx_dir

    found = []
    for root, dirs, files in os.walk(top):
        here = Path(root)
        if here != top and is_mlx_dir(here):
            found.append(str(here))
            dirs.clear()
            continue
        found += [str(here / f) for f in sorted(files) if f.lower().endswith(".gguf")]
    return found


def _tree_size(path: Path) -> int:
    try:
        if not path.is_dir():
            return path.lstat().st_size
        return sum((Path(root) / f).lstat().st_size for root, _, files in os.walk(path) for f in files)
    except OSError:
        return 0


def _strategy_targets(strategy: Any) -> list[Path]:
    return sorted({*strategy.repos, *strategy.snapshots, *strategy.blobs, *getattr(strategy, "files", ())})


def _used_by(names: Iterable[str]) -> str:
    return "used by " + ", ".join(f"model/{n}" for n in sorted(names))


def _forms(path: Path, *, follow: bool) -> set[str]:
    """The spellings of a path to compare: as given, through its directory's real path, and (``follow``) its
    target. A removal target is not followed: an HF snapshot entry is a link to a blob another revision shares."""
    absolute = os.path.abspath(path)
    forms = {absolute, os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))}
    if follow:
        forms.add(os.path.realpath(absolute))
    return forms


def _within(path: Path, other: Path) -> bool:
    return _overlap(_forms(path, follow=False), _forms(other, follow=False))


def _overlap(a: set[str], b: set[str]) -> bool:
    """Some spelling of one is the other, or inside it (a file inside a model's directory)."""
    return any(x == y or x.startswith(y + os.sep) or y.startswith(x + os.sep) for x in a for y in b)


class _Users:
    """Which registered models (other than those being deleted) use a path."""

    def __init__(self, doc: dict[str, Any], exclude: Iterable[str] = ()):
        exclude = set(exclude)
        self.forms = {
            name: set().union(*(_forms(p, follow=True) for p in _model_paths(obj)))
            for name, obj in doc["models"].items() if name not in exclude
        }

    def of(self, path: Path) -> list[str]:
        target = _forms(path, follow=False)
        return sorted(name for name, forms in self.forms.items() if _overlap(target, forms))

    def of_any(self, paths: Iterable[Path]) -> list[str]:
        return sorted({name for path in paths for name in self.of(path)})


# ------------------------------------------------------------------------------------------------ execution


def execute(store: Store, planned: Plan) -> Outcome:
    """Remove what the plan names; run it after the registry entries are deleted.

    A file a registered model uses now (the registry changed since the plan) is kept. Every failure is
    collected with its path and reason, and the rest goes on. Sources whose weights are gone from disk are
    dropped from ``ignoredSources``, so the same weights downloaded again are discovered again.
    """
    outcome = Outcome(kept=list(planned.kept), notes=list(planned.notes))
    users = _Users(store.models.load())
    for removal in planned.removals:
        if removal.hf is not None:
            removal = _fresh(removal, planned.cache_dir)
            if removal is None:
                continue
        who = users.of_any(removal.targets())
        if who:
            outcome.kept.append(Kept(removal.label, _used_by(who) + " (registered since the plan)"))
            continue
        if removal.strategy is not None:
            failures = _remove_hf(removal.strategy)
        else:
            failures = _remove_paths(removal.paths, directory=removal.directory)
        left = sorted(str(p) for p in removal.targets() if os.path.lexists(p))
        if failures or left:
            outcome.failures += failures or [f"{p}: still on disk" for p in left]
            outcome.left += left
        else:
            outcome.removed.append(removal)
    outcome.still_ignored = _forget_ignored(store, planned)
    return outcome


def _fresh(removal: Removal, cache_dir: Path | None) -> Removal | None:
    """The HF cache deletion computed again from the cache as it is now: a download since the plan may have
    linked a new revision to a blob the planned deletion would have removed. None: it is gone already."""
    from dataclasses import replace

    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    assert removal.hf is not None
    kind, items = removal.hf
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return None
    if kind == "revisions":
        present = {rev.commit_hash for repo in info.repos for rev in repo.revisions}
        commits = [c for c in items if c in present]
        strategy = info.delete_revisions(*commits) if commits else None
    else:
        wanted = set(items)
        files = [f for repo in info.repos for rev in repo.revisions for f in rev.files if str(f.file_path) in wanted]
        strategy = info.delete_files(*files) if files else None
    if strategy is None:
        return None
    return replace(removal, strategy=strategy, size_bytes=strategy.expected_freed_size,
                   size_text=strategy.expected_freed_size_str)


def _remove_paths(paths: Iterable[Path], *, directory: bool) -> list[str]:
    """Remove what was planned, as it was planned: a file is only unlinked (whatever stands there now), a
    directory is removed with its contents only while it is still a directory and not a link to one."""
    failures: list[str] = []
    for path in paths:
        if directory:
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                failures.append(f"{path}: no longer the directory it was; left alone")
            elif path.exists():
                failures += _remove_tree(path)
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures.append(f"{path}: {exc.strerror or exc}")
    return failures


def _remove_tree(top: Path) -> list[str]:
    """Remove a directory bottom-up (links are removed, never followed), collecting every failure."""
    failures: list[str] = []

    def record(exc: OSError) -> None:
        failures.append(f"{exc.filename or top}: {exc.strerror or exc}")

    for root, dirs, files in os.walk(top, topdown=False, onerror=record):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                os.unlink(os.path.join(root, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                record(exc)
        try:
            os.rmdir(root)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not failures:  # a directory left non-empty by an earlier failure says nothing new
                record(exc)
    return failures


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _remove_hf(strategy: Any) -> list[str]:
    """Run a DeleteCacheStrategy. huggingface_hub logs (rather than raises) a path it cannot remove; those
    warnings are collected here as failures instead of reaching the terminal with a traceback."""
    logger = logging.getLogger("huggingface_hub.utils._cache_manager")
    handler = _Collect()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        strategy.execute()
    except OSError as exc:
        handler.messages.append(f"{exc.filename or 'Hugging Face cache'}: {exc.strerror or exc}")
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    return [m for m in handler.messages if "file not found" not in m]


def _forget_ignored(store: Store, planned: Plan) -> list[str]:
    """Drop the ignoredSources entries of these models (and of other files of the same HF repos) that no longer
    resolve to anything on disk; those that still do (another revision holds them) stay ignored."""
    doc = store.models.load()
    registered = {source_key(obj["spec"]["source"]) for obj in doc["models"].values()}
    candidates = [key for key in doc["ignoredSources"] if _matches(key, planned.keys)]
    if not candidates:
        return []
    from athanor.discovery.hfcache import HFCacheIndex

    index = HFCacheIndex.scan(planned.cache_dir)  # after the removal: what is in the cache now
    gone = [key for key in candidates if not _on_disk(key, index)]
    if gone:
        with store.models.edit() as doc:
            doc["ignoredSources"] = [key for key in doc["ignoredSources"] if key not in gone]
    own = {k for k in planned.keys if not k.endswith(":*")}
    # Worth a note only when nothing registered serves those weights anyway.
    return [key for key in candidates if key not in gone and key in own and key not in registered]


def _matches(key: str, patterns: set[str]) -> bool:
    return key in patterns or any(p.endswith(":*") and key.startswith(p[:-1]) for p in patterns)


def _on_disk(key: str, index: Any) -> bool:
    from athanor.discovery.scan import Discovery

    kind, _, rest = key.partition(":")
    if kind == "path":
        return os.path.lexists(rest)
    repo, _, file = rest.partition(":")
    source: dict[str, Any] = {"hf": {"repo": repo, "file": file} if file else {"repo": repo}}
    return Discovery(index, []).resolve(source) is not None
