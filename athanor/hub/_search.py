"""Search, trending and conversions: one listing request, then each repo's files (sizes) and model shape.

The Hub lists repos without file sizes (siblings carry names only), so every listed repo costs one more request,
``/api/models/{repo}?blobs=true``, and one Range read of its shape (the GGUF head, or config.json) for the memory
estimate; they run a few at a time. Gated repos are listed (the Hub describes them openly) and marked; their files
are not read.

Sorting: downloads, likes, trending and modified are the Hub's own order, re-applied after the details arrive;
size and fit take the most downloaded matches and order them here (fit: comfortable, tight, risky, then
downloads).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from athanor.errors import AthanorError, HubRateLimited, InvalidValueError
from athanor.hub import _client
from athanor.hub._files import (
    Choice,
    choose_gguf,
    choose_safetensors,
    is_projector,
    mlx_quant,
)
from athanor.hub._header import config as read_config
from athanor.hub._header import gguf_head

FORMATS = ("any", "gguf", "mlx")
SORTS = ("downloads", "likes", "trending", "modified", "size", "fit")
BANDS = ("comfortable", "tight", "risky")
MAX_LIMIT = 1000
_HUB_SORT = {"downloads": "downloads", "likes": "likes", "trending": "trendingScore", "modified": "lastModified",
             "size": "downloads", "fit": "downloads"}
_EXPAND = ["author", "downloads", "likes", "trendingScore", "lastModified", "tags", "library_name", "pipeline_tag",
           "gated", "gguf", "safetensors", "siblings"]
_TEXT_PIPELINES = ("text-generation", "image-text-to-text")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WORKERS = 8


@dataclass(frozen=True)
class Row:
    """One repo as athanor would pull it: the chosen weights, their size, and how they fit this machine."""

    repo: str
    format: str  # gguf | mlx | safetensors (a transformers checkpoint mlx-lm loads)
    runtime: str  # llama-server | mlx-lm
    size_bytes: int | None  # the chosen files: every shard of a GGUF quant; an MLX repo's weights
    quant: str | None
    files: tuple[str, ...]
    projector: str | None = None  # a GGUF's mmproj file, counted in the estimate
    projector_bytes: int = 0
    fit: str | None = None  # comfortable | tight | risky (athanor.fit.band)
    estimate_bytes: int | None = None
    downloads: int = 0
    likes: int = 0
    trending_score: float = 0
    last_modified: str | None = None
    gated: bool = False
    parameters: int | None = None
    architecture: str | None = None
    context_length: int | None = None
    revision: str | None = None  # the commit the files were listed at
    quants: tuple[str, ...] = field(default=(), repr=False)  # every complete GGUF quant, in preference order
    # What the estimate was made from (GGUF head keys or config.json, plus the Hub's facts): give it to
    # athanor.fit.estimate_meta with size_bytes, runtime and projector_bytes for another context.
    meta: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Why the shape is unknown although the repo was readable (a malformed or implausible GGUF head or config.json,
    # a file the Hub would not send): one line naming the repo and file. None when read, or not tried (gated).
    shape_problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo, "format": self.format, "runtime": self.runtime, "sizeBytes": self.size_bytes,
            "quant": self.quant, "files": list(self.files), "projector": self.projector,
            "projectorBytes": self.projector_bytes, "fit": self.fit, "estimateBytes": self.estimate_bytes,
            "downloads": self.downloads, "likes": self.likes, "trendingScore": self.trending_score,
            "lastModified": self.last_modified, "gated": self.gated, "parameters": self.parameters,
            "architecture": self.architecture, "contextLength": self.context_length, "revision": self.revision,
            "quants": list(self.quants), "shapeProblem": self.shape_problem,
        }


def search(query: str | None = None, *, fmt: str = "any", author: str | None = None, sort: str = "downloads",
           limit: int = 20) -> list[Row]:
    """Repos matching `query` (a substring of the repo id) in the format asked for. A query that is a repo id
    (``org/name``) also finds the repos made from it (tagged ``base_model:org/name``): its conversions."""
    _check(fmt, sort, limit)
    params = _params(fmt, author, sort)
    if query:
        params["search"] = query
    listed = _client.list_models(params, limit)
    if query and _REPO_ID.match(query):
        derived = {**_params(fmt, author, sort), "filter": [*_filters(fmt), f"base_model:{query}"]}
        seen = {m.id for m in listed}
        listed += [m for m in _client.list_models(derived, limit) if m.id not in seen]
    return _rank(_rows(listed, fmt), sort)[:limit]


def trending(limit: int = 20, *, fmt: str = "any") -> list[Row]:
    """The Hub's trending repos (trendingScore), as search rows."""
    return search(None, fmt=fmt, sort="trending", limit=limit)


