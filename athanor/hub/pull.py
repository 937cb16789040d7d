"""``athanor pull``: a Hub repo's files into the Hugging Face cache, then registered by the discovery the daemon runs.

    plan(repo, files=, revision=, cache_dir=)  what to fetch: one listing (file sizes), the choice, the order
    check_fit(plan, force=)                    refuse a model that cannot fit this machine, before any byte
    check_disk(plan)                           refuse a pull the cache's disk cannot hold
    download(plan, progress)                   hf_hub_download, file by file, progress to a ``Progress``
    register(plan, store)                      after every file is complete: ``registry.scan``, the names found

What is fetched is what ``athanor search`` shows for the repo: for GGUF the quantization ``choose_gguf`` prefers
(every shard of a split one) and the projector (``mmproj``) beside it; for MLX the weights and what mlx-lm loads
with them (config, tokenizer, chat template). ``--file`` names files instead (a shard brings its siblings).

The cache is the one discovery scans (the Gateway's ``discovery.hfCacheDir``, else ``HF_HUB_CACHE`` and the hub's
other rules). Files are fetched one at a time, and the file discovery keys a model on comes last: the projector
and the later shards first, the first shard (GGUF) or config.json (MLX) at the end. So a scan in the middle of a
pull (the daemon's cache watcher, another ``athanor scan``) never sees half a model, and an interrupted pull
leaves nothing discovery would register. huggingface_hub resumes a dropped connection within the download from
the last whole chunk it wrote (a ``Range`` request); a file a pull did not finish is not kept (huggingface_hub 2.x
writes a temporary file per process and removes it), files it finished stay in the cache and are not fetched
again.

Memory: ``check_fit`` refuses a model whose weights alone, or whose estimate at the smallest useful context,
exceed what this machine can give a model (total memory less ``athanor.fit.headroom``), the same line the
controller's memory guard draws for a start. The weights are checked first, from the listing alone, so a model
that can never fit costs no read of its files at all.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, Self

from athanor.errors import (
    AthanorError,
    HubError,
    InvalidValueError,
    NotFoundError,
    PullRefused,
    printable,
)
from athanor.hub import _client
from athanor.hub._files import (
    Choice,
    choose_gguf,
    choose_safetensors,
    is_projector,
    mlx_quant,
)

if TYPE_CHECKING:
    from athanor.fit import Memory
    from athanor.hub import Row
    from athanor.store import Store

# What mlx_lm fetches beside the weights (mlx_lm.utils.DEFAULT_ALLOW_PATTERNS, less its weights pattern: the
# weights are the files ``choose_safetensors`` counts in the search's size and the fit estimate).
MLX_SUPPORT_PATTERNS = ("*.json", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt", "*.jsonl",
                        "*.jinja")
MIN_CONTEXT = 512  # the smallest context counted as useful (athanor.fit's smallest candidate)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PullFile:
    path: str  # in the repo
    size: int
    cached: bool  # already in the cache (this commit's snapshot, or the same blob): nothing to fetch
    blob: str | None = None  # its blob in the cache as the listing names it: an LFS file's sha256, else a git id


@dataclass(frozen=True)
class Planned:
    """One model the pull should leave registered: the source key discovery gives it, and its bytes."""

    key: str  # athanor.discovery.artifacts.source_key of the source discovery will record
    runtime: str  # llama-server | mlx-lm
    files: tuple[str, ...]  # its weights (every shard)
    weights_bytes: int
    projector_bytes: int
    quant: str | None


@dataclass(frozen=True)
class Plan:
    repo: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the commit the files were listed at
    format: str  # gguf | mlx | files (--file named no model)
    files: tuple[PullFile, ...]  # in download order: the file discovery keys a model on, last
    models: tuple[Planned, ...]
    cache_dir: Path

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.files if not f.cached)

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "revision": self.revision or "main", "commit": self.commit, "format": self.format,
                "files": [{"path": f.path, "sizeBytes": f.size, "cached": f.cached} for f in self.files],
                "sizeBytes": self.size_bytes, "downloadBytes": self.download_bytes,
                "cacheDir": str(self.cache_dir)}


def cache_dir(doc: dict[str, Any]) -> Path:
    """The HF cache discovery scans (the Gateway's ``discovery.hfCacheDir``, else the hub's rules). A Gateway that
    does not scan the HF cache would never register what a pull fetches: refused before anything is fetched."""
    from athanor import catalog
    from athanor.discovery.hfcache import hf_cache_dir

    discovery = catalog.gateway_spec(doc)["discovery"]
    if not discovery.get("hfCache", True):
        raise PullRefused("the Gateway's spec.discovery.hfCache is false, so nothing pulled into the Hugging Face "
                          "cache would be registered: set it to true (athanor apply) before pulling")
    return hf_cache_dir(discovery)


def plan(repo: str, *, files: tuple[str, ...] = (), revision: str | None = None, cache_dir: Path) -> Plan:
    """What a pull of `repo` fetches: one listing of its files with their sizes (``model_info``), then the
    preferred choice, or the `files` named (each shard of a split GGUF brings the others)."""
    if not _REPO_ID.match(repo):
        raise InvalidValueError(f"{repo!r} is not a Hub repo id (owner/name, e.g. bartowski/Qwen_Qwen3-8B-GGUF)")
    info = _client.model_info(repo, revision)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    tags = list(info.tags or [])
    at = f" at {revision}" if revision else ""
    if files:
        fmt, chosen, models = _explicit(repo, sizes, files, at)
    else:
        fmt, chosen, models = _preferred(repo, sizes, tags, info.library_name, at)
    ordered = sorted(chosen, key=lambda path: (_rank(path, fmt, models), path))
    blobs = _blob_ids(info)
    pulled = tuple(PullFile(p, sizes[p], _cached(repo, p, info.sha, blobs.get(p), cache_dir), blobs.get(p))
                   for p in ordered)
    return Plan(repo, revision, info.sha, fmt, pulled, tuple(models), cache_dir)


def _preferred(repo: str, sizes: dict[str, int], tags: list[str], library: str | None,
               at: str) -> tuple[str, list[str], list[Planned]]:
    ggufs = [(p, s) for p, s in sizes.items() if p.lower().endswith(".gguf")]
    if any(not is_projector(p) for p, _ in ggufs):
        choice = choose_gguf(ggufs)
        if choice.weights is None:
            raise NotFoundError(f"{repo}{at}: every GGUF in it is a split with shards missing; nothing to pull")
        projector = choice.projector
        files = [*choice.weights.files, *(projector.files if projector else ())]
        return "gguf", files, [_gguf_model(repo, choice.weights, projector.size_bytes if projector else 0)]
    if ("mlx" in tags or library == "mlx") and any(p.endswith(".safetensors") for p in sizes):
        weights = choose_safetensors(sizes.items(), mlx_quant(repo, None, tags))
        assert weights is not None
        support = [p for p in sizes if not p.endswith(".safetensors")
                   and any(fnmatch(p, pattern) for pattern in MLX_SUPPORT_PATTERNS)]
        return "mlx", [*weights.files, *support], [_mlx_model(repo, weights)]
    kind = "a transformers checkpoint" if any(p.endswith(".safetensors") for p in sizes) else "no model weights"
    raise NotFoundError(f"{repo}{at} has no GGUF or MLX weights athanor can register ({kind}): "
                        f"'athanor search {repo}' lists its GGUF and MLX conversions")


def _explicit(repo: str, sizes: dict[str, int], named: tuple[str, ...],
              at: str) -> tuple[str, list[str], list[Planned]]:
    """The files named, each shard of a split GGUF with its siblings; the models among them."""
    candidates = choose_gguf([(p, s) for p, s in sizes.items() if p.lower().endswith(".gguf")]).candidates
    chosen: dict[str, None] = {}
    groups: dict[tuple[str, ...], Choice] = {}
    for name in named:
        name = name.strip("/")
        if name not in sizes:
            listed = sorted(p for p in sizes if p.lower().endswith((".gguf", ".safetensors")))
            shown = ", ".join(listed[:8]) + (f" and {len(listed) - 8} more" if len(listed) > 8 else "")
            raise NotFoundError(f"{repo}{at} has no file {name!r}" + (f" (its weights: {shown})" if shown else ""))
        if name.lower().endswith(".gguf") and not is_projector(name):
            group = next((c for c in candidates if name in c.files), None)
            if group is None:
                raise NotFoundError(f"{repo}{at}: {name} is one shard of a split whose other shards are missing")
            groups[group.files] = group
            chosen.update(dict.fromkeys(group.files))
        else:
            chosen[name] = None
    projector = sum(sizes[p] for p in chosen if p.lower().endswith(".gguf") and is_projector(p))
    models = [_gguf_model(repo, group, projector) for group in groups.values()]
    weights = choose_safetensors(((p, sizes[p]) for p in chosen), None)
    if weights is not None and not groups:
        models.append(_mlx_model(repo, weights))
    fmt = "gguf" if groups else "mlx" if weights is not None else "files"
    return fmt, list(chosen), models


def _gguf_model(repo: str, weights: Choice, projector_bytes: int) -> Planned:
    from athanor.discovery.artifacts import source_key

    return Planned(source_key({"hf": {"repo": repo, "file": weights.files[0]}}), "llama-server", weights.files,
                   weights.size_bytes, projector_bytes, weights.quant)


def _mlx_model(repo: str, weights: Choice) -> Planned:
    from athanor.discovery.artifacts import source_key

    return Planned(source_key({"hf": {"repo": repo}}), "mlx-lm", weights.files, weights.size_bytes, 0, weights.quant)


def _rank(path: str, fmt: str, models: list[Planned]) -> int:
    """0: fetched first (projectors, tokenizers, later shards); 1: the file discovery keys a model on, last."""
    if fmt == "gguf":
        return 1 if any(path == m.files[0] for m in models) else 0
    return 1 if path == "config.json" else 0


def _blob_ids(info: Any) -> dict[str, str]:
    """The blob name each file has in the cache: its sha256 for LFS files, its git blob id otherwise (the ETag
    huggingface_hub stores it under)."""
    blobs = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        blob = getattr(lfs, "sha256", None) if lfs is not None else getattr(s, "blob_id", None)
        if blob:
            blobs[s.rfilename] = blob
    return blobs


def _cached(repo: str, path: str, commit: str, blob: str | None, cache: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    if isinstance(try_to_load_from_cache(repo, path, cache_dir=cache, revision=commit), str):
        return True
    return blob is not None and (cache / repo_folder_name(repo_id=repo, repo_type="model") / "blobs" / blob).is_file()


# ---------------------------------------------------------------------------------------------- refusals


def check_fit(plan: Plan, *, force: bool = False, memory: Memory | None = None) -> list[FitNote]:
    """How each model would fit; ``PullRefused`` for one that cannot fit this machine, unless `force` (or its
    files are all in the cache already): then the refusal is a warning. Reads the model's shape (the GGUF head
    or config.json, as ``athanor fit`` does) only when the weights alone leave room."""
    from athanor import fit
    from athanor.runtimes.presets import runtime_defaults
    from athanor.views import human_bytes as size

    if not plan.models:
        return []
    memory = memory or fit.machine_memory()
    reserve = fit.headroom(memory.total)
    usable = memory.total - reserve
    machine = f"this machine can give a model {size(usable)} ({size(memory.total)} total, {size(reserve)} kept for " \
              "the system)"
    notes: list[FitNote] = []
    row: Row | None = None
    for model in plan.models:
        what = _describe(plan, model)
        problem = None
        lower = model.weights_bytes + model.projector_bytes
        if lower > usable:
            problem = (f"{what} cannot fit this machine: its weights alone are {size(lower)}, but {machine}")
        else:
            row = row or _row(plan)
            meta = row.meta if row is not None else {}
            context = runtime_defaults(model.runtime, row.context_length if row else None).get("ctxSize", 0)

            def at(tokens: int, model: Planned = model, meta: dict[str, Any] = meta) -> Any:
                return fit.estimate_meta(meta, weights_bytes=model.weights_bytes, runtime=model.runtime,
                                         context=tokens, projector_bytes=model.projector_bytes)

            smallest, default = at(MIN_CONTEXT), at(context)
            if smallest.total > usable:
                problem = (f"{what} cannot fit this machine: it needs about {size(smallest.total)} even at a "
                           f"{MIN_CONTEXT}-token context ({_parts(smallest)}), but {machine}")
            elif default.total > usable:
                notes.append(FitNote(f"{what} needs about {size(default.total)} at its default context of "
                                     f"{default.context} tokens, more than {machine}: give it a smaller one "
                                     "(athanor preset set NAME ctxSize=...) before starting it", warning=True))
            else:
                verdict = fit.band(default.total, memory)
                risky = verdict == "risky"
                notes.append(FitNote(f"{what}: {verdict} here, about {size(default.total)} at {default.context} "
                                     f"tokens ({_parts(default)}); {size(memory.available)} available now"
                                     + ("; more than is free now: stop other models or programs before starting it"
                                        if risky else ""), warning=risky))
        if problem is None:
            continue
        if force:
            notes.append(FitNote(f"{problem}; pulling it anyway (--force)", warning=True))
        elif not plan.download_bytes:  # nothing left to download: registering it costs nothing
            notes.append(FitNote(f"{problem}; its files are in the cache already, so it is registered (the gateway "
                                 "will refuse to start it as it is)", warning=True))
        else:
            raise PullRefused(f"{problem}; nothing was downloaded ('athanor pull --force' pulls it anyway)")
    if row is not None and row.shape_problem:
        notes.insert(0, FitNote(f"{row.shape_problem}: its KV cache is not counted", warning=True))
    return notes


@dataclass(frozen=True)
class FitNote:
    text: str
    warning: bool  # it will not start as it is, or not now


def _row(plan: Plan) -> Row | None:
    """The repo as search shows it, for its shape (``meta``); None when it cannot be read (the estimate then
    counts no KV cache). A rate limit still fails: the download would meet it too."""
    from athanor.errors import HubRateLimited
    from athanor.hub import repo_row

    try:
        return repo_row(plan.repo, revision=plan.commit)
    except HubRateLimited:
        raise
    except AthanorError:
        return None


def _describe(plan: Plan, model: Planned) -> str:
    quant = f" {model.quant}" if model.quant else ""
    files = model.files[0] if len(model.files) == 1 else f"{len(model.files)} files"
    return f"{plan.repo}{quant} ({files})"


def _parts(estimate: Any) -> str:
    from athanor.views import human_bytes as size

    parts = [f"weights {size(estimate.weights)}", f"KV cache {size(estimate.kv_cache)}"]
    if estimate.projector:
        parts.append(f"projector {size(estimate.projector)}")
    parts.append(f"runtime {size(estimate.overhead)}")
    return ", ".join(parts)


def check_disk(plan: Plan) -> None:
    """``PullRefused`` when the disk holding the cache has less room than the files still to fetch; also when a
    file is too large for a plain HTTP download and huggingface_hub has no Xet support to fetch it with."""
    import importlib.util

    from huggingface_hub import constants

    from athanor.views import human_bytes as size

    need = plan.download_bytes
    where = plan.cache_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise PullRefused(f"not enough disk space to pull {plan.repo}: {size(need)} to download, {size(free)} free "
                          f"at {where}; nothing was downloaded")
    too_large = [f for f in plan.files if not f.cached and f.size > constants.MAX_HTTP_DOWNLOAD_SIZE]
    xet = importlib.util.find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET
    if too_large and not xet:
        raise PullRefused(f"{too_large[0].path} is {size(too_large[0].size)}: huggingface_hub fetches files over "
                          f"{size(constants.MAX_HTTP_DOWNLOAD_SIZE)} only through Xet storage; install hf_xet "
                          "(pip install hf_xet) and pull again")


# ---------------------------------------------------------------------------------------------- download


class Progress(Protocol):
    """Where a download reports: once at the start, per file, per chunk, and at the end."""

    def begin(self, plan: Plan) -> None: ...
    def file(self, index: int, pulled: PullFile) -> None: ...
    def advance(self, n: int) -> None: ...  # bytes; negative when a resumed request had to start over
    def note(self, message: str) -> None: ...
    def end(self, completed: bool) -> None: ...


def download(plan: Plan, progress: Progress) -> list[Path]:
    """Every file of the plan into the cache, one at a time, in the plan's order; the paths in the snapshot.
    KeyboardInterrupt passes through (huggingface_hub removes the file it was writing); errors are one line."""
    state = _State(progress)
    paths: list[Path] = []
    progress.begin(plan)
    try:
        _download_all(plan, state, paths)
    except BaseException:
        progress.end(False)
        raise
    progress.end(True)
    return paths


def _download_all(plan: Plan, state: _State, paths: list[Path]) -> None:
    from huggingface_hub import hf_hub_download

    from athanor import __version__

    progress = state.progress
    with _hub_log(state), _client.hub_errors(plan.repo):
        for index, pulled in enumerate(plan.files):
            progress.file(index, pulled)
            state.file_bytes = 0
            try:
                path = hf_hub_download(plan.repo, pulled.path, revision=plan.revision, cache_dir=plan.cache_dir,
                                       endpoint=_client.endpoint(), token=_client.token(), library_name="athanor",
                                       library_version=__version__, tqdm_class=state.bar_class())
            except (ValueError, OSError) as exc:
                raise _download_error(plan, pulled, exc) from exc
            commit = _snapshot_commit(Path(path), pulled.path)
            if commit != plan.commit:
                raise HubError(f"{plan.repo} changed while it was pulled (commit {plan.commit[:12]}, now "
                               f"{commit[:12]}): pull it again")
            paths.append(Path(path))


@dataclass
class _State:
    """The progress of the file being fetched, shared by huggingface_hub's progress bars and its log."""

    progress: Progress
    file_bytes: int = 0

    def bar_class(self) -> type:
        state = self

        class FileBar:
            """What huggingface_hub's download loop needs of a tqdm: created per file (and kept across its
            resumed requests), entered, updated by the bytes written."""

            def __init__(self, *args: Any, initial: int = 0, **kwargs: Any) -> None:
                self.n = 0
                if initial:
                    self.update(initial)

            def update(self, n: float | None = 1) -> None:
                n = int(n or 0)
                self.n += n
                state.file_bytes += n
                state.progress.advance(n)

            def __enter__(self) -> Self:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def close(self) -> None:
                pass

            def set_description(self, *args: Any, **kwargs: Any) -> None:
                pass

            def refresh(self, *args: Any, **kwargs: Any) -> None:
                pass

        return FileBar


