"""Facts about an MLX (safetensors + config.json) model directory.

The config says what the model is; the parameter count has to come from the weights, because configs do not
carry it. Reading only the safetensors JSON headers gives it without touching the weights, even for a 100 GB
snapshot. Quantized MLX weights pack 32/bits values into each U32 element, which the count undoes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.errors import MetadataError

__all__ = ["MLXConfigError", "MLXInfo", "is_mlx_dir", "read_mlx_config"]

# Model types whose configs describe a vision-language model even when (like gemma3) they nest the vision part
# under a differently named key or the config was trimmed.
# Encoders: embedding models, which mlx_lm.server (a generation server) cannot serve.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "modernbert", "nomic_bert", "distilbert",
                                 "new", "gte", "e5"})
VISION_MODEL_TYPES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "llava_next", "llava_onevision", "mllama",
    "gemma3", "gemma3n", "paligemma", "idefics2", "idefics3", "smolvlm", "pixtral", "mistral3", "florence2",
    "internvl_chat", "kimi_vl", "phi3_v", "aya_vision", "molmo", "deepseek_vl_v2",
})
# safetensors caps the JSON header at 100 MB; anything claiming more is corrupt.
_MAX_SAFETENSORS_HEADER = 100_000_000
# A model's config.json is a few kilobytes (a few hundred with large label maps); the Hub's reads stop at 4 MiB.
MAX_CONFIG_BYTES = 16 * 2**20


class MLXConfigError(MetadataError, ValueError):
    """config.json is not valid JSON, not a JSON object, nested too deep or too large to be a model's config."""


@dataclass(frozen=True)
class MLXInfo:
    """What discovery reports for an MLX directory; None means the config does not say."""

    model_type: str | None
    architectures: list[str] = field(default_factory=list)
    context_length: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    quantization: dict[str, Any] | None = None
    bits: int | None = None
    vision: bool = False
    parameter_count: int | None = None
    head_dim: int | None = None
    sliding_window: int | None = None
    sliding_window_pattern: int | None = None
    reasoning: bool | None = None  # its chat template has a thinking mode (None: no template found)

    def to_dict(self) -> dict[str, Any]:
        """The named facts in the camelCase shape the API and CLI print, without unknowns."""
        facts = {
            "modelType": self.model_type,
            "architectures": list(self.architectures),
            "contextLength": self.context_length,
            "layers": self.layers,
            "heads": self.heads,
            "kvHeads": self.kv_heads,
            "hiddenSize": self.hidden_size,
            "parameters": self.parameter_count,
            "quantization": f"{self.bits}bit" if self.bits is not None else None,
            "vision": self.vision,
            "task": "embedding" if self.model_type in ENCODER_MODEL_TYPES else None,
            "keyLength": self.head_dim,
            "valueLength": self.head_dim,
            "slidingWindow": self.sliding_window,
            "slidingWindowPattern": self.sliding_window_pattern,
            "reasoning": self.reasoning,
        }
        return {k: v for k, v in facts.items() if v is not None}


def is_mlx_dir(path: str | os.PathLike[str]) -> bool:
    """A directory mlx-lm could load: config.json plus safetensors weights, and no GGUF that would make it a
    llama.cpp repo. Plain transformers checkpoints pass too, which is right: mlx-lm loads those as well."""
    p = Path(path)
    try:
        return (
            p.is_dir()
            and (p / "config.json").is_file()
            and any(p.glob("*.safetensors"))
            and not any(p.glob("*.gguf"))
        )
    except OSError:
        return False


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _first_int(configs: list[dict[str, Any]], *keys: str) -> int | None:
    """The first integer found, top-level config before text_config: VL configs keep the language model's
    numbers in text_config, and some repeat them at the top."""
    for config in configs:
        for key in keys:
            value = _int(config.get(key))
            if value is not None:
                return value
    return None