def conversions(repo: str, *, fmt: str = "mlx", sort: str = "downloads", limit: int = 20) -> list[Row]:
    """Repos made from `repo` in format `fmt` (mlx-community's and anyone's): tagged ``base_model:<repo>``."""
    _check(fmt, sort, limit)
    params = {**_params(fmt, None, sort), "filter": [*_filters(fmt), f"base_model:{repo}"]}
    return _rank(_rows(_client.list_models(params, limit), fmt), sort)[:limit]


def repo_row(repo: str, *, revision: str | None = None, fmt: str = "any") -> Row:
    """One repo's row, as search would show it (NotFoundError when there is none, or no weights athanor serves)."""
    from athanor.errors import NotFoundError

    info = _client.model_info(repo, revision)
    row = _row(info, info, fmt, _machine_memory())
    if row is None:
        raise NotFoundError(f"{repo} has no {'' if fmt == 'any' else fmt + ' '}weights athanor can serve")
    return row


# ---------------------------------------------------------------------------------------------- internals


def _check(fmt: str, sort: str, limit: int) -> None:
    if fmt not in FORMATS:
        raise InvalidValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if sort not in SORTS:
        raise InvalidValueError(f"unknown sort {sort!r} (known: {', '.join(SORTS)})")
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")


def _filters(fmt: str) -> list[str]:
    return [] if fmt == "any" else [fmt]


def _params(fmt: str, author: str | None, sort: str) -> dict[str, Any]:
    params: dict[str, Any] = {"sort": _HUB_SORT[sort], "expand": list(_EXPAND)}
    if filters := _filters(fmt):
        params["filter"] = filters
    if author:
        params["author"] = author
    return params


def _rows(listed: list[Any], fmt: str) -> list[Row]:
    """Each listed repo's details, a few at a time, in listing order; repos without servable weights dropped."""
    if not listed:
        return []
    memory = _machine_memory()

    def one(model: Any) -> Row | None:
        return _row(model, _client.model_info(model.id), fmt, memory)

    with ThreadPoolExecutor(max_workers=min(_WORKERS, len(listed)), thread_name_prefix="athanor-hub") as pool:
        rows = list(pool.map(one, listed))
    return [r for r in rows if r is not None]


def _row(listed: Any, info: Any, fmt: str, memory: Any) -> Row | None:
    files = [(s.rfilename, s.size) for s in info.siblings or []]
    tags = list(info.tags or listed.tags or [])
    library = info.library_name or listed.library_name
    pipeline = info.pipeline_tag or listed.pipeline_tag
    has_gguf = any(p.lower().endswith(".gguf") and not is_projector(p) for p, _ in files)
    is_mlx = "mlx" in tags or library == "mlx"
    has_safetensors = any(p.endswith(".safetensors") for p, _ in files)
    if fmt == "gguf" or (fmt == "any" and has_gguf):
        kind = "gguf" if has_gguf else None
    elif fmt == "mlx" or is_mlx:
        kind = "mlx" if is_mlx and has_safetensors else None
    else:
        kind = "safetensors" if has_safetensors and pipeline in _TEXT_PIPELINES else None
    if kind is None:
        return None

    gguf = info.gguf or listed.gguf or {}
    gated = bool(info.gated if info.gated is not None else listed.gated)
    projector: Choice | None = None
    quants: tuple[str, ...] = ()
    if kind == "gguf":
        chosen = choose_gguf(files)
        weights = chosen.weights
        projector = chosen.projector
        quants = tuple(c.quant or "?" for c in chosen.candidates)
        runtime = "llama-server"
        parameters = gguf.get("total")
        shape, problem = ({}, None) if gated or weights is None else _shape(info, weights.files[0])
    else:
        shape, problem = ({}, None) if gated else _shape(info, "config.json")
        config = shape or (info.config if isinstance(info.config, dict) else None)
        quant = mlx_quant(info.id, config, tags) if kind == "mlx" else _dtype(info.safetensors)
        weights = choose_safetensors(files, quant)
        runtime = "mlx-lm"
        parameters = info.safetensors.total if kind == "safetensors" and info.safetensors else None
    if weights is None:
        return None

    meta = {**shape, **{k: v for k, v in {
        "architecture": shape.get("general.architecture") or gguf.get("architecture"),
        "contextLength": gguf.get("context_length"), "parameters": parameters, "quantization": weights.quant,
    }.items() if v is not None}}
    fit, estimate = _fit(meta, weights.size_bytes, runtime, projector.size_bytes if projector else 0, memory)
    modified = info.last_modified or listed.last_modified
    return Row(
        repo=info.id, format=kind, runtime=runtime, size_bytes=weights.size_bytes or None, quant=weights.quant,
        files=weights.files, projector=projector.files[0] if projector else None,
        projector_bytes=projector.size_bytes if projector else 0, fit=fit, estimate_bytes=estimate,
        downloads=listed.downloads or info.downloads or 0, likes=listed.likes or info.likes or 0,
        trending_score=listed.trending_score or 0,
        last_modified=modified.isoformat().replace("+00:00", "Z") if modified else None, gated=gated,
        parameters=parameters, architecture=meta.get("architecture") or _config_arch(shape),
        context_length=_context_length(meta), revision=info.sha, quants=quants, meta=meta, shape_problem=problem,
    )


