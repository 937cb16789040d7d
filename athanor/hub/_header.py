"""The metadata keys at the head of a GGUF file that is still on the Hub.

A search reads the first ``HEAD_BYTES`` of the chosen file with one Range request. The architecture's keys
(block count, head counts, key length, sliding window) come before the tokenizer's large arrays in files
llama.cpp's converter writes, so the head is enough for a memory estimate. The reader keeps what it could parse
before the bytes ran out and never raises on a truncated or foreign file.
"""

from __future__ import annotations

import struct
from typing import Any

HEAD_BYTES = 256 * 1024
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KEPT_ARRAY = 4096
_MAX_KEPT_STRING = 4096


class _End(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _End
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> bytes:
        return self.take(self.unpack("<Q"))

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            raw = self.string()
            return raw.decode("utf-8", "replace") if len(raw) <= _MAX_KEPT_STRING else None
        if vtype == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS and count <= _MAX_KEPT_ARRAY:
                return [self.unpack(_SCALARS[item_type]) for _ in range(count)]
            if item_type in _SCALARS:
                self.take(struct.calcsize(_SCALARS[item_type]) * count)
                return None
            for _ in range(count):  # strings (a tokenizer's vocabulary) or nested arrays: skipped
                self.value(item_type)
            return None
        raise _End  # an unknown type: nothing after it can be trusted


def read_gguf_head(data: bytes) -> dict[str, Any]:
    """The key/value pairs readable from `data`, a GGUF file's first bytes; {} when it is not GGUF."""
    reader = _Reader(data)
    kv: dict[str, Any] = {}
    try:
        if reader.take(4) != b"GGUF" or reader.unpack("<I") not in (2, 3):
            return {}
        reader.unpack("<Q")  # tensor count
        count = reader.unpack("<Q")
        for _ in range(count):
            key = reader.string().decode("utf-8", "replace")
            value = reader.value(reader.unpack("<I"))
            if value is not None:
                kv[key] = value
    except _End:
        pass
    return kv