def _load_config(config_path: Path) -> dict[str, Any]:
    try:
        with open(config_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise MLXConfigError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes, more than any model's config")
        config = json.loads(raw.decode("utf-8"))
    except RecursionError as exc:  # json's parser gives up on arrays or objects nested this deep
        raise MLXConfigError(f"{config_path}: invalid JSON: nested too deep") from exc
    except json.JSONDecodeError as exc:
        raise MLXConfigError(
            f"{config_path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise MLXConfigError(f"{config_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(config, dict):
        raise MLXConfigError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_mlx_config(path: str | os.PathLike[str]) -> MLXInfo:
    """Read an MLX model directory (or its config.json).

    Raises MLXConfigError for a malformed config.json and OSError when it is missing or unreadable. Unreadable
    weight headers only make `parameter_count` None: the config's facts are still worth reporting.
    """
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    config = _load_config(directory / "config.json" if p.is_dir() else p)

    text_config = config.get("text_config")
    configs = [config, text_config] if isinstance(text_config, dict) else [config]
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    architectures = config.get("architectures")
    architectures = [a for a in architectures if isinstance(a, str)] if isinstance(architectures, list) else []

    heads = _first_int(configs, "num_attention_heads", "n_head", "n_heads")
    quant_block = config.get("quantization")
    if not isinstance(quant_block, dict):
        quant_block = config.get("quantization_config")
    # Keep the scalar settings; nested dicts are per-layer overrides, noise to anyone printing this.
    quantization = (
        {k: v for k, v in quant_block.items() if not isinstance(v, (dict, list))}
        if isinstance(quant_block, dict) else None
    )
    bits = _int(quantization.get("bits")) if quantization else None

    return MLXInfo(
        model_type=model_type,
        architectures=architectures,
        context_length=_first_int(configs, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
        layers=_first_int(configs, "num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        heads=heads,
        kv_heads=_first_int(configs, "num_key_value_heads", "n_kv_heads") or heads,
        hidden_size=_first_int(configs, "hidden_size", "n_embd", "d_model", "dim"),
        vocab_size=_first_int(configs, "vocab_size"),
        quantization=quantization,
        bits=bits,
        vision=isinstance(config.get("vision_config"), dict) or model_type in VISION_MODEL_TYPES,
        parameter_count=_parameter_count(directory, quant_block if isinstance(quant_block, dict) else None),
        head_dim=_first_int(configs, "head_dim"),
        sliding_window=_first_int(configs, "sliding_window"),
        sliding_window_pattern=_first_int(configs, "sliding_window_pattern"),
        reasoning=_template_reasoning(directory),
    )


def _template_reasoning(directory: Path) -> bool | None:
    """Whether the chat template has a thinking mode (None: no template found)."""
    from athanor.discovery.gguf import REASONING_MARKERS

    template = read_chat_template(directory)
    if not template:
        return None
    return any(marker in template for marker in REASONING_MARKERS)


def read_chat_template(directory: Path) -> str | None:
    """The chat template of an MLX model directory: ``chat_template.jinja``, else tokenizer_config.json's (a list of
    named templates comes back as its JSON text). None when there is none or it cannot be read."""
    jinja = directory / "chat_template.jinja"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8", errors="replace")
        data = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    value = data.get("chat_template") if isinstance(data, dict) else None
    return value if isinstance(value, str) else json.dumps(value) if value else None


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """name -> {dtype, shape} from one file's JSON header, or None if the header is not one."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                return None
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError):  # ValueError covers JSON and UTF-8 errors; RecursionError nesting
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    for entry in header.values():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
    return header


def _parameter_count(directory: Path, quant: dict[str, Any] | None) -> int | None:
    """Sum of tensor sizes over every *.safetensors file, with quantized weights counted unpacked and their
    scales/biases left out (they are quantization bookkeeping, not parameters)."""
    # Like mlx-lm, prefer model*.safetensors: Mistral repos also ship the same weights as consolidated.safetensors.
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    tensors: dict[str, dict[str, Any]] = {}
    for file in files:
        header = _safetensors_header(file)
        if header is None:
            return None
        tensors.update(header)

    total = 0
    for name, entry in tensors.items():
        module, _, leaf = name.rpartition(".")
        quantized = f"{module}.scales" in tensors
        if quantized and leaf in ("scales", "biases"):
            continue
        count = math.prod(entry["shape"])
        if quantized and leaf == "weight" and entry.get("dtype") == "U32":
            bits = _bits_for(module, quant)
            if bits is None:
                return None
            count = count * 32 // bits
        total += count
    return total


def _bits_for(module: str, quant: dict[str, Any] | None) -> int | None:
    """A module's bits: mlx-lm writes per-layer overrides (mixed-precision recipes) under the module's path."""
    if quant is None:
        return None
    override = quant.get(module)
    if isinstance(override, dict) and _int(override.get("bits")):
        return _int(override.get("bits"))
    bits = _int(quant.get("bits"))
    return bits if bits else None
