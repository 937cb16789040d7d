"""GGUF header reading without the `gguf` package: the one reader for files on disk and for the Hub's prefixes.

Discovery runs on every scan over files that can be tens of gigabytes, half-downloaded or not GGUF at all; a Hub
search reads the first bytes of a file it has not downloaded (one Range request) and may be handed anything. Both
go through this reader, with one set of limits (``MAX_HEADER_BYTES``, ``MAX_KEYS``, ``MAX_TENSORS``,
``MAX_KEY_BYTES``, ``MAX_ARRAY_LENGTH``, ``MAX_ARRAY_DEPTH``; strings past ``MAX_KEPT_STRING`` are skipped, not
kept). It only walks the header (metadata + tensor infos), seeks over the big tokenizer arrays instead of decoding
them, never recurses deeper than the nesting limit, never allocates more than the bytes it was given, and turns
every malformation into one `GGUFError` that names the file. A prefix that ends inside the metadata is not a
malformation: `GGUFIncomplete` says how many bytes the reader needed and carries the keys read before they ran
out. It imports nothing heavier than `struct`.

    read_gguf_metadata(path)                 a file on disk: every fact discovery records (`GGUFInfo`)
    read_gguf_head(data, name=, size=)       the first bytes of a file (the Hub): its metadata keys

Layout (v2 and v3 share it; v1 used 32-bit counts and is refused):
magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count | kv pairs | tensor infos | padding | tensor data
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from athanor.errors import MetadataError

__all__ = [
    "GGUFError",
    "GGUFIncomplete",
    "GGUFInfo",
    "is_gguf",
    "quantization_from_filename",
    "read_gguf_head",
    "read_gguf_metadata",
    "split_info",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# llama.cpp's LLAMA_FTYPE values (general.file_type); gaps are retired types nobody should meet any more.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# The limits, for files on disk and Hub prefixes alike. Real headers are far inside them: a 262k-token vocabulary
# with its scores, types and merges and a few thousand tensor infos take under 16 MiB, a few dozen keys.
MAX_HEADER_BYTES = 64 * 2**20  # metadata + tensor infos
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 20
MAX_KEY_BYTES = 1 << 16
MAX_ARRAY_LENGTH = 1 << 24  # items in one array (each level of a nested one)
MAX_ARRAY_DEPTH = 8
# Strings longer than this (an embedded tokenizer.json, say) are skipped rather than kept in memory.
MAX_KEPT_STRING = 1 << 20
# Arrays up to this length are worth keeping in `kv` (per-layer head counts of small models, a few flags);
# anything longer is tokenizer data that discovery never needs.
MAX_KEPT_ARRAY = 64
# Numeric arrays are decoded (one C-level unpack, no per-item Python work) up to this length so that a
# per-layer head_count of a deep model is still seen; longer ones are skipped.
_MAX_DECODED_NUMERIC_ARRAY = 4096
_MAX_DIMS = 8  # ggml has 4; a little slack, still far below anything that could hurt.
_READ_CHUNK = 1 << 16
_DEFAULT_ALIGNMENT = 32

# GGUF value types: id -> (struct format, size). 8 = string, 9 = array.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BOOL = 7
# Smallest encodings, used to refuse counts the remaining bytes could never hold before looping over them.
_MIN_KV_SIZE = 8 + 4 + 1          # empty key, type, 1-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # empty name, n_dims, type, offset
_MIN_ARRAY_SIZE = 4 + 8           # nested array header: item type, count


class GGUFError(MetadataError, ValueError):
    """The file is not a GGUF file, or its header is truncated, corrupt or past the reader's limits."""


class GGUFIncomplete(MetadataError):
    """The bytes given (a prefix of the file) end inside the metadata: not a malformation, just too few bytes.

    ``needed`` is the prefix length the reader would have needed to go one step further (at least); ``values``
    holds the metadata keys read before the bytes ran out, in file order.
    """

    def __init__(self, message: str, needed: int, values: dict[str, object] | None = None):
        super().__init__(message)
        self.needed = needed
        self.values: dict[str, object] = values or {}


_SKIPPED = object()
# Encoder architectures llama.cpp serves as embedding models (``--embeddings``).
ENCODER_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3",
                                   "neo-bert", "modern-bert", "t5encoder", "eurobert"})
