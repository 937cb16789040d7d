"""The attention shape of a model, read from whatever metadata there is: what the KV cache is made of.

Three spellings of the same facts reach this module, and each key is looked up in all of them:

- discovery's camelCase facts (``artifact.metadata``: ``layers``, ``heads``, ``kvHeads``, ``embeddingLength`` or
  ``hiddenSize``, ``contextLength``, ``architecture`` or ``modelType``, ``task``);
- raw GGUF keys (``<arch>.block_count``, ``<arch>.attention.head_count_kv`` (a number, or one per layer),
  ``<arch>.attention.key_length``/``value_length``, ``<arch>.attention.sliding_window`` and
  ``<arch>.attention.sliding_window_pattern``), as a GGUF header or a Hub listing gives them;
- Hugging Face ``config.json`` keys (``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``,
  ``sliding_window``, ``sliding_window_pattern``, ``layer_types``, ``use_sliding_window``; ``text_config`` for
  vision-language configs), as an MLX repo gives them.

Discovery records ``keyLength``, ``valueLength`` and ``slidingWindow`` (GGUF ``attention.*`` keys; MLX
``head_dim``, ``sliding_window``, ``sliding_window_pattern``). Where a file does not say, the head dimension is
taken as embedding / heads, right for llama, mistral and qwen2 but not for models with wider heads (gemma3's 256
against 2560 / 8 = 320), and every layer counts at the full context: an overestimate, never an underestimate.

Sliding windows are counted only where the runtime bounds them: an explicit per-layer pattern (a list of flags or
``layer_types``), or a window on an architecture whose pattern llama.cpp and mlx-lm fix in code (``SWA_PATTERNS``).
A window alone on any other architecture is ignored (llama.cpp serves a mistral GGUF's window at full size).
Not modelled: DeepSeek's compressed MLA cache (counted as plain heads: an overestimate) and the fixed recurrent
state of hybrid models (their attention-free layers count nothing when the metadata says so per layer).

The metadata may come from anywhere (a Hub repo's config.json), so the work grows with its size, never with the
numbers in it: layers are kept as groups of alike layers (``Layers``), a rule such as "every sixth layer global"
is counted by arithmetic, and a layer count past ``MAX_LAYERS`` leaves the shape unknown with a ``problem``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from athanor.discovery.gguf import ENCODER_ARCHITECTURES
from athanor.discovery.mlx import ENCODER_MODEL_TYPES

# Every n-th layer attends globally, the others through the window (llama.cpp's set_swa_pattern(n); mlx-lm's
# models do the same): gemma2 alternates, gemma3 keeps one global layer in six, cohere2 one in four, gpt-oss
# alternates, llama4's chunked attention keeps one global layer in four.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gemma3_text": 6, "cohere2": 4, "gpt-oss": 2, "gpt_oss": 2,
                "llama4": 4, "llama4_text": 4}
# More layers than any model has (the deepest published ones have a few hundred): a count past it is metadata
# that cannot be true, and the shape is unknown rather than an estimate built from it.
MAX_LAYERS = 16384
_WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention", "local_attention", "sliding")
_FULL_LAYER_TYPES = ("full_attention", "attention", "global_attention", "global")
_NO_CACHE = -1  # a layer type with no per-token cache (linear attention, convolution, recurrent)


@dataclass(frozen=True)
class Layers:
    """``count`` layers alike in their share of the cache: KV heads, their key and value widths, and the window
    (None: all tokens)."""

    count: int
    kv_heads: int
    key_length: int
    value_length: int
    window: int | None = None


@dataclass(frozen=True)
class Shape:
    layers: tuple[Layers, ...]  # groups of alike layers, never one entry per layer; empty when not known
    embedding: int | None  # the model's width: what activations scale with
    context_length: int | None  # the model's own window
    encoder: bool  # BERT-family: llama.cpp keeps no KV cache for them at all
    problem: str | None = None  # why metadata that names the layers was not believed (the shape is then unknown)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class _Keys:
    """Looks a fact up in the flat metadata, then ``text_config``; ``gguf`` suffixes are tried under the
    architecture's prefix."""

    def __init__(self, meta: Mapping[str, Any]):
        text = meta.get("text_config")
        self.scopes = [meta, text] if isinstance(text, Mapping) else [meta]
        arch = next((s.get(k) for s in self.scopes for k in ("architecture", "general.architecture", "modelType",
                                                              "model_type") if isinstance(s.get(k), str)), None)
        self.arch = arch

    def found(self, *names: str, gguf: str | None = None) -> tuple[str | None, Any]:
        """(the key that holds the fact, its value); (None, None) when no key does."""
        keys = list(names)
        if gguf and self.arch:
            keys.insert(0, f"{self.arch}.{gguf}")
        for scope in self.scopes:
            for key in keys:
                if scope.get(key) is not None:
                    return key, scope[key]
        return None, None

    def raw(self, *names: str, gguf: str | None = None) -> Any:
        return self.found(*names, gguf=gguf)[1]

    def int(self, *names: str, gguf: str | None = None) -> int | None:
        value = self.raw(*names, gguf=gguf)
        if isinstance(value, list):  # per-layer arrays count as their largest
            ints = [v for v in map(_int, value) if v is not None]
            return max(ints) if ints else None
        return _int(value)


