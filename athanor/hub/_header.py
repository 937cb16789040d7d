"""A repo's shape metadata, read from the Hub within bounds: the head of a GGUF file, or config.json.

A search reads the first ``HEAD_BYTES`` of the chosen GGUF file with one Range request (``_client.read_head``
stops at that many bytes even when the server sends the whole file) and parses them with discovery's GGUF reader,
the same reader and limits as files on disk. The architecture's keys (block count, head counts, key length,
sliding window) come before the tokenizer's large arrays in files llama.cpp's converter writes, so when the head
ends inside the header (``GGUFIncomplete``) the keys read until then are used. A config.json is read up to
``CONFIG_BYTES``.

Whatever is read must also make sense as a shape (``fit._shape``: no more layers than any model has). Anything
malformed, past the limits or implausible is a ``MetadataError`` naming the repo and the file; search turns it
into a row whose shape is unknown.
"""

from __future__ import annotations

import json
from typing import Any

from athanor.errors import MetadataError, printable
from athanor.hub import _client

HEAD_BYTES = 256 * 1024
CONFIG_BYTES = 4 * 2**20


def gguf_head(repo: str, path: str, revision: str, size: int | None) -> dict[str, Any]:
    """The metadata keys at the head of a GGUF file on the Hub (`size`: the file's listed size, when known)."""
    from athanor.discovery.gguf import GGUFIncomplete, read_gguf_head

    where = printable(f"{repo}: {path}")
    data = _client.read_head(repo, path, revision, HEAD_BYTES)
    try:
        keys = read_gguf_head(data, name=where, size=size)
    except GGUFIncomplete as short:
        keys = short.values
    return _plausible(keys, where)


def config(repo: str, path: str, revision: str) -> dict[str, Any]:
    """A config.json on the Hub, as a dict."""
    where = printable(f"{repo}: {path}")
    data = _client.read_head(repo, path, revision, CONFIG_BYTES + 1)
    if len(data) > CONFIG_BYTES:
        raise MetadataError(f"{where}: larger than {CONFIG_BYTES} bytes, more than any model's config")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays or objects nested too deep
        reason = str(exc).splitlines()[0] if isinstance(exc, ValueError) else "nested too deep"
        raise MetadataError(f"{where}: not a JSON config ({reason})") from exc
    if not isinstance(parsed, dict):
        raise MetadataError(f"{where}: expected a JSON object, got {type(parsed).__name__}")
    return _plausible(parsed, where)


def _plausible(meta: dict[str, Any], where: str) -> dict[str, Any]:
    from athanor.fit._shape import read_shape

    problem = read_shape(meta).problem
    if problem:
        raise MetadataError(f"{where}: {problem}")
    return meta