def _shape(info: Any, path: str) -> tuple[dict[str, Any], str | None]:
    """What the KV cache is made of: the keys at the head of a GGUF file, or config.json (``_header``, bounded).
    ({}, why) when they cannot be read or make no sense: the row's shape is then unknown. A rate limit still fails
    the search: the next request would meet it too."""
    revision = info.sha or "main"
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    try:
        if path.lower().endswith(".gguf"):
            return gguf_head(info.id, path, revision, sizes.get(path)), None
        if path not in sizes:
            return {}, None
        return read_config(info.id, path, revision), None
    except HubRateLimited:
        raise
    except AthanorError as exc:
        return {}, str(exc)


def _machine_memory() -> Any:
    """This machine's memory, read once per search."""
    from athanor.fit import machine_memory

    return machine_memory()


def _fit(meta: dict[str, Any], weights: int, runtime: str, projector: int, memory: Any) -> tuple[str, int]:
    """The band and total estimate at the context athanor would start the model with (llama-server: the model's
    window up to 32768 tokens; MLX: the window as the cache grows, capped the same way)."""
    from athanor.fit import band, estimate_meta
    from athanor.runtimes.presets import runtime_defaults

    context = runtime_defaults(runtime, _context_length(meta)).get("ctxSize", 0)
    estimate = estimate_meta(meta, weights_bytes=weights, runtime=runtime, context=context,
                             projector_bytes=projector)
    return band(estimate.total, memory), estimate.total


def _context_length(meta: dict[str, Any]) -> int | None:
    arch = meta.get("architecture")
    for key in (f"{arch}.context_length", "contextLength", "max_position_embeddings"):
        value = meta.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = meta.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("max_position_embeddings"), int):
        return text["max_position_embeddings"]
    return None


def _config_arch(config: dict[str, Any]) -> str | None:
    value = config.get("model_type")
    return value if isinstance(value, str) else None


def _dtype(safetensors: Any) -> str | None:
    """A plain checkpoint's dominant dtype (BF16, F16, F32) from the Hub's parameter counts."""
    parameters = getattr(safetensors, "parameters", None) or {}
    return max(parameters, key=parameters.get) if parameters else None


_BAND_ORDER = {name: i for i, name in enumerate(BANDS)}
_SORT_KEYS: dict[str, Callable[[Row], Any]] = {
    "downloads": lambda r: -r.downloads,
    "likes": lambda r: (-r.likes, -r.downloads),
    "trending": lambda r: (-r.trending_score, -r.downloads),
    "modified": lambda r: "" if r.last_modified is None else r.last_modified,
    "size": lambda r: (r.size_bytes is None, r.size_bytes or 0, -r.downloads),
    "fit": lambda r: (_BAND_ORDER.get(r.fit or "", len(BANDS)), -r.downloads),
}


def _rank(rows: Iterable[Row], sort: str) -> list[Row]:
    rows = list(rows)
    if sort == "modified":
        return sorted(rows, key=_SORT_KEYS[sort], reverse=True)
    return sorted(rows, key=_SORT_KEYS[sort])