def read_shape(meta: Mapping[str, Any]) -> Shape:
    """The attention shape ``meta`` describes; layers stay empty when it does not say enough to count any, or
    says something no model is (``problem`` then says what). Never raises: the metadata may come from anywhere.

    The work is bounded by the metadata's own size, never by the numbers in it: per-layer lists are grouped, and
    a count with a rule (every n-th layer global) is counted by arithmetic."""
    keys = _Keys(meta)
    embedding = keys.int("embeddingLength", "hiddenSize", "hidden_size", "n_embd", "d_model", gguf="embedding_length")
    context = keys.int("contextLength", "max_position_embeddings", "n_positions", "max_seq_len",
                       gguf="context_length")
    task = keys.raw("task")
    encoder = keys.arch in ENCODER_ARCHITECTURES or (keys.arch in ENCODER_MODEL_TYPES and task == "embedding")
    kv_raw = keys.raw("kvHeads", "num_key_value_heads", "n_kv_heads", gguf="attention.head_count_kv")
    heads = keys.int("heads", "num_attention_heads", "n_head", "n_heads", gguf="attention.head_count")
    count_key, _ = keys.found("layers", "num_hidden_layers", "n_layer", "n_layers", "num_layers", gguf="block_count")
    count = keys.int("layers", "num_hidden_layers", "n_layer", "n_layers", "num_layers", gguf="block_count")
    if count is None and isinstance(kv_raw, list):
        count_key, count = "per-layer KV head counts", len(kv_raw)
    if not count:
        return Shape((), embedding, context, encoder)
    if count > MAX_LAYERS:
        return Shape((), embedding, context, encoder,
                     problem=f"{count_key} {count} is not a plausible layer count (at most {MAX_LAYERS})")

    kv_list = [_int(v) for v in kv_raw] if isinstance(kv_raw, list) and len(kv_raw) == count else None
    single_kv = None if kv_list else keys.int("kvHeads", "num_key_value_heads", "n_kv_heads",
                                               gguf="attention.head_count_kv") or heads

    key_length = keys.int("keyLength", "headDim", "head_dim", gguf="attention.key_length")
    value_length = keys.int("valueLength", "headDim", "head_dim", gguf="attention.value_length") or key_length
    if key_length is None and embedding and heads:
        key_length = value_length = embedding // heads
    if key_length is None or value_length is None:
        if not embedding:
            return Shape((), embedding, context, encoder)
        # No head count at all: assume every head is a KV head of width embedding / heads (plain multi-head
        # attention), the largest cache the width allows.
        kv_list = [1 if kv is None else kv for kv in kv_list] if kv_list else None
        single_kv = 1 if single_kv is None else single_kv
        key_length = value_length = embedding

    windows = _windows(keys, count)
    groups: Counter[tuple[int | None, int | None]]
    if kv_list is not None:  # one KV head count per layer: as many layers as the list has entries
        groups = Counter((kv, windows.at(i)) for i, kv in enumerate(kv_list))
    else:
        groups = Counter({(single_kv, window): n for window, n in windows.counts(count).items()})
    layers = tuple(Layers(n, 0 if window == _NO_CACHE else kv or 0, key_length, value_length,
                          None if window == _NO_CACHE else window)
                   for (kv, window), n in groups.items() if n)
    return Shape(layers, embedding, context, encoder)


@dataclass(frozen=True)
class _Windows:
    """Each layer's window (None: it sees the whole context; ``_NO_CACHE``: it keeps no tokens), as the metadata
    gives it: a list with one entry per layer, or llama.cpp's rule (every ``every``-th layer global), or one
    window for all."""

    window: int | None
    every: int | None = None
    per_layer: tuple[int | None, ...] | None = None

    def at(self, i: int) -> int | None:
        if self.per_layer is not None:
            return self.per_layer[i]
        if self.every is None:
            return self.window
        # llama.cpp's set_swa_pattern(n): layer i is windowed unless i % n == n - 1; n == 0 windows every layer.
        return self.window if self.every == 0 or i % self.every < self.every - 1 else None

    def counts(self, count: int) -> dict[int | None, int]:
        """How many of `count` layers have each window, by arithmetic where there is a rule."""
        if self.per_layer is not None:
            return dict(Counter(self.per_layer))
        if self.every is None:
            return {self.window: count}
        full = 0 if self.every == 0 else count // self.every
        return {self.window: count - full, None: full}


def _windows(keys: _Keys, count: int) -> _Windows:
    window = keys.int("slidingWindow", "sliding_window", "attention_chunk_size", gguf="attention.sliding_window")
    if keys.raw("use_sliding_window") is False:
        window = None
    types = keys.raw("layerTypes", "layer_types")
    if isinstance(types, list) and len(types) == count:
        return _Windows(window, per_layer=tuple(
            (window if t in _WINDOWED_LAYER_TYPES else None) if t in _WINDOWED_LAYER_TYPES + _FULL_LAYER_TYPES
            else _NO_CACHE for t in types))
    if not window:
        return _Windows(None)
    pattern = keys.raw("slidingWindowPattern", "sliding_window_pattern", gguf="attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == count:  # llama.cpp's per-layer flags: true = windowed
        return _Windows(window, per_layer=tuple(window if flag else None for flag in pattern))
    every = _int(pattern) if not isinstance(pattern, list) else None
    if every is None:
        every = SWA_PATTERNS.get(keys.arch or "")
    if every is None:
        return _Windows(None)
    return _Windows(window, every=every)
