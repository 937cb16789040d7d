"""The escape hatch: ``spec.args``, flags athanor does not know, appended to a runtime's argv.

llama.cpp adds flags every week; a model's spec (and the Gateway, per runtime) may pass any of them. What stays
athanor's is what it manages: where the runtime listens and what it loads (``--host``, ``--port``, ``--model``,
``--alias``), and every flag a spec field or preset key sets. Passing one of those through ``args`` would fight
athanor's own value (the gateway would probe one port while the runtime listens on another), so it is refused
with the field to use instead. Each runtime's short spellings are listed so ``-c 4096`` is caught like
``--ctx-size 4096``. The list is data, never a shell string: each element is one argv element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from athanor.runtimes.presets import PRESET_KEYS

# Flags athanor sets from something other than a preset key -> the field that controls them.
_FIXED: dict[str, dict[str, str]] = {
    "llama-server": {
        "--host": "the Gateway's spec.listen (runtimes listen on loopback)",
        "--port": "spec.port",
        "--model": "spec.source",
        "--alias": "spec.aliases (the model's name is its alias)",
        "--mmproj": "the projector found next to the weights",
        "--embeddings": "the model's detected capabilities (embedding models get it)",
        "--reranking": "the model's detected capabilities (reranking models get it)",
        "--spec-draft-model": "spec.draft",
        "--log-verbosity": "the Gateway's privacy.runtimeLogs",
        "--slot-save-path": "the Gateway's parking (athanor park; spec.parking: false turns it off)",
    },
    "mlx-lm": {
        "--host": "the Gateway's spec.listen (runtimes listen on loopback)",
        "--port": "spec.port",
        "--model": "spec.source",
        "--log-level": "the Gateway's privacy.runtimeLogs",
    },
    "mlx-vlm": {
        "--host": "the Gateway's spec.listen (runtimes listen on loopback)",
        "--port": "spec.port",
        "--model": "spec.source",
    },
}

# Other spellings of managed flags (llama-server --help lists them in one row).
_ALIASES: dict[str, dict[str, str]] = {
    "llama-server": {
        "-m": "--model", "-a": "--alias", "-mm": "--mmproj", "--embedding": "--embeddings", "--rerank": "--reranking",
        "-md": "--spec-draft-model", "--model-draft": "--spec-draft-model", "-lv": "--log-verbosity",
        "--verbosity": "--log-verbosity", "-c": "--ctx-size", "-n": "--n-predict", "--predict": "--n-predict",
        "-b": "--batch-size", "-ub": "--ubatch-size", "-fa": "--flash-attn", "-ctk": "--cache-type-k",
        "-ctv": "--cache-type-v", "-lm": "--load-mode", "-ngl": "--n-gpu-layers", "--gpu-layers": "--n-gpu-layers",
        "-s": "--seed", "--temperature": "--temp", "-np": "--parallel", "-t": "--threads",
        "-ngld": "--spec-draft-ngl", "--gpu-layers-draft": "--spec-draft-ngl",
        "--n-gpu-layers-draft": "--spec-draft-ngl", "--draft-p-min": "--spec-draft-p-min", "-rea": "--reasoning",
    },
    "mlx-lm": {},
    "mlx-vlm": {},
}


def managed_flags(runtime: str) -> dict[str, str]:
    """Every flag athanor sets for ``runtime`` -> the spec field (or preset key) that controls it."""
    managed = dict(_FIXED.get(runtime, {}))
    for key in PRESET_KEYS.values():
        for flags in (key.flags, key.off_flags):
            flag = flags.get(runtime)
            if flag:
                managed[flag] = f"spec.preset.{key.name}"
    return managed


def arg_problems(runtime: str, args: Sequence[object]) -> list[tuple[int, str]]:
    """(index, why) for each element of ``args`` that athanor cannot pass to ``runtime``."""
    managed = managed_flags(runtime)
    aliases = _ALIASES.get(runtime, {})
    problems = []
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            problems.append((i, f"each argument is one string, not {type(arg).__name__} {arg!r}"))
            continue
        if "\0" in arg:
            problems.append((i, "an argument cannot contain a NUL character"))
            continue
        if not arg.startswith("-") or arg == "-" or _is_number(arg):
            continue  # a value, not a flag
        flag = arg.split("=", 1)[0]
        canonical = aliases.get(flag, flag)
        if canonical in managed:
            problems.append((i, f"{flag} is set by athanor; use {managed[canonical]} instead"))
    return problems


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# Variables athanor sets, or that would move what it manages (llama-server reads LLAMA_ARG_<FLAG> as the flag).
MANAGED_ENV = frozenset({"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LLAMA_ARG_HOST", "LLAMA_ARG_PORT",
                         "LLAMA_ARG_MODEL", "LLAMA_ARG_ALIAS", "LLAMA_ARG_MMPROJ", "LLAMA_ARG_EMBEDDINGS",
                         "LLAMA_ARG_RERANKING", "LLAMA_ARG_SPEC_DRAFT_MODEL"})


def env_problems(env: Mapping[str, object]) -> list[tuple[str, str]]:
    """(name, why) for each variable of ``env`` athanor cannot pass."""
    return [(name, f"{name} is set by athanor") for name in env if name in MANAGED_ENV]


def effective_env(runtime: str, gateway: Mapping[str, object], spec: Mapping[str, object]) -> dict[str, str]:
    """The Gateway's ``runtimes.<runtime>.env`` overlaid with the model's own ``spec.env``."""
    runtimes = gateway.get("runtimes") or {}
    defaults = (runtimes.get(runtime) or {}).get("env", {}) if isinstance(runtimes, Mapping) else {}
    return {**defaults, **(spec.get("env") or {})}


def effective_args(runtime: str, gateway: Mapping[str, object], spec: Mapping[str, object]) -> list[tuple[str, str]]:
    """(argument, where it came from) for the Gateway's default ``runtimes.<runtime>.args`` then the model's own
    ``spec.args``: the model's come last, so a flag given twice takes the model's value."""
    runtimes = gateway.get("runtimes") or {}
    defaults = (runtimes.get(runtime) or {}).get("args", []) if isinstance(runtimes, Mapping) else []
    return [(a, "gateway") for a in defaults] + [(a, "model") for a in spec.get("args", []) or []]
