"""Preset keys, built-in recipes and the layering that turns them into one effective preset.

Everything a runtime can be tuned with is a row in ``PRESET_KEYS``: its type, and the flag each runtime spells it
with. The schema, validation, ``preset set`` parsing and argv rendering all read this one table, so adding a knob
is adding a row. Layering is ``runtime defaults < recipe < the model's own preset``, and every effective value
remembers which layer it came from (``describe`` shows it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from athanor.errors import InvalidValueError

RUNTIMES = ("llama-server", "mlx-lm", "mlx-vlm")
_KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# llama-server --help, --spec-type (it takes a comma-separated list; athanor sets one) and --reasoning-format.
_SPEC_TYPES = ("none", "draft-simple", "draft-eagle3", "draft-mtp", "draft-dflash", "draft-dspark", "ngram-simple",
               "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
_REASONING_FORMATS = ("auto", "none", "deepseek", "deepseek-legacy")


@dataclass(frozen=True)
class PresetKey:
    """One tunable. ``kind``: int, number, bool (a switch flag), onoff (on/off/auto), choice, string (non-empty).

    ``off_flags`` names, per runtime, the flag a bool renders when false: for switches the runtime defaults to on
    (``--jinja``/``--no-jinja``). Without one, false renders nothing.
    """

    name: str
    kind: str
    flags: Mapping[str, str]
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    off_flags: Mapping[str, str] = field(default_factory=dict)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any]
        if self.kind == "int":
            schema = {"type": "integer"}
        elif self.kind == "number":
            schema = {"type": "number"}
        elif self.kind == "bool":
            schema = {"type": "boolean"}
        elif self.kind == "onoff":
            schema = {"oneOf": [{"type": "boolean"}, {"enum": ["on", "off", "auto"]}]}
        elif self.kind == "string":
            schema = {"type": "string", "minLength": 1}
        else:
            schema = {"enum": list(self.choices)}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        runtimes = ", ".join(self.flags)
        schema["description"] = f"{self.help} ({runtimes})"
        return schema

    def check(self, value: Any) -> str | None:
        """Why ``value`` is unacceptable, or None. Mirrors the schema for values that bypass it (CLI)."""
        if self.kind in ("int", "number"):
            numeric = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not numeric or (isinstance(value, float) and not math.isfinite(value)):
                return f"expected {'an integer' if self.kind == 'int' else 'a number'}, got {value!r}"
            if self.minimum is not None and value < self.minimum:
                return f"{value!r} is less than the minimum of {self.minimum:g}"
            if self.maximum is not None and value > self.maximum:
                return f"{value!r} is greater than the maximum of {self.maximum:g}"
        elif self.kind == "bool" and not isinstance(value, bool):
            return f"expected true or false, got {value!r}"
        elif self.kind == "onoff" and not (isinstance(value, bool) or value in ("on", "off", "auto")):
            return f"expected on, off or auto, got {value!r}"
        elif self.kind == "choice" and value not in self.choices:
            return f"{value!r} is not one of {list(self.choices)}"
        elif self.kind == "string":
            if not isinstance(value, str) or not value:
                return f"expected a non-empty string, got {value!r}"
            if "\0" in value:
                return "a value cannot contain a NUL character"
        return None

    def argv(self, runtime: str, value: Any) -> list[str]:
        flag = self.flags[runtime]
        if self.kind == "bool":
            off = self.off_flags.get(runtime)
            return [flag] if value else [off] if off else []
        if self.kind == "onoff":
            value = {True: "on", False: "off"}.get(value, value)
        return [flag, _render(value)]


def _render(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _key(name: str, kind: str, help: str, **kw: Any) -> PresetKey:
    return PresetKey(name=name, kind=kind, help=help, **kw)


_LLAMA = "llama-server"
_MLX = "mlx-lm"
_VLM = "mlx-vlm"

PRESET_KEYS: dict[str, PresetKey] = {
    k.name: k
    for k in (
        # Sampling defaults (a request's own values win).
        _key("temperature", "number", "default sampling temperature", minimum=0,
             flags={_LLAMA: "--temp", _MLX: "--temp"}),
        _key("topP", "number", "default nucleus sampling p", minimum=0, maximum=1,
             flags={_LLAMA: "--top-p", _MLX: "--top-p"}),
        _key("topK", "int", "default top-k sampling", minimum=0, flags={_LLAMA: "--top-k", _MLX: "--top-k"}),
        _key("minP", "number", "default min-p sampling", minimum=0, maximum=1,
             flags={_LLAMA: "--min-p", _MLX: "--min-p"}),
        _key("maxTokens", "int", "default cap on generated tokens", minimum=1,
             flags={_LLAMA: "--n-predict", _MLX: "--max-tokens", _VLM: "--max-tokens"}),
        _key("repeatPenalty", "number", "penalty for repeated tokens", minimum=0,
             flags={_LLAMA: "--repeat-penalty"}),
        _key("seed", "int", "sampling seed", flags={_LLAMA: "--seed"}),
        # llama-server resources.
        _key("ctxSize", "int", "context window in tokens (0: the model's own)", minimum=0,
             flags={_LLAMA: "--ctx-size"}),
        _key("batchSize", "int", "logical batch size for prompt processing", minimum=1,
             flags={_LLAMA: "--batch-size"}),
        _key("ubatchSize", "int", "physical batch size", minimum=1, flags={_LLAMA: "--ubatch-size"}),
        _key("gpuLayers", "int", "layers offloaded to the GPU (999: all)", minimum=0,
             flags={_LLAMA: "--n-gpu-layers"}),
        _key("parallel", "int", "concurrent request slots", minimum=1, flags={_LLAMA: "--parallel"}),
        _key("threadsHttp", "int", "HTTP threads; the gateway opens at most this many less 4 connections "
             "(default: parallel + 8)", minimum=5, flags={_LLAMA: "--threads-http"}),
        _key("threads", "int", "CPU threads for generation", minimum=1, flags={_LLAMA: "--threads"}),
        _key("flashAttn", "onoff", "flash attention", flags={_LLAMA: "--flash-attn"}),
        _key("cacheTypeK", "choice", "KV cache type for K", choices=_KV_CACHE_TYPES,
             flags={_LLAMA: "--cache-type-k"}),
        _key("cacheTypeV", "choice", "KV cache type for V (quantized needs flashAttn)", choices=_KV_CACHE_TYPES,
             flags={_LLAMA: "--cache-type-v"}),
        _key("loadMode", "choice", "how weights are loaded (mlock keeps them in RAM)",
             choices=("auto", "none", "mmap", "mlock", "mmap+mlock"), flags={_LLAMA: "--load-mode"}),
        # mlx_lm.server.
        _key("prefillStepSize", "int", "tokens per prefill step", minimum=1,
             flags={_MLX: "--prefill-step-size", _VLM: "--prefill-step-size"}),
        _key("kvBits", "int", "quantize the KV cache to this many bits (MLX: disables batching)", minimum=2,
             maximum=8, flags={_MLX: "--kv-bits", _VLM: "--kv-bits"}),
        _key("promptCacheBytes", "int", "cap on the prompt cache in bytes", minimum=0,
             flags={_MLX: "--prompt-cache-bytes"}),
        _key("promptCacheSize", "int", "prompts kept in the prompt cache", minimum=0,
             flags={_MLX: "--prompt-cache-size"}),
        _key("decodeConcurrency", "int", "sequences decoded together", minimum=1,
             flags={_MLX: "--decode-concurrency"}),
        _key("promptConcurrency", "int", "prompts processed together", minimum=1,
             flags={_MLX: "--prompt-concurrency"}),
        _key("trustRemoteCode", "bool", "allow the model's own tokenizer code",
             flags={_MLX: "--trust-remote-code", _VLM: "--trust-remote-code"}),
        # Speculative decoding (the draft model itself is spec.draft).
        _key("specType", "choice", "speculative decoding type (draft-mtp: the model's own MTP heads)",
             choices=_SPEC_TYPES, flags={_LLAMA: "--spec-type"}),
        _key("draftMax", "int", "tokens drafted per step", minimum=1,
             flags={_LLAMA: "--spec-draft-n-max", _MLX: "--num-draft-tokens"}),
        _key("draftMin", "int", "fewest draft tokens worth using", minimum=0, flags={_LLAMA: "--spec-draft-n-min"}),
        _key("draftPMin", "number", "minimum draft token probability (greedy)", minimum=0, maximum=1,
             flags={_LLAMA: "--spec-draft-p-min"}),
        _key("draftGpuLayers", "int", "draft model layers offloaded to the GPU (999: all)", minimum=0,
             flags={_LLAMA: "--spec-draft-ngl"}),
        # Reasoning (thinking models).
        _key("reasoning", "onoff", "thinking in the chat (auto: as the template says)", flags={_LLAMA: "--reasoning"}),
        _key("reasoningFormat", "choice", "where thoughts go (deepseek: message.reasoning_content, none: left in "
             "the content)", choices=_REASONING_FORMATS, flags={_LLAMA: "--reasoning-format"}),
        _key("reasoningBudget", "int", "thinking tokens (-1: unrestricted, 0: none)", minimum=-1,
             flags={_LLAMA: "--reasoning-budget"}),
        # Chat templates.
        _key("jinja", "bool", "Jinja chat template engine (on by default; false passes --no-jinja)",
             flags={_LLAMA: "--jinja"}, off_flags={_LLAMA: "--no-jinja"}),
        _key("chatTemplate", "string", "chat template replacing the model's (llama-server: also a built-in name "
             "such as chatml)", flags={_LLAMA: "--chat-template", _MLX: "--chat-template"}),
        _key("chatTemplateFile", "string", "file holding the chat template replacing the model's",
             flags={_LLAMA: "--chat-template-file"}),
    )
}


def keys_for(runtime: str) -> list[str]:
    return sorted(name for name, key in PRESET_KEYS.items() if runtime in key.flags)


@dataclass(frozen=True)
class Recipe:
    """Named preset values per runtime. Built-ins ship here; user recipes are ``Recipe`` objects in the store."""

    name: str
    description: str
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    builtin: bool = False


_SAMPLING_CODING = {"temperature": 0.2, "topP": 0.9}
_SAMPLING_QUALITY = {"temperature": 0.6, "topP": 0.95}
_SAMPLING_THINKING = {"temperature": 0.6, "topP": 0.95, "topK": 20, "minP": 0.0}
_SAMPLING_INSTRUCT = {"temperature": 0.7, "topP": 0.8, "topK": 20, "minP": 0.0}

BUILTIN_RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("balanced", "sensible defaults for chat and agents", builtin=True, values={
            _LLAMA: {"flashAttn": "auto", "batchSize": 2048, "ubatchSize": 512},
            _MLX: {"prefillStepSize": 2048, "maxTokens": 4096},
            _VLM: {"maxTokens": 4096},
        }),
        Recipe("fast", "short context and quantized KV cache for latency", builtin=True, values={
            _LLAMA: {"ctxSize": 8192, "batchSize": 1024, "ubatchSize": 512, "flashAttn": "on",
                     "cacheTypeK": "q8_0", "cacheTypeV": "q8_0"},
            _MLX: {"prefillStepSize": 1024, "maxTokens": 2048, "promptCacheSize": 4},
            _VLM: {"maxTokens": 2048},
        }),
        Recipe("quality", "full-precision KV cache and careful sampling", builtin=True, values={
            _LLAMA: {"cacheTypeK": "f16", "cacheTypeV": "f16", "topK": 20, "minP": 0.0, **_SAMPLING_QUALITY},
            _MLX: {"maxTokens": 8192, "topK": 20, **_SAMPLING_QUALITY},
            _VLM: {"maxTokens": 8192},
        }),
        Recipe("coding", "low temperature and a long answer budget for code", builtin=True, values={
            _LLAMA: {"ctxSize": 32768, "flashAttn": "on", "repeatPenalty": 1.0, **_SAMPLING_CODING},
            _MLX: {"maxTokens": 8192, "prefillStepSize": 2048, **_SAMPLING_CODING},
            _VLM: {"maxTokens": 8192},
        }),
        Recipe("long-context", "the largest window memory allows, with a quantized KV cache", builtin=True, values={
            _LLAMA: {"ctxSize": 131072, "flashAttn": "on", "cacheTypeK": "q8_0", "cacheTypeV": "q8_0",
                     "ubatchSize": 1024},
            _MLX: {"prefillStepSize": 4096, "promptCacheSize": 2, "maxTokens": 8192},
            _VLM: {"prefillStepSize": 4096, "maxTokens": 8192},
        }),
        Recipe("q8-kv", "8-bit KV cache: q8_0 K and V with flash attention (MLX: kv-bits 8, one request at a time)",
               builtin=True, values={
            _LLAMA: {"flashAttn": "on", "cacheTypeK": "q8_0", "cacheTypeV": "q8_0"},
            _MLX: {"kvBits": 8},
            _VLM: {"kvBits": 8},
        }),
        Recipe("thinking", "reasoning on, thoughts in reasoning_content, a long answer budget, thinking sampling",
               builtin=True, values={
            _LLAMA: {"reasoning": "on", "reasoningFormat": "deepseek", "reasoningBudget": -1, "maxTokens": 32768,
                     **_SAMPLING_THINKING},
            _MLX: {"maxTokens": 32768, **_SAMPLING_THINKING},
            _VLM: {"maxTokens": 32768},
        }),
        Recipe("instruct", "reasoning off and standard instruct sampling", builtin=True, values={
            _LLAMA: {"reasoning": "off", **_SAMPLING_INSTRUCT},
            _MLX: dict(_SAMPLING_INSTRUCT),
        }),
        Recipe("mtp", "speculative decoding with the model's own MTP heads (the GGUF must carry them)",
               builtin=True, values={
            _LLAMA: {"specType": "draft-mtp", "draftMax": 3},
        }),
    )
}

DEFAULT_RECIPE = "balanced"
_MAX_DEFAULT_CTX = 32768


def runtime_defaults(runtime: str, context_length: int | None) -> dict[str, Any]:
    """What athanor passes when nothing else says otherwise. The context follows the model, capped."""
    if runtime == _LLAMA:
        ctx = min(context_length, _MAX_DEFAULT_CTX) if context_length else 8192
        return {"ctxSize": ctx, "gpuLayers": 999}
    if runtime == _MLX:
        return {"prefillStepSize": 2048, "promptCacheSize": 10, "maxTokens": 4096}
    return {}


@dataclass(frozen=True)
class EffectiveValue:
    value: Any
    source: str  # "default", "recipe:<name>", "model"


def effective_preset(
    runtime: str,
    *,
    context_length: int | None,
    recipe: Recipe | None,
    preset: Mapping[str, Any],
) -> dict[str, EffectiveValue]:
    """Layer defaults < recipe < model preset, keeping only keys this runtime understands."""
    layers: list[tuple[str, Mapping[str, Any]]] = [("default", runtime_defaults(runtime, context_length))]
    if recipe is not None:
        layers.append((f"recipe:{recipe.name}", recipe.values.get(runtime, {})))
    layers.append(("model", preset))
    valid = set(keys_for(runtime))
    result: dict[str, EffectiveValue] = {}
    for source, values in layers:
        for name, value in values.items():
            if name in valid:
                result[name] = EffectiveValue(value, source)
    return dict(sorted(result.items()))


def preset_argv(runtime: str, values: Mapping[str, EffectiveValue]) -> list[str]:
    argv: list[str] = []
    for name, effective in values.items():
        argv += PRESET_KEYS[name].argv(runtime, effective.value)
    return argv


def check_preset_value(runtime: str | None, name: str, value: Any) -> str | None:
    """Why ``name=value`` is not a valid preset entry for ``runtime`` (any runtime if None), or None."""
    valid = keys_for(runtime) if runtime else sorted(PRESET_KEYS)
    if name not in valid:
        where = f" for {runtime}" if runtime else ""
        return f"unknown preset key {name!r}{where} (valid: {', '.join(valid)})"
    return PRESET_KEYS[name].check(value)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as a YAML scalar so numbers and booleans type."""
    import yaml

    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise InvalidValueError(f"{text!r}: expected key=value")
    name = name.strip()
    key = PRESET_KEYS.get(name)
    if key is not None and key.kind == "string":
        return name, raw  # a template or a path, taken as written
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) or value is None:
        value = raw
    return name, value
