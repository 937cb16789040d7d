"""fit: will a model fit this machine? Its memory estimate part by part, this machine's memory, a band, a context.

The command works on a ``_Subject``: what is estimated, however it was found. A registered model is estimated as
it would run (``estimate_model``: its preset, its files); a Hub repo before download from the row ``athanor
search`` would show for it (``hub.repo_row``: the files ``pull`` would choose, their listed sizes, the shape read
from the GGUF head or config.json) through ``estimate_meta``. The printing is the same for both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from athanor.cli.common import emit, store
from athanor.cli.get_cmds import _complete_model
from athanor.errors import NotFoundError

if TYPE_CHECKING:
    from athanor.fit import Estimate, Memory


@dataclass(frozen=True)
class _Subject:
    name: str
    runtime: str
    source: str  # where its weights are (a path, a repo)
    estimate: Estimate
    context_from: str  # why the KV cache is counted at estimate.context
    recommended: int | None  # the largest comfortable (else tight) context; None: none, or not known
    recommended_band: str | None  # the band at that context
    window: int | None  # the model's own window
    shape_known: bool  # the metadata says what the KV cache is made of (else it counts as nothing)


@click.command("fit")
@click.argument("model", metavar="MODEL|REPO", shell_complete=_complete_model)
@click.option("--ctx", "context", type=click.IntRange(min=1), metavar="N",
              help="Count the KV cache at N tokens instead of the model's effective context.")
@click.option("-o", "--output", type=click.Choice(("json", "yaml")), default=None,
              help="Output format (default: a breakdown).")
def fit_cmd(model: str, context: int | None, output: str | None) -> None:
    """Estimate the memory a model needs here and whether this machine has it.

    Prints the weights, the KV cache at the effective context (the recipe's and preset's ctxSize and cache
    types; --ctx N counts N tokens instead), the vision projector, the draft model and the runtime's overhead;
    then this machine's memory, the band (comfortable, tight or risky against available memory less what the
    OS keeps) and the largest context that stays comfortable. MODEL is a registered model's name or alias;
    REPO (org/name) a Hugging Face repo, estimated before any download from the files 'athanor pull' would
    choose and the shape in their first bytes.
    """
    from athanor import catalog, fit

    memory = fit.machine_memory()
    doc = store().models.load()
    try:
        name = catalog.resolve_name(doc, model)
    except NotFoundError:
        if not _looks_like_repo(model):
            raise
        subject = _repo(model, context, memory)
    else:
        subject = _registered(doc, name, context, memory)
    if output:
        emit(_as_json(subject, memory), output)
    else:
        click.echo(_render(subject, memory))


def _registered(doc: dict[str, Any], model_name: str, context: int | None, memory: Memory) -> _Subject:
    from athanor import fit, views
    from athanor.runtimes.resolve import effective_for

    obj = doc["models"][model_name]
    spec = obj["spec"]
    if not obj.get("artifact"):
        raise NotFoundError(f"model {model_name!r}: weights not found: {views.source_text(spec['source'])} "
                            "(nothing to estimate; see 'athanor describe model')")
    estimate = fit.estimate_model(doc, obj, context=context)
    recommended = fit.recommended_context(doc, obj, memory)
    meta = obj["artifact"].get("metadata") or {}
    return _Subject(
        name=model_name,
        runtime=spec["runtime"],
        source=views.source_text(spec["source"]),
        estimate=estimate,
        context_from=_context_from(effective_for(doc, obj).get("ctxSize"), context),
        recommended=recommended,
        recommended_band=_band_at(recommended, lambda c: fit.estimate_model(doc, obj, context=c), memory),
        window=meta.get("contextLength"),
        shape_known=_shape_known(meta),
    )


def _repo(repo: str, context: int | None, memory: Memory) -> _Subject:
    """A Hub repo as ``athanor pull`` would fetch it, estimated at the context athanor would start it with."""
    from athanor import fit, hub
    from athanor.fit._budget import largest_context
    from athanor.runtimes.presets import runtime_defaults

    row = hub.repo_row(repo)
    default = runtime_defaults(row.runtime, row.context_length).get("ctxSize", 0)

    def estimate_at(tokens: int) -> Estimate:
        return fit.estimate_meta(row.meta, weights_bytes=row.size_bytes or 0, runtime=row.runtime, context=tokens,
                                 projector_bytes=row.projector_bytes)

    estimate = estimate_at(context or default)
    recommended = largest_context(row.context_length or estimate.context, lambda c: estimate_at(c).total, memory)
    files = ", ".join(row.files[:2]) + (f" and {len(row.files) - 2} more" if len(row.files) > 2 else "")
    return _Subject(
        name=row.repo,
        runtime=row.runtime,
        source=f"Hub: {files}, not downloaded",
        estimate=estimate,
        context_from="--ctx" if context else _SOURCES["default"] if row.runtime == "llama-server" else _MLX_CONTEXT,
        recommended=recommended,
        recommended_band=_band_at(recommended, estimate_at, memory),
        window=row.context_length,
        shape_known=_shape_known(row.meta),
    )


def _band_at(context: int | None, estimate_at: Callable[[int], Estimate], memory: Memory) -> str | None:
    from athanor.fit import band

    return band(estimate_at(context).total, memory) if context is not None else None


def _shape_known(meta: dict[str, Any]) -> bool:
    from athanor.fit._shape import read_shape

    shape = read_shape(meta)
    return bool(shape.layers) or shape.encoder


def _context_from(effective: Any, asked: int | None) -> str:
    if asked is not None:
        return "--ctx"
    if effective is None:
        return _MLX_CONTEXT
    source = _SOURCES.get(effective.source) or effective.source.replace("recipe:", "recipe ")
    if not effective.value:
        return f"ctxSize 0 from {source}: the model's own window"
    return f"ctxSize from {source}"


_MLX_CONTEXT = "MLX grows its cache with use: the model's window, at most 32768"
_SOURCES = {"default": "athanor's default, the model's window up to 32768", "model": "the model's preset"}


def _looks_like_repo(name: str) -> bool:
    """``org/name`` as the Hub spells repo ids (a path or a model name is not one)."""
    return re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name) is not None


def _budget(memory: Memory) -> tuple[int, int]:
    from athanor.fit import headroom

    reserve = headroom(memory.total)
    return reserve, memory.available - reserve


def _as_json(subject: _Subject, memory: Memory) -> dict[str, Any]:
    from athanor.fit import band

    reserve, budget = _budget(memory)
    return {
        "model": subject.name,
        "runtime": subject.runtime,
        "source": subject.source,
        "estimate": subject.estimate.to_json(),
        "memory": {"total": memory.total, "available": memory.available, "headroom": reserve, "budget": budget},
        "band": band(subject.estimate.total, memory),
        "recommendedContext": subject.recommended,
        "recommendedBand": subject.recommended_band,
        "shapeKnown": subject.shape_known,
    }


def _render(subject: _Subject, memory: Memory) -> str:
    from athanor.fit import band
    from athanor.views import human_bytes

    est = subject.estimate
    reserve, budget = _budget(memory)
    fit = band(est.total, memory)
    if budget <= 0:
        share = "nothing is left for models"
    elif est.total * 100 < budget:
        share = "under 1% of what is left for models"
    else:
        share = f"{est.total / budget:.0%} of what is left for models"
    if subject.recommended is None:
        recommended = "none: even the smallest context is risky here"
    else:
        own = " (the model's own window)" if subject.recommended == subject.window else ""
        recommended = f"{subject.recommended} tokens{own}"
        if subject.recommended_band != "comfortable":
            recommended += f", {subject.recommended_band}: no context is comfortable here"
    if subject.shape_known:
        kv = f"{human_bytes(est.kv_cache)} at {est.context} tokens" if est.kv_cache else "none: the model keeps none"
    else:
        kv = "unknown: the metadata does not say the model's layers and heads (counted as 0)"
    left = human_bytes(budget) if budget > 0 else "nothing"
    rows = [
        ("Model", f"{subject.name} ({subject.runtime}, {subject.source})"),
        ("Context", f"{est.context} tokens ({subject.context_from})"),
        ("Weights", human_bytes(est.weights)),
        ("KV cache", kv),
        ("Projector", human_bytes(est.projector)),
        ("Draft", human_bytes(est.draft)),
        ("Overhead", human_bytes(est.overhead)),
        ("Total", human_bytes(est.total)),
        ("Memory", (f"{human_bytes(memory.total)} total, {human_bytes(memory.available)} available, "
                    f"{human_bytes(reserve)} kept for the system: {left} for models")),
        ("Fit", f"{fit} ({share})"),
        ("Best context", recommended),
    ]
    return "\n".join(f"{label + ':':<14}{value}" for label, value in rows)