# Key groups of recurrent layers (Mamba's ssm.*, RWKV's wkv.*, LFM2's shortconv.*): their state is not a K/V cache.
RECURRENT_KEYS = ("ssm", "wkv", "shortconv")
POOLING_RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK: a reranker's classification head
REASONING_MARKERS = ("enable_thinking", "<think>", "reasoning_content")


@dataclass(frozen=True)
class GGUFInfo:
    """Facts about one GGUF file; `parameter_count` covers only the tensors in this file (one shard of a split)."""

    architecture: str | None
    name: str | None
    parameter_count: int
    context_length: int | None = None
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    embedding_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    file_type: int | None = None
    quantization: str | None = None
    pooling_type: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    sliding_window: int | None = None
    recurrent: bool = False  # state-space or RWKV layers: a state beside (or instead of) the K/V cache
    chat_template: str | None = field(default=None, repr=False)
    kv: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def task(self) -> str | None:
        """"embedding" or "rerank" for models llama-server serves in that mode only; None for generative ones.
        A reranker pools by rank; an embedding model is an encoder (BERT family) or declares a pooling."""
        if self.pooling_type == POOLING_RANK:
            return "rerank"
        if self.architecture in ENCODER_ARCHITECTURES or (self.pooling_type or 0) > 0:
            return "embedding"
        return None

    @property
    def reasoning(self) -> bool:
        """Its chat template knows a thinking mode (Qwen3's enable_thinking, <think> blocks, reasoning_content)."""
        template = self.chat_template or ""
        return any(marker in template for marker in REASONING_MARKERS)

    def to_dict(self) -> dict[str, Any]:
        """The named facts in the camelCase shape the API and CLI print, without unknowns."""
        facts = {
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameter_count,
            "contextLength": self.context_length,
            "layers": self.block_count,
            "heads": self.head_count,
            "kvHeads": self.head_count_kv,
            "embeddingLength": self.embedding_length,
            "experts": self.expert_count,
            "expertsUsed": self.expert_used_count,
            "quantization": self.quantization,
            "poolingType": self.pooling_type,
            "keyLength": self.key_length,
            "valueLength": self.value_length,
            "slidingWindow": self.sliding_window,
            "recurrent": self.recurrent or None,
            "task": self.task,
            "reasoning": self.reasoning if self.chat_template else None,  # unknown without a template
        }
        return {k: v for k, v in facts.items() if v is not None}


