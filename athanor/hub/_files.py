"""Which files of a repo athanor would download: pure functions of (path, size) pairs.

GGUF repos hold one file per quantization, large ones split into shards (``name-00001-of-00003.gguf``, often in a
folder named after the quant), and vision models a projector (``mmproj-*.gguf``). A choice is one quantization:
one file, or all its shards with their sizes summed. The quant is chosen by ``QUANT_PREFERENCE``, then the
smallest. A projector is never a candidate; the preferred one (``PROJECTOR_PREFERENCE``) is reported beside.

MLX and plain safetensors repos are one choice: every ``*.safetensors`` file (the config and tokenizer are small).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from athanor.discovery.gguf import quantization_from_filename, split_info

QUANT_PREFERENCE = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q4_K_S", "Q8_0")
PROJECTOR_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")
_SPLIT = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)", re.IGNORECASE)
_MLX_QUANT = re.compile(r"(?<![a-z0-9])(\d{1,2})[-_]?bits?(?![a-z0-9])", re.IGNORECASE)
_MLX_FLOAT = re.compile(r"(?<![a-z0-9])(bf16|fp16|f16|fp32|mxfp4|nvfp4)(?![a-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class Choice:
    """The weights to fetch: one GGUF file, all shards of one, or an MLX repo's safetensors files."""

    files: tuple[str, ...]
    size_bytes: int
    quant: str | None


@dataclass(frozen=True)
class GGUFChoice:
    weights: Choice | None  # None: the repo has no GGUF weights (only projectors, or incomplete splits)
    projector: Choice | None
    candidates: tuple[Choice, ...]  # every complete quantization, in preference order


def is_projector(path: str) -> bool:
    return "mmproj" in path.rsplit("/", 1)[-1].lower()


def choose_gguf(files: Iterable[tuple[str, int | None]]) -> GGUFChoice:
    """The preferred quantization among a repo's GGUF files, shards summed, and its projector."""
    groups: dict[str, list[tuple[str, int]]] = {}
    projectors: list[Choice] = []
    for path, size in files:
        if not path.lower().endswith(".gguf"):
            continue
        if is_projector(path):
            projectors.append(Choice((path,), size or 0, _quant(path)))
            continue
        groups.setdefault(_SPLIT.sub("", path), []).append((path, size or 0))

    candidates = []
    for key, parts in groups.items():
        parts.sort()
        split = split_info(parts[0][0])
        if split is not None and (len(parts) != split[1] or any(split_info(p) is None for p, _ in parts)):
            continue  # a split with shards missing cannot be loaded
        candidates.append(Choice(tuple(p for p, _ in parts), sum(s for _, s in parts), _quant(key)))
    candidates.sort(key=_preference)
    projectors.sort(key=lambda c: (_rank(c.quant, PROJECTOR_PREFERENCE), c.size_bytes, c.files))
    return GGUFChoice(candidates[0] if candidates else None, projectors[0] if projectors else None,
                      tuple(candidates))


def choose_safetensors(files: Iterable[tuple[str, int | None]], quant: str | None) -> Choice | None:
    weights = sorted((p, s or 0) for p, s in files if p.endswith(".safetensors"))
    if not weights:
        return None
    return Choice(tuple(p for p, _ in weights), sum(s for _, s in weights), quant)


def mlx_quant(repo: str, config: dict | None, tags: Iterable[str]) -> str | None:
    """``4bit`` and the like, from config.json's quantization, the repo's tags (``4-bit``) or its name."""
    quantization = (config or {}).get("quantization") or (config or {}).get("quantization_config") or {}
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if isinstance(bits, int):
        return f"{bits}bit"
    for tag in tags:
        m = re.fullmatch(r"(\d{1,2})-bit", tag)
        if m:
            return f"{m.group(1)}bit"
    name = repo.rsplit("/", 1)[-1]
    if m := _MLX_QUANT.search(name):
        return f"{m.group(1)}bit"
    if m := _MLX_FLOAT.search(name):
        return m.group(1).upper().replace("FP16", "F16")
    return None


def _quant(path: str) -> str | None:
    """The quant in the file name, else in its folder's name (``Q4_K_M/model-00001-of-00002.gguf``)."""
    parts = path.split("/")
    for part in reversed(parts):
        quant = quantization_from_filename(part)
        if quant:
            return quant
    return None


def _rank(quant: str | None, order: tuple[str, ...]) -> int:
    return order.index(quant) if quant in order else len(order)


def _preference(choice: Choice) -> tuple[int, int, tuple[str, ...]]:
    return (_rank(choice.quant, QUANT_PREFERENCE), choice.size_bytes, choice.files)
