"""What a model needs in memory once it serves: weights, KV cache, projector, draft model and runtime overhead.

Each part is what the runtime allocates, not what a request happens to touch:

- weights: the files on disk (every shard; llama.cpp maps them and reads all of them, MLX loads them), or
  parameters x bits / 8 when only metadata is known (``BITS_PER_WEIGHT``);
- KV cache: per layer, KV heads x (key width x K-type bytes + value width x V-type bytes) x the tokens the layer
  keeps. llama-server allocates it at start for the whole context (rounded up to 256 tokens, as llama.cpp pads
  it); a sliding-window layer keeps min(context, window x slots + ubatch) tokens (``llama_kv_cache_iswa``). MLX
  grows its cache with use, so it is counted at the context athanor expects a conversation to reach: the
  model's window, at most ``MLX_CONTEXT_CAP`` (or the context asked for); a window layer keeps the window.
  Embedding and rerank models: an encoder (BERT family, the architectures discovery serves with --embeddings)
  keeps no KV cache at all in llama.cpp, measured flat from 512 to 8192 tokens; a decoder served for embeddings
  (Qwen3-Embedding, any GGUF that declares a pooling) gets the same cache as a chat model and is counted so;
- projector: a GGUF's ``mmproj`` file, which llama-server loads beside the weights (an MLX vision model keeps
  its vision tower in its weight files, already counted);
- draft: the draft model's weights and, when it is a registered model, its KV cache at the same context;
- overhead: ``RUNTIME_BASE[runtime]`` (the process itself: binary or interpreter, libraries, HTTP threads,
  tokenizer) plus the activations of one batch, ``ACTIVATIONS_PER_WIDTH`` values per embedding element per
  batch token (llama.cpp computes in f32, MLX in the model's 16-bit type). See benchmarks/fit_calibration.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from athanor.errors import InvalidValueError
from athanor.fit._shape import Shape, read_shape
from athanor.runtimes.launch import LLAMA_AUTO_PARALLEL
from athanor.runtimes.resolve import draft_path, effective_for

MiB = 2**20

# Bytes per cached element for llama.cpp's --cache-type-k/-v: block types carry a 2-byte scale (and a 2-byte
# minimum for the _1 types) per 32 values.
CACHE_TYPE_BYTES: dict[str, Fraction] = {
    "f32": Fraction(4), "f16": Fraction(2), "bf16": Fraction(2),
    "q8_0": Fraction(34, 32), "q4_0": Fraction(18, 32), "q4_1": Fraction(20, 32),
    "q5_0": Fraction(22, 32), "q5_1": Fraction(24, 32), "iq4_nl": Fraction(18, 32),
}
MLX_KV_GROUP = 64  # mlx-lm quantizes the cache in groups of 64 values, each with a 16-bit scale and bias

# Calibrated on Linux (benchmarks/fit_calibration.py): llama-server's resident set with a tiny model is 25-30 MiB,
# mlx_lm.server's (Python, mlx, the tokenizer) 83-92 MiB after a request; rounded up. mlx_vlm.server also imports
# the image processors; not measured (no mlx-vlm on the calibration machine), so twice mlx-lm's. Not counted:
# MLX's CPU backend (Linux) holds one prefill step's attention scores while it prefills (step x context x heads x
# 2 bytes, 128 MiB for the tiny model at 8192 tokens: its peak, not what stays); Metal's fused attention does not.
RUNTIME_BASE = {"llama-server": 32 * MiB, "mlx-lm": 96 * MiB, "mlx-vlm": 192 * MiB}
# One batch's activations, per embedding element per batch token. 32 reproduces llama.cpp's published CPU
# compute buffers (about 256 MiB for 8B models at ubatch 512: 512 x 4096 x 32 x 4 bytes) and the ~30 MiB
# SmolLM2 (width 576) adds over the tiny model's baseline.
ACTIVATIONS_PER_WIDTH = 32
ACTIVATION_BYTES = {"llama-server": 4, "mlx-lm": 2, "mlx-vlm": 2}

LLAMA_UBATCH = 512  # llama-server's default --ubatch-size
LLAMA_CTX_PAD = 256  # llama.cpp rounds the context (and a window cache) up to this
MLX_PREFILL_STEP = 2048  # mlx_lm.server's default --prefill-step-size
MLX_CONTEXT_CAP = 32768  # MLX: the context counted when none is set (the cache grows as it is used)
DEFAULT_CONTEXT = 8192  # when the metadata names no window

# Bits per weight when only a parameter count is known: the quantization's block size (scales included) and,
# for the K-quant mixes, the higher-precision tensors they keep (published file sizes / parameter counts).
BITS_PER_WEIGHT = {
    "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.7, "Q5_K_S": 5.54, "Q5_1": 6,
    "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_1": 5, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "MXFP4": 4.25, "MXFP4_MOE": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "IQ3_M": 3.66,
    "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K": 3.0, "Q2_K_S": 2.8, "IQ2_M": 2.7, "IQ2_S": 2.5,
    "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56, "TQ2_0": 2.06, "TQ1_0": 1.69,
}


@dataclass(frozen=True)
class Estimate:
    """Bytes a served model holds, by part; ``context`` is the context the KV cache was counted at."""

    weights: int
    kv_cache: int
    projector: int
    draft: int
    overhead: int
    context: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.projector + self.draft + self.overhead

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights, "kvCache": self.kv_cache, "projector": self.projector,
                "draft": self.draft, "overhead": self.overhead, "context": self.context, "total": self.total}


@dataclass(frozen=True)
class _Cache:
    """How a runtime holds the KV cache: bytes per K and V element, the batch it fills at once, its slots."""

    k_bytes: Fraction
    v_bytes: Fraction
    batch: int  # llama-server's ubatch; MLX's prefill step (activations only)
    slots: int = 1


def estimate_model(doc: dict[str, Any], obj: dict[str, Any], *, context: int | None = None) -> Estimate:
    """A registered model (an object of models.json) as it would run now: its effective preset decides the
    context and cache types. ``context`` replaces the effective context. No weights on disk: all zero."""
    artifact = obj.get("artifact")
    if not artifact:
        return Estimate(0, 0, 0, 0, 0, context=0)
    runtime = obj["spec"]["runtime"]
    meta = artifact.get("metadata") or {}
    shape = read_shape(meta)
    effective = {name: value.value for name, value in effective_for(doc, obj).items()}
    ctx = _context(runtime, shape, context if context is not None else effective.get("ctxSize"))
    cache = _cache_for(runtime, effective)
    weights = artifact.get("sizeBytes") or _weights_from(meta)
    kv = _kv_bytes(shape, runtime, ctx, cache)
    projector = _file_size(artifact.get("mmproj")) if runtime == "llama-server" else 0
    draft = _draft_bytes(doc, obj, ctx) if runtime == "llama-server" else 0
    return Estimate(weights, kv, projector, draft, _overhead(runtime, shape, cache), context=ctx)


def estimate_meta(meta: dict[str, Any], *, weights_bytes: int, runtime: str, context: int, cache_type: str = "f16",
                  projector_bytes: int = 0) -> Estimate:
    """From metadata alone (a Hub repo before download): GGUF keys, config.json keys or discovery's facts (see
    ``_shape``). ``weights_bytes`` 0: parameters x bits from ``meta`` (``parameters``, ``quantization``).
    ``context`` 0: the model's own window. ``cache_type`` is llama.cpp's name for both K and V."""
    if runtime not in RUNTIME_BASE:
        raise InvalidValueError(f"unknown runtime {runtime!r} (known: {', '.join(RUNTIME_BASE)})")
    if cache_type not in CACHE_TYPE_BYTES:
        raise InvalidValueError(f"unknown KV cache type {cache_type!r} (known: {', '.join(CACHE_TYPE_BYTES)})")
    shape = read_shape(meta)
    ctx = _context(runtime, shape, context)
    per = CACHE_TYPE_BYTES[cache_type]
    cache = _cache_for(runtime, {}, default=per)
    weights = weights_bytes or _weights_from(meta)
    return Estimate(weights, _kv_bytes(shape, runtime, ctx, cache), projector_bytes, 0,
                    _overhead(runtime, shape, cache), context=ctx)


def _context(runtime: str, shape: Shape, asked: int | None) -> int:
    """The tokens the cache is counted at. llama-server: what it is given (0: the model's window), padded as
    llama.cpp pads it. MLX, given none: the model's window, at most MLX_CONTEXT_CAP."""
    if runtime == "llama-server":
        ctx = asked or shape.context_length or DEFAULT_CONTEXT
        return -(-ctx // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
    if asked:
        return asked
    return min(shape.context_length or DEFAULT_CONTEXT, MLX_CONTEXT_CAP)


def _cache_for(runtime: str, effective: dict[str, Any], default: Fraction = CACHE_TYPE_BYTES["f16"]) -> _Cache:
    if runtime == "llama-server":
        k = CACHE_TYPE_BYTES.get(effective.get("cacheTypeK", ""), default)
        v = CACHE_TYPE_BYTES.get(effective.get("cacheTypeV", ""), default)
        slots = effective.get("parallel") or LLAMA_AUTO_PARALLEL
        return _Cache(k, v, effective.get("ubatchSize") or LLAMA_UBATCH, slots)
    bits = effective.get("kvBits")
    per = Fraction(bits, 8) + Fraction(4, MLX_KV_GROUP) if bits else default
    return _Cache(per, per, effective.get("prefillStepSize") or MLX_PREFILL_STEP)


def _kv_bytes(shape: Shape, runtime: str, ctx: int, cache: _Cache) -> int:
    if shape.encoder:  # llama.cpp builds no KV cache for encoders; each input is processed whole
        return 0
    total = Fraction(0)
    for group in shape.layers:
        tokens = ctx if group.window is None else min(ctx, _window_tokens(runtime, group.window, cache))
        total += group.count * group.kv_heads * tokens * (group.key_length * cache.k_bytes
                                                          + group.value_length * cache.v_bytes)
    return math.ceil(total)


def _window_tokens(runtime: str, window: int, cache: _Cache) -> int:
    """The tokens a sliding-window layer keeps: llama.cpp keeps the window for every slot plus one ubatch, padded;
    mlx-lm's rotating cache keeps the window."""
    if runtime == "llama-server":
        return -(-(window * cache.slots + cache.batch) // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
    return window


def _overhead(runtime: str, shape: Shape, cache: _Cache) -> int:
    width = shape.embedding or 0
    activations = ACTIVATIONS_PER_WIDTH * cache.batch * width * ACTIVATION_BYTES[runtime]
    return RUNTIME_BASE[runtime] + activations


def _weights_from(meta: dict[str, Any]) -> int:
    """Parameters x bits / 8, for weights not on disk: GGUF quantization names, MLX's ``4bit`` (plus its 16-bit
    scale and bias per group of 64: half a bit), else 16-bit."""
    parameters = meta.get("parameters")
    if not isinstance(parameters, int) or parameters <= 0:
        return 0
    quant = str(meta.get("quantization") or "").upper()
    if quant.endswith("BIT") and quant[:-3].isdigit():
        bits: float = int(quant[:-3]) + 0.5
    else:
        bits = BITS_PER_WEIGHT.get(quant, 16)
    return math.ceil(parameters * bits / 8)


def _file_size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def _draft_bytes(doc: dict[str, Any], obj: dict[str, Any], ctx: int) -> int:
    """The draft model's weights, plus its KV cache when it is a registered model whose metadata says its shape
    (llama-server gives the draft the main context's per-slot size, f16 unless told otherwise; at most ``ctx``,
    counted whole). A draft named by path counts its file only: reading its header here would cost I/O."""
    path = draft_path(doc, obj)
    if not path:
        return 0
    other = doc["models"].get(obj["spec"].get("draft"))
    artifact = (other or {}).get("artifact") or {}
    if not artifact:
        return _file_size(path)
    shape = read_shape(artifact.get("metadata") or {})
    f16 = CACHE_TYPE_BYTES["f16"]
    kv = _kv_bytes(shape, "llama-server", ctx, _Cache(f16, f16, LLAMA_UBATCH, 1))
    return (artifact.get("sizeBytes") or _file_size(path)) + kv