class _HubLogHandler(logging.Handler):
    """huggingface_hub's warnings during a pull (a dropped connection it resumes) as progress notes, one line."""

    def __init__(self, state: _State):
        super().__init__(logging.WARNING)
        self.state = state

    def emit(self, record: logging.LogRecord) -> None:
        from athanor.views import human_bytes

        message = record.getMessage()
        if "Trying to resume download" in message:
            self.state.progress.note(f"the connection dropped; resuming after {human_bytes(self.state.file_bytes)}")
        elif message.strip():
            self.state.progress.note(printable(message.strip().splitlines()[0]))


@contextlib.contextmanager
def _hub_log(state: _State) -> Iterator[None]:
    """huggingface_hub's log (its own stderr handler included) goes to the progress while files download."""
    logger = logging.getLogger("huggingface_hub")
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers = [_HubLogHandler(state)]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _download_error(plan: Plan, pulled: PullFile, exc: Exception) -> AthanorError:
    """One line for what hf_hub_download raised: the Hub's answer (or the network failure behind a "cannot
    locate the file"), a write that failed, or huggingface_hub's own refusal (a file over its plain-HTTP limit)."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, Exception):
            translated = _client.translate(candidate, plan.repo)
            if translated is not None:
                return translated
    if isinstance(exc, OSError) and exc.errno is not None:
        return AthanorError(f"cannot write {pulled.path} of {plan.repo} into {plan.cache_dir}: {exc.strerror or exc}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HubError(f"{plan.repo}: {pulled.path}: {printable(first)}")


def _snapshot_commit(path: Path, repo_path: str) -> str:
    """``.../snapshots/<commit>/<repo_path>`` -> commit."""
    return path.parents[len(PurePosixPath(repo_path).parts) - 1].name


# ---------------------------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registered:
    planned: Planned
    name: str | None  # None: discovery registered nothing for it (``problem`` says why)
    action: str | None = None  # discovered (new), or None when it was registered already
    runtime: str | None = None
    problem: str | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Registration:
    models: list[Registered]
    warnings: list[str] = field(default_factory=list)


def register(plan: Plan, store: Store) -> Registration:
    """Call only once every file is complete. Runs the daemon's discovery (``registry.scan``) and finds the models
    the pull was for by their source. A source the user had deleted (``ignoredSources``) is considered again:
    pulling it is asking for it. Ctrl-C waits until the store transaction is over."""
    from athanor import catalog, registry

    keys = [m.key for m in plan.models]
    with _interrupts_deferred():
        if keys and any(k in store.models.load()["ignoredSources"] for k in keys):
            with store.models.edit() as doc:
                doc["ignoredSources"] = [k for k in doc["ignoredSources"] if k not in keys]
        result = registry.scan(store)
    doc = store.models.load()
    discovered = {c.name for c in result.changes if c.action == "discovered"}
    models = []
    for planned in plan.models:
        names = catalog.find_by_source(doc, planned.key)
        if not names:
            models.append(Registered(planned, None, problem=_why_not(plan, planned)))
            continue
        name = names[0]
        obj = doc["models"][name]
        notes = []
        served = (obj.get("artifact") or {}).get("revision")
        if served and served != plan.commit:
            notes.append(f"model/{name} serves commit {served[:12]} of {plan.repo} (the cache's "
                         f"{'main' if not plan.revision else 'newest'} revision), not the pulled "
                         f"{plan.revision or 'main'} ({plan.commit[:12]}): to serve that one, apply a Model whose "
                         f"source names it (hf: {{repo: {plan.repo}, revision: {plan.commit}}})")
        models.append(Registered(planned, name, "discovered" if name in discovered else None, obj["spec"]["runtime"],
                                 notes=tuple(notes)))
    return Registration(models, list(result.warnings))


def _why_not(plan: Plan, planned: Planned) -> str:
    if planned.runtime == "mlx-lm":
        return (f"the files of {plan.repo} are in the cache, but discovery registered no model from them: it takes "
                "a snapshot with config.json and safetensors weights, from a repo whose name says mlx or whose "
                "config.json has a quantization; apply a Model with source hf: {repo: " + plan.repo + "} to serve it")
    return (f"{planned.files[0]} of {plan.repo} is in the cache, but discovery registered no model from it (see "
            "the warnings of 'athanor scan')")


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT waits until the block is over (then the work it guarded has completed, and the pull reports it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


__all__ = [
    "MIN_CONTEXT",
    "FitNote",
    "Plan",
    "Planned",
    "Progress",
    "PullFile",
    "PullRefused",
    "Registered",
    "Registration",
    "cache_dir",
    "check_disk",
    "check_fit",
    "download",
    "plan",
    "register",
]
