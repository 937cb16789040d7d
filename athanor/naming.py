"""Model names derived from where the weights are, the same way every time.

A name is what clients and the CLI type, so it must be short, lowercase and stable: the same repo and file always
give the same name, and a clash is resolved the same way on every machine (org prefix, then a counter).
"""

from __future__ import annotations

import re
from collections.abc import Container

from athanor.discovery.gguf import split_info

MAX_NAME = 63
_UNSAFE = re.compile(r"[^a-z0-9.]+")
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")


def slugify(text: str) -> str:
    """``Qwen3-8B-Q4_K_M`` -> ``qwen3-8b-q4-k-m``; always a valid model name (falls back to ``model``)."""
    slug = _UNSAFE.sub("-", text.lower()).strip("-.")
    slug = re.sub(r"-{2,}", "-", slug)[:MAX_NAME].strip("-.")
    return slug or "model"


def base_name(repo: str | None, file: str | None) -> str:
    """The preferred name: the GGUF file's stem (without shard suffix), else the repo's name."""
    if file:
        stem = file.rsplit("/", 1)[-1]
        stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
        if split_info(file):
            stem = _SPLIT_SUFFIX.sub("", stem)
        return slugify(stem)
    return slugify((repo or "model").rsplit("/", 1)[-1])


def unique_name(repo: str | None, file: str | None, taken: Container[str]) -> str:
    """``base_name`` unless taken; then ``<org>-<base>``; then ``<base>-2``, ``-3``..."""
    name = base_name(repo, file)
    if name not in taken:
        return name
    if repo and "/" in repo:
        prefixed = slugify(f"{repo.split('/', 1)[0]}-{name}")
        if prefixed not in taken:
            return prefixed
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = name[: MAX_NAME - len(suffix)].rstrip("-.") + suffix
        if candidate not in taken:
            return candidate
        n += 1