class _Cursor:
    """Reads a header through a window of bytes, so skipping 200k tokenizer strings costs no syscall per string.

    Two sources: a file on disk (``f``, read in chunks; ``size`` is the file's), or a prefix of a file held in
    memory (``data``; ``size`` is the whole file's when known, else None). Every read is checked first against
    the bytes there are, which is what keeps a corrupt length or count from turning into a huge allocation:
    nothing larger than the file, or than the prefix, is ever requested. Running out of bytes is a truncated
    file when they were the whole file, and ``GGUFIncomplete`` when they were a prefix of a longer one.
    """

    def __init__(self, name: str, size: int | None, *, f: BinaryIO | None = None, data: bytes = b"") -> None:
        if f is None and size is not None:
            data = data[:size]  # a prefix is never longer than its file
        self._f = f
        self.path = name
        self.size = size
        self.pos = 0
        self._buf = data
        self._start = 0
        # Bytes that can be read at all: the whole file, or the prefix.
        self.available = len(data) if f is None else size or 0
        self.whole = f is not None or (size is not None and len(data) == size)

    def error(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def short(self, n: int) -> Exception:
        """The error for wanting bytes [pos, pos+n) that are not there: truncated file, or a prefix too short."""
        end = self.pos + n
        if self.whole or (self.size is not None and end > self.size):
            return self.error(f"truncated GGUF header (wanted {n} bytes at offset {self.pos})")
        if end > MAX_HEADER_BYTES:  # more bytes would not help: the reader would refuse them
            return self.error(f"GGUF header larger than {MAX_HEADER_BYTES} bytes (at offset {self.pos})")
        return GGUFIncomplete(f"{self.path}: the first {self.available} bytes end inside the GGUF header "
                              f"(wanted {n} bytes at offset {self.pos})", end)

    def _check(self, n: int) -> None:
        if n < 0 or self.pos + n > self.available:
            raise self.short(n)
        if self.pos + n > MAX_HEADER_BYTES:
            raise self.error(f"GGUF header larger than {MAX_HEADER_BYTES} bytes (at offset {self.pos})")

    def _window(self, n: int) -> int:
        """Make [pos, pos+n) readable from the buffer and return its start inside the buffer."""
        self._check(n)
        rel = self.pos - self._start
        if rel < 0 or rel + n > len(self._buf):
            assert self._f is not None  # a prefix is all in the buffer
            self._f.seek(self.pos)
            self._buf = self._f.read(max(n, _READ_CHUNK))
            self._start = self.pos
            rel = 0
            if len(self._buf) < n:  # the file shrank under us
                raise self.error(f"truncated GGUF header (wanted {n} bytes at offset {self.pos})")
        return rel

    def room(self) -> tuple[int, str]:
        """How many bytes a count may still claim, and what bounds them: the end of the file (when its size is
        known) or the header limit, whichever comes first."""
        header = MAX_HEADER_BYTES - self.pos
        if self.size is not None and self.size - self.pos <= header:
            return self.size - self.pos, "end of file"
        return header, f"the {MAX_HEADER_BYTES}-byte header limit"

    def unpack(self, st: struct.Struct) -> Any:
        rel = self._window(st.size)
        self.pos += st.size
        return st.unpack_from(self._buf, rel)[0]

    def unpack_many(self, st: struct.Struct, count: int) -> tuple[Any, ...]:
        n = st.size * count
        rel = self._window(n)
        self.pos += n
        return struct.unpack_from(f"<{count}{st.format[-1]}", self._buf, rel)

    def take(self, n: int) -> bytes:
        rel = self._window(n)
        self.pos += n
        return self._buf[rel:rel + n]

    def skip(self, n: int) -> None:
        self._check(n)
        self.pos += n

    def string(self) -> object:
        """The decoded string, or `_SKIPPED` for one too long to be metadata anyone reads."""
        n = self.unpack(_U64)
        if n > MAX_KEPT_STRING:
            self.skip(n)
            return _SKIPPED
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings, walking the buffer directly: this is the hot loop of a scan."""
        while count:
            rel = self._window(8)
            buf, end = self._buf, len(self._buf)
            while count and rel + 8 <= end:
                rel += 8 + _U64.unpack_from(buf, rel)[0]
                count -= 1
                if rel > end:
                    break
            if self._start + rel > self.available or self._start + rel > MAX_HEADER_BYTES:
                self._check(self._start + rel - self.pos)  # raises: truncated, incomplete or too large
            self.pos = self._start + rel


def _past_end(cur: _Cursor, count: int, kind: str, key: str, need: int) -> Exception:
    room, bound = cur.room()
    if need <= room:  # within the file and the limit, past the prefix: more bytes would tell
        return cur.short(need)
    if bound == "end of file":
        return cur.error(f"truncated or corrupt GGUF header: array of {count} {kind} for key {key!r} runs past end "
                         "of file")
    return cur.error(f"array of {count} {kind} for key {key!r} runs past {bound}")


def _check_length(cur: _Cursor, count: int, key: str) -> None:
    if count > MAX_ARRAY_LENGTH:
        raise cur.error(f"array of {count} items for key {key!r} (the limit is {MAX_ARRAY_LENGTH})")


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> object:
    """One value of type `vtype`; arrays too long to be useful come back as `_SKIPPED`, having been seeked over."""
    scalar = _SCALARS.get(vtype)
    if scalar is not None:
        value = cur.unpack(scalar)
        return bool(value) if vtype == _BOOL else value
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise cur.error(f"unknown GGUF value type {vtype} for key {key!r} at offset {cur.pos - 4}")
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.error(f"arrays nested deeper than {MAX_ARRAY_DEPTH} for key {key!r}")
    item_type = cur.unpack(_U32)
    count = cur.unpack(_U64)
    item = _SCALARS.get(item_type)
    if item is not None:
        if item.size * count > cur.available - cur.pos:
            raise _past_end(cur, count, "items", key, item.size * count)
        _check_length(cur, count, key)
        if count > _MAX_DECODED_NUMERIC_ARRAY:
            cur.skip(item.size * count)
            return _SKIPPED
        values = cur.unpack_many(item, count)
        return [bool(v) for v in values] if item_type == _BOOL else list(values)
    if item_type == _STRING:
        if 8 * count > cur.room()[0]:
            raise _past_end(cur, count, "strings", key, 8 * count)
        _check_length(cur, count, key)
        if count > MAX_KEPT_ARRAY:
            cur.skip_strings(count)
            return _SKIPPED
        return [cur.string() for _ in range(count)]
    if item_type == _ARRAY:
        if _MIN_ARRAY_SIZE * count > cur.room()[0]:
            raise _past_end(cur, count, "arrays", key, _MIN_ARRAY_SIZE * count)
        _check_length(cur, count, key)
        for _ in range(count):
            _read_value(cur, _ARRAY, key, depth + 1)
        return _SKIPPED
    raise cur.error(f"unknown GGUF array item type {item_type} for key {key!r} at offset {cur.pos - 12}")


def _read_counts(cur: _Cursor) -> tuple[int, int]:
    """Magic, version and the two counts; (tensor_count, kv_count)."""
    magic = cur.take(4)
    if magic != GGUF_MAGIC:
        raise cur.error(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.unpack(_U32)
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, *SUPPORTED_VERSIONS):
            raise cur.error(f"big-endian GGUF (version {swapped} byte-swapped) is not supported")
        raise cur.error(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count = cur.unpack(_U64)
    kv_count = cur.unpack(_U64)
    if cur.size is not None and kv_count * _MIN_KV_SIZE + tensor_count * _MIN_TENSOR_INFO_SIZE > cur.size - cur.pos:
        raise cur.error(
            f"truncated or corrupt GGUF header ({tensor_count} tensors and {kv_count} metadata keys"
            f" cannot fit in the remaining {cur.size - cur.pos} bytes)"
        )
    if kv_count > MAX_KEYS:
        raise cur.error(f"{kv_count} metadata keys (the limit is {MAX_KEYS})")
    if tensor_count > MAX_TENSORS:
        raise cur.error(f"{tensor_count} tensors (the limit is {MAX_TENSORS})")
    return tensor_count, kv_count


def _read_metadata(cur: _Cursor, kv_count: int, values: dict[str, object]) -> None:
    """The kv pairs, into `values` as they are read (so that a prefix's keys survive its end)."""
    for _ in range(kv_count):
        n = cur.unpack(_U64)
        if n > MAX_KEY_BYTES:
            raise cur.error(f"metadata key of {n} bytes at offset {cur.pos - 8} (the limit is {MAX_KEY_BYTES})")
        key = cur.take(n).decode("utf-8", errors="replace")
        values[key] = _read_value(cur, cur.unpack(_U32), key)


def _read_header(cur: _Cursor) -> tuple[dict[str, object], int]:
    tensor_count, kv_count = _read_counts(cur)
    values: dict[str, object] = {}
    _read_metadata(cur, kv_count, values)

    parameters = 0
    last_start = -1  # offset of the last non-empty tensor, relative to the data section
    for _ in range(tensor_count):
        cur.skip(cur.unpack(_U64))  # name: not needed to count
        n_dims = cur.unpack(_U32)
        if n_dims > _MAX_DIMS:
            raise cur.error(f"tensor with {n_dims} dimensions at offset {cur.pos - 4}")
        elements = math.prod(cur.unpack_many(_U64, n_dims))
        cur.skip(4)  # ggml type: the count does not depend on it
        offset = cur.unpack(_U64)
        if elements:
            last_start = max(last_start, offset)
        parameters += elements

    # Tensor sizes would need ggml's table of block sizes; a tensor that starts past the end is enough to
    # catch the common case, a download cut short.
    alignment = values.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.error(f"invalid general.alignment {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    assert cur.size is not None  # a file on disk
    if last_start >= 0 and data_start + last_start >= cur.size:
        raise cur.error(
            f"truncated GGUF tensor data (file ends at {cur.size}, a tensor starts at {data_start + last_start})"
        )
    return values, parameters


def _readable(values: dict[str, object]) -> dict[str, object]:
    """The values a caller can use: skipped strings and arrays left out."""
    return {k: v for k, v in values.items()
            if v is not _SKIPPED and not (isinstance(v, list) and any(item is _SKIPPED for item in v))}


def read_gguf_head(data: bytes, *, name: str, size: int | None = None) -> dict[str, object]:
    """The metadata keys of a GGUF file from its first bytes, `data` (a Range read of a file on the Hub); `size` is
    the whole file's size when known, `name` what messages call it (the repo and file).

    Raises GGUFIncomplete when `data` ends inside the metadata (its ``values`` are the keys read until then), and
    GGUFError for anything malformed or past the limits. Strings and arrays too long to keep are left out.
    """
    cur = _Cursor(name, size, data=data)
    values: dict[str, object] = {}
    try:
        _, kv_count = _read_counts(cur)
        _read_metadata(cur, kv_count, values)
    except GGUFIncomplete as exc:
        exc.values = _readable(values)
        raise
    except (struct.error, OverflowError, MemoryError) as exc:  # belt and braces: bounds are checked first
        raise cur.error(f"corrupt GGUF header near offset {cur.pos} ({exc})") from exc
    return _readable(values)


def _int(value: object) -> int | None:
    """An integer fact; per-layer arrays (some models vary heads by layer) count as their maximum."""
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints) if ints else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def read_gguf_metadata(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header of a GGUF file.

    Raises GGUFError for anything that is not a well-formed v2/v3 little-endian GGUF header, and OSError
    when the file cannot be opened or read at all.
    """
    display = os.fspath(path)
    with open(path, "rb") as f:
        cur = _Cursor(display, os.fstat(f.fileno()).st_size, f=f)
        try:
            values, parameters = _read_header(cur)
        except (struct.error, OverflowError, MemoryError) as exc:  # belt and braces: bounds are checked first
            raise cur.error(f"corrupt GGUF header near offset {cur.pos} ({exc})") from exc

    arch = _str(values.get("general.architecture"))

    def arch_int(suffix: str) -> int | None:
        return _int(values.get(f"{arch}.{suffix}")) if arch else None

    recurrent_prefixes = tuple(f"{arch}.{group}." for group in RECURRENT_KEYS)
    file_type = _int(values.get("general.file_type"))
    quantization = FILE_TYPE_NAMES.get(file_type) if file_type is not None else None
    if quantization is None:
        quantization = quantization_from_filename(os.path.basename(display))
    kept = {k: v for k, v in _readable(values).items() if not (isinstance(v, list) and len(v) > MAX_KEPT_ARRAY)}
    return GGUFInfo(
        architecture=arch,
        name=_str(values.get("general.name")),
        parameter_count=parameters,
        context_length=arch_int("context_length"),
        block_count=arch_int("block_count"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        embedding_length=arch_int("embedding_length"),
        expert_count=arch_int("expert_count"),
        expert_used_count=arch_int("expert_used_count"),
        file_type=file_type,
        quantization=quantization,
        pooling_type=arch_int("pooling_type"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
        sliding_window=arch_int("attention.sliding_window"),
        recurrent=bool(arch) and any(key.startswith(recurrent_prefixes) for key in values),
        chat_template=_str(values.get("tokenizer.chat_template")) if values.get("tokenizer.chat_template")
        is not _SKIPPED else None,
        kv=kept,
    )


# Quantization names as they appear in file names: Q4_K_M, IQ4_XS, Q8_0, Q4_0_4_4, UD-Q4_K_XL, TQ1_0, BF16, ...
_QUANT_RE = re.compile(
    r"(?<![a-z0-9])("
    r"i?q[1-8]_(?:k(?:_(?:xxs|xs|s|m|l|xl))?|[01](?:_[48]_[48])?|xxs|xs|s|m|nl|xl)"
    r"|tq[12]_0|mxfp4(?:_moe)?|bf16|fp?16|fp?32"
    r")(?![a-z0-9])",
    re.IGNORECASE,
)
_QUANT_ALIASES = {"FP16": "F16", "FP32": "F32"}


def quantization_from_filename(filename: str) -> str | None:
    """The quantization named in a file name, upper-cased; the last one wins since it sits next to the extension."""
    found = _QUANT_RE.findall(os.path.basename(filename))
    if not found:
        return None
    name = found[-1].upper()
    return _QUANT_ALIASES.get(name, name)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with the GGUF magic; cheap enough to call on every file of a scan."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def split_info(filename: str) -> tuple[int, int] | None:
    """(part, total) for llama.cpp's split naming `name-00001-of-00003.gguf`, parts counted from 1."""
    m = _SPLIT_RE.search(filename)
    if m is None:
        return None
    part, total = int(m.group(1)), int(m.group(2))
    return (part, total) if 1 <= part <= total else None
