"""fit: will a model fit this machine? Its memory estimate part by part, this machine's memory, a band, a context.

The command works on a ``_Subject``: what is estimated, however it was found. Today that is a registered model;
a Hub repo before download becomes one more way to build a subject (``athanor.fit.estimate_meta`` over the
repo's metadata, once ``athanor.hub`` offers it), and the printing does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from athanor.cli.common import emit, store
from athanor.cli.get_cmds import _complete_model

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
    window: int | None  # the model's own window


@click.command("fit")
@click.argument("model", metavar="MODEL", shell_complete=_complete_model)
@click.option("--ctx", "context", type=click.IntRange(min=1), metavar="N",
              help="Count the KV cache at N tokens instead of the model's effective context.")
@click.option("-o", "--output", type=click.Choice(("json", "yaml")), default=None,
              help="Output format (default: a breakdown).")
def fit_cmd(model: str, context: int | None, output: str | None) -> None:
    """Estimate the memory MODEL needs here and whether this machine has it.

    Prints the weights, the KV cache at the effective context (the recipe's and preset's ctxSize and cache
    types; --ctx N counts N tokens instead), the vision projector, the draft model and the runtime's overhead;
    then this machine's memory, the band (comfortable, tight or risky against available memory less what the
    OS keeps) and the largest context that stays comfortable. MODEL is a registered model's name or alias.
    """
    from athanor import fit

    memory = fit.machine_memory()
    subject = _registered(model, context, memory)
    if output:
        emit(_as_json(subject, memory), output)
    else:
        click.echo(_render(subject, memory))


def _registered(name: str, context: int | None, memory: Memory) -> _Subject:
    from athanor import actions, fit, views
    from athanor.errors import NotFoundError

    doc = store().models.load()
    try:
        model_name = actions.resolve_name(doc, name)
    except NotFoundError:
        if _looks_like_repo(name):
            raise NotFoundError(f"{name!r} is not a registered model, and Hub repos are not estimated before "
                                "download yet: register it first (see 'athanor get models')") from None
        raise
    obj = doc["models"][model_name]
    spec = obj["spec"]
    if not obj.get("artifact"):
        raise NotFoundError(f"model {model_name!r}: weights not found: {views.source_text(spec['source'])} "
                            "(nothing to estimate; see 'athanor describe model')")
    estimate = fit.estimate_model(doc, obj, context=context)
    return _Subject(
        name=model_name,
        runtime=spec["runtime"],
        source=views.source_text(spec["source"]),
        estimate=estimate,
        context_from=_context_from(actions.effective_for(doc, obj).get("ctxSize"), context),
        recommended=fit.recommended_context(doc, obj, memory),
        window=(obj["artifact"].get("metadata") or {}).get("contextLength"),
    )


def _context_from(effective: Any, asked: int | None) -> str:
    if asked is not None:
        return "--ctx"
    if effective is None:
        return "MLX grows its cache with use: the model's window, at most 32768"
    source = _SOURCES.get(effective.source) or effective.source.replace("recipe:", "recipe ")
    if not effective.value:
        return f"ctxSize 0 from {source}: the model's own window"
    return f"ctxSize from {source}"


_SOURCES = {"default": "athanor's default, the model's window up to 32768", "model": "the model's preset"}


def _looks_like_repo(name: str) -> bool:
    owner, slash, repo = name.partition("/")
    return bool(slash and owner and repo and "/" not in repo and not name.startswith((".", "~")))


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
    left = human_bytes(budget) if budget > 0 else "nothing"
    rows = [
        ("Model", f"{subject.name} ({subject.runtime}, {subject.source})"),
        ("Context", f"{est.context} tokens ({subject.context_from})"),
        ("Weights", human_bytes(est.weights)),
        ("KV cache", human_bytes(est.kv_cache) + (f" at {est.context} tokens" if est.kv_cache else "")),
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
