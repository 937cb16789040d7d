"""The GGUF header reader against files written by the reference `gguf` package, and against broken ones."""

from __future__ import annotations

import math
import os
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from huggingface_hub import scan_cache_dir

from athanor.discovery.gguf import (
    FILE_TYPE_NAMES,
    GGUFError,
    GGUFIncomplete,
    GGUFInfo,
    is_gguf,
    quantization_from_filename,
    read_gguf_head,
    read_gguf_metadata,
    split_info,
)
from fixtures.tiny_models import TinyLlamaShape, add_gguf_repo, byte_level_vocab, write_tiny_llama_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", context_length=512)


@pytest.fixture(scope="module")
def tiny_bytes(tiny_gguf: Path) -> bytes:
    return tiny_gguf.read_bytes()


@pytest.fixture(scope="module")
def data_offset(tiny_gguf: Path) -> int:
    """Where the header ends and tensor data begins, according to the reference reader."""
    return gguf.GGUFReader(tiny_gguf).data_offset


def write_gguf(path: Path, build, *, tensors: dict[str, np.ndarray] | None = None, arch: str = "llama") -> Path:
    """A GGUF with whatever metadata `build(writer)` adds, for shapes the tiny llama does not have."""
    writer = gguf.GGUFWriter(path, arch)
    build(writer)
    for name, array in (tensors or {"t": np.zeros(4, np.float32)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_tiny_parameters() -> int:
    s = TinyLlamaShape
    vocab = len(byte_level_vocab()[0])
    hd = s.head_dim()
    per_layer = (
        2 * s.hidden  # attn_norm, ffn_norm
        + s.hidden * s.heads * hd * 2  # attn_q, attn_output
        + s.hidden * s.kv_heads * hd * 2  # attn_k, attn_v
        + 3 * s.hidden * s.ffn  # ffn_gate, ffn_up, ffn_down
    )
    return 2 * vocab * s.hidden + s.hidden + s.layers * per_layer  # token_embd, output, output_norm


# ---------------------------------------------------------------------------------------------- facts


def test_reads_the_facts_of_a_tiny_llama(tiny_gguf: Path) -> None:
    info = read_gguf_metadata(tiny_gguf)
    s = TinyLlamaShape
    assert info.architecture == "llama"
    assert info.name == "tiny-llama"
    assert info.context_length == 512
    assert info.block_count == s.layers
    assert info.head_count == s.heads
    assert info.head_count_kv == s.kv_heads
    assert info.embedding_length == s.hidden
    assert info.expert_count is None and info.expert_used_count is None
    assert info.file_type == 0 and info.quantization == "F32"


def test_parameter_count_is_exact(tiny_gguf: Path) -> None:
    reference = sum(math.prod(int(d) for d in t.shape) for t in gguf.GGUFReader(tiny_gguf).tensors)
    assert read_gguf_metadata(tiny_gguf).parameter_count == expected_tiny_parameters() == reference


def test_kv_matches_the_reference_reader_for_scalars_and_strings(tiny_gguf: Path) -> None:
    info = read_gguf_metadata(tiny_gguf)
    reader = gguf.GGUFReader(tiny_gguf)
    scalars = {
        name: field.contents() for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert scalars  # the comparison below must compare something
    for name, value in scalars.items():
        assert info.kv[name] == pytest.approx(value) if isinstance(value, float) else info.kv[name] == value, name
    assert "tokenizer.ggml.tokens" not in info.kv
    assert "tokenizer.ggml.token_type" not in info.kv  # one entry per token: too long to keep


def test_to_dict_is_camel_case_and_omits_unknowns(tiny_gguf: Path) -> None:
    d = read_gguf_metadata(tiny_gguf).to_dict()
    assert d == {
        "architecture": "llama", "name": "tiny-llama", "parameters": expected_tiny_parameters(),
        "contextLength": 512, "layers": 2, "heads": 4, "kvHeads": 2, "embeddingLength": 64, "quantization": "F32",
        "reasoning": False,  # it has a chat template, and no thinking mode in it
    }


def test_f16_tensors_count_the_same(tmp_path: Path) -> None:
    info = read_gguf_metadata(write_tiny_llama_gguf(tmp_path / "m.gguf", dtype="f16"))
    assert info.parameter_count == expected_tiny_parameters()
    assert info.quantization == "F16"


def test_the_tiny_llama_stays_small(tiny_gguf: Path) -> None:
    assert tiny_gguf.stat().st_size < 2 * 1024 * 1024


def test_writes_are_deterministic(tmp_path: Path) -> None:
    a = write_tiny_llama_gguf(tmp_path / "a.gguf").read_bytes()
    assert a == write_tiny_llama_gguf(tmp_path / "b.gguf").read_bytes()
    assert a != write_tiny_llama_gguf(tmp_path / "c.gguf", seed=1).read_bytes()


def test_every_value_type_round_trips(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_uint8("t.u8", 250)
        w.add_int8("t.i8", -5)
        w.add_uint16("t.u16", 65000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_float32("t.f32", 1.5)
        w.add_bool("t.bool", True)
        w.add_string("t.str", "héllo")
        w.add_uint64("t.u64", 2**63 + 1)
        w.add_int64("t.i64", -(2**62))
        w.add_float64("t.f64", 0.1)
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.strs", ["a", "bc"])
        w.add_array("t.nested", [[1, 2], [3]])
        w.add_string("t.after", "still aligned")

    info = read_gguf_metadata(write_gguf(tmp_path / "types.gguf", build))
    kv = info.kv
    assert (kv["t.u8"], kv["t.i8"], kv["t.u16"], kv["t.i16"]) == (250, -5, 65000, -30000)
    assert (kv["t.u32"], kv["t.i32"], kv["t.u64"], kv["t.i64"]) == (4_000_000_000, -2_000_000_000, 2**63 + 1, -(2**62))
    assert kv["t.f32"] == 1.5 and kv["t.f64"] == 0.1
    assert kv["t.bool"] is True
    assert kv["t.str"] == "héllo"
    assert kv["t.ints"] == [1, 2, 3] and kv["t.strs"] == ["a", "bc"]
    assert "t.nested" not in kv  # walked over, not kept
    assert kv["t.after"] == "still aligned"


def test_per_layer_head_counts_take_the_maximum(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_block_count(4)
        w.add_head_count([8, 8, 0, 12])
        w.add_head_count_kv([2, 4, 0, 4])
        w.add_expert_count(8)
        w.add_expert_used_count(2)

    info = read_gguf_metadata(write_gguf(tmp_path / "m.gguf", build))
    assert (info.head_count, info.head_count_kv) == (12, 4)
    assert (info.expert_count, info.expert_used_count) == (8, 2)


def test_long_per_layer_head_counts_are_still_seen(tmp_path: Path) -> None:
    heads = [32] * 100 + [48]

    def build(w: gguf.GGUFWriter) -> None:
        w.add_head_count(heads)

    info = read_gguf_metadata(write_gguf(tmp_path / "m.gguf", build))
    assert info.head_count == 48
    assert "llama.attention.head_count" not in info.kv  # longer than what kv keeps


def test_big_tokenizer_arrays_are_skipped_not_kept(tmp_path: Path) -> None:
    n = 50_000

    def build(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"tok{i}" for i in range(n)])
        w.add_token_scores([float(i) for i in range(n)])
        w.add_token_types([1] * n)
        w.add_token_merges([f"t {i}" for i in range(n)])
        w.add_array("t.kept64", [f"s{i}" for i in range(64)])
        w.add_array("t.skipped65", [f"s{i}" for i in range(65)])
        w.add_string("general.name", "after the arrays")
        w.add_context_length(4096)

    path = write_gguf(tmp_path / "vocab.gguf", build, tensors={"a": np.zeros((3, 5), np.float32)})
    tracemalloc.start()
    try:
        info = read_gguf_metadata(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # 100k decoded strings would take several MB; seeking over them takes a read buffer.
    assert peak < 1_000_000
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "t.skipped65"):
        assert key not in info.kv
    assert len(info.kv["t.kept64"]) == 64
    # Whatever follows the skipped arrays was read from the right offsets.
    assert info.name == "after the arrays" and info.context_length == 4096
    assert info.kv["tokenizer.ggml.model"] == "gpt2"
    assert info.parameter_count == 15


def test_huge_strings_are_skipped(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_string("tokenizer.huggingface.json", "x" * (2 << 20))
        w.add_name("big")

    info = read_gguf_metadata(write_gguf(tmp_path / "m.gguf", build))
    assert "tokenizer.huggingface.json" not in info.kv and info.name == "big"


# ---------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("file_type", [0, 1, 2, 7, 10, 15, 18, 30, 32, 38])
def test_quantization_comes_from_file_type(tmp_path: Path, file_type: int) -> None:
    # The file name says something else on purpose: file_type wins.
    info = read_gguf_metadata(write_tiny_llama_gguf(tmp_path / "m-Q2_K.gguf", file_type=file_type))
    assert info.file_type == file_type
    assert info.quantization == FILE_TYPE_NAMES[file_type]


def test_file_type_table_covers_llama_cpp_names() -> None:
    assert FILE_TYPE_NAMES[15] == "Q4_K_M" and FILE_TYPE_NAMES[7] == "Q8_0" and FILE_TYPE_NAMES[30] == "IQ4_XS"
    assert len(set(FILE_TYPE_NAMES.values())) == len(FILE_TYPE_NAMES)


def test_unknown_file_type_falls_back_to_the_file_name(tmp_path: Path) -> None:
    info = read_gguf_metadata(write_tiny_llama_gguf(tmp_path / "Model-IQ3_XXS.gguf", file_type=9999))
    assert info.file_type == 9999 and info.quantization == "IQ3_XXS"


def test_missing_file_type_falls_back_to_the_file_name(tmp_path: Path) -> None:
    info = read_gguf_metadata(write_gguf(tmp_path / "model.q5_k_s.gguf", lambda w: None))
    assert info.file_type is None and info.quantization == "Q5_K_S"
    assert "quantization" not in read_gguf_metadata(write_gguf(tmp_path / "plain.gguf", lambda w: None)).to_dict()


@pytest.mark.parametrize(("filename", "expected"), [
    ("Qwen3-8B-Q4_K_M.gguf", "Q4_K_M"),
    ("llama-2-7b.q8_0.gguf", "Q8_0"),
    ("Meta-Llama-3-8B-Instruct-IQ4_XS.gguf", "IQ4_XS"),
    ("ggml-model-f16.gguf", "F16"),
    ("gemma-2b-BF16.gguf", "BF16"),
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("Qwen3-30B-A3B-UD-Q4_K_XL-00001-of-00002.gguf", "Q4_K_XL"),
    ("model-IQ2_XXS.gguf", "IQ2_XXS"),
    ("model-iq4_nl.gguf", "IQ4_NL"),
    ("model-Q3_K_L.gguf", "Q3_K_L"),
    ("model-Q2_K.gguf", "Q2_K"),
    ("model-Q6_K.gguf", "Q6_K"),
    ("model-TQ1_0.gguf", "TQ1_0"),
    ("model-Q4_0_4_4.gguf", "Q4_0_4_4"),
    ("gpt-oss-20b-mxfp4.gguf", "MXFP4"),
    ("model-fp16.gguf", "F16"),
    ("/models/Q8_0/model-Q4_K_S.gguf", "Q4_K_S"),
    ("Qwen3-8B.gguf", None),
    ("Meta-Llama-3-8B.gguf", None),
    ("mq4_k_m.gguf", None),
    ("", None),
])
def test_quantization_from_filename(filename: str, expected: str | None) -> None:
    assert quantization_from_filename(filename) == expected


@pytest.mark.parametrize(("filename", "expected"), [
    ("Qwen3-235B-Q4_K_M-00001-of-00003.gguf", (1, 3)),
    ("/x/y/model-00003-of-00003.GGUF", (3, 3)),
    ("model-00004-of-00003.gguf", None),
    ("model-00000-of-00003.gguf", None),
    ("model-1-of-3.gguf", None),
    ("model.gguf", None),
    ("model-00001-of-00002.safetensors", None),
])
def test_split_info(filename: str, expected: tuple[int, int] | None) -> None:
    assert split_info(filename) == expected


# ---------------------------------------------------------------------------------------------- bad files


def test_is_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    (tmp_path / "text.gguf").write_text("hello world")
    (tmp_path / "short").write_bytes(b"GG")
    (tmp_path / "empty").write_bytes(b"")
    assert is_gguf(tiny_gguf)
    assert not is_gguf(tmp_path / "text.gguf")
    assert not is_gguf(tmp_path / "short")
    assert not is_gguf(tmp_path / "empty")
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)  # a directory


def test_a_non_gguf_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model")
    with pytest.raises(GGUFError, match=r"notes\.gguf: not a GGUF file"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_are_refused(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    body = rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
    path = tmp_path / "random.gguf"
    # Half the cases carry a valid magic and version so the parser goes past the first check.
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + body if seed % 2 else body)
    with pytest.raises(GGUFError, match="random.gguf"):
        read_gguf_metadata(path)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf_metadata(tmp_path / "nope.gguf")


# Cuts inside the fixed header, inside the metadata, and from the end of the header (where tensor data starts).
@pytest.mark.parametrize("cut", [0, 3, 4, 7, 8, 15, 16, 23, 24, 25, 40, 100, 1000, 3000, "-200", "-1", "-0"])
def test_truncated_files_raise_gguf_error(tmp_path: Path, tiny_bytes: bytes, data_offset: int, cut: int | str) -> None:
    end = data_offset + int(cut) if isinstance(cut, str) else cut
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes[:end])
    with pytest.raises(GGUFError, match=r"cut\.gguf: .*truncated"):
        read_gguf_metadata(path)


def test_truncation_message_names_the_offset(tmp_path: Path, tiny_bytes: bytes) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_bytes[:20])
    with pytest.raises(GGUFError) as exc:
        read_gguf_metadata(path)
    assert str(exc.value) == f"{path}: truncated GGUF header (wanted 8 bytes at offset 16)"


def test_a_download_cut_inside_the_tensor_data_is_refused(tmp_path: Path, tiny_bytes: bytes) -> None:
    path = tmp_path / "partial.gguf"
    path.write_bytes(tiny_bytes[: len(tiny_bytes) // 2])
    with pytest.raises(GGUFError, match="tensor data"):
        read_gguf_metadata(path)


def test_version_2_reads_like_version_3(tmp_path: Path, tiny_bytes: bytes) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(tiny_bytes[:4] + struct.pack("<I", 2) + tiny_bytes[8:])
    assert read_gguf_metadata(path).parameter_count == expected_tiny_parameters()


@pytest.mark.parametrize(("version", "message"), [
    (struct.pack("<I", 1), "unsupported GGUF version 1"),
    (struct.pack("<I", 4), "unsupported GGUF version 4"),
    (struct.pack(">I", 3), "big-endian"),
    (struct.pack(">I", 2), "big-endian"),
])
def test_other_versions_are_refused(tmp_path: Path, tiny_bytes: bytes, version: bytes, message: str) -> None:
    path = tmp_path / "v.gguf"
    path.write_bytes(tiny_bytes[:4] + version + tiny_bytes[8:])
    with pytest.raises(GGUFError, match=message):
        read_gguf_metadata(path)


def test_a_real_big_endian_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("t", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf_metadata(path)


def _kv_offset(data: bytes, key: str) -> int:
    """Offset of the value type that follows `key` in the metadata."""
    raw = key.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at + 8 + len(raw)


def test_an_absurd_string_length_cannot_allocate(tmp_path: Path, tiny_bytes: bytes) -> None:
    at = _kv_offset(tiny_bytes, "general.name") + 4  # past the value type: the string's length
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_bytes[:at] + struct.pack("<Q", 2**62) + tiny_bytes[at + 8:])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_metadata(path)


def test_an_absurd_array_count_cannot_loop(tmp_path: Path, tiny_bytes: bytes) -> None:
    at = _kv_offset(tiny_bytes, "tokenizer.ggml.tokens") + 4 + 4  # past value type and item type: the count
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_bytes[:at] + struct.pack("<Q", 2**63) + tiny_bytes[at + 8:])
    with pytest.raises(GGUFError, match="past end of file"):
        read_gguf_metadata(path)


def test_an_absurd_tensor_count_is_refused(tmp_path: Path, tiny_bytes: bytes) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_bytes[:8] + struct.pack("<Q", 2**40) + tiny_bytes[16:])
    with pytest.raises(GGUFError, match="cannot fit"):
        read_gguf_metadata(path)


def test_an_unknown_value_type_is_refused(tmp_path: Path, tiny_bytes: bytes) -> None:
    at = _kv_offset(tiny_bytes, "general.name")
    path = tmp_path / "m.gguf"
    path.write_bytes(tiny_bytes[:at] + struct.pack("<I", 13) + tiny_bytes[at + 4:])
    with pytest.raises(GGUFError, match="unknown GGUF value type 13 for key 'general.name'"):
        read_gguf_metadata(path)


def test_deeply_nested_arrays_are_refused(tmp_path: Path) -> None:
    # kv_count 1, key "k", then 100 levels of "array of 1 array", ending in an empty u8 array.
    body = struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
    body += (struct.pack("<IQ", 9, 1)) * 100 + struct.pack("<IQ", 0, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(GGUFError, match="nested"):
        read_gguf_metadata(path)


@settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    keep=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_headers_only_ever_raise_gguf_error(
    tmp_path: Path, tiny_bytes: bytes, data_offset: int, edits: list[tuple[float, int]], keep: float | None
) -> None:
    data = bytearray(tiny_bytes[:data_offset + 64])  # the header plus a little tensor data is plenty
    for where, value in edits:
        data[int(where * data_offset)] = value
    if keep is not None:
        data = data[: int(keep * len(data))]
    path = tmp_path / "mutant.gguf"
    path.write_bytes(bytes(data))
    try:
        info = read_gguf_metadata(path)
    except GGUFError as exc:
        assert str(exc).startswith(f"{path}: ")
    else:
        assert isinstance(info, GGUFInfo) and info.parameter_count >= 0


# ---------------------------------------------------------------------------------------------- Hub prefixes


def test_the_head_reader_is_the_file_reader_on_the_first_bytes(tiny_gguf: Path, tiny_bytes: bytes,
                                                                data_offset: int) -> None:
    info = read_gguf_metadata(tiny_gguf)
    head = read_gguf_head(tiny_bytes[:data_offset], name="org/Tiny: tiny.gguf", size=len(tiny_bytes))
    assert {k: head[k] for k in info.kv} == info.kv
    assert head["llama.block_count"] == info.block_count and head["tokenizer.chat_template"] == info.chat_template


@settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    keep=st.floats(0, 1),
)
def test_mutated_prefixes_only_ever_need_more_bytes_or_raise_gguf_error(
    tiny_bytes: bytes, data_offset: int, edits: list[tuple[float, int]], keep: float
) -> None:
    data = bytearray(tiny_bytes[:data_offset])
    for where, value in edits:
        data[int(where * data_offset)] = value
    prefix = bytes(data[: int(keep * len(data))])
    try:
        values = read_gguf_head(prefix, name="org/Repo: m.gguf", size=len(tiny_bytes))
    except GGUFIncomplete as exc:
        assert exc.needed > len(prefix) and isinstance(exc.values, dict)
    except GGUFError as exc:
        assert str(exc).startswith("org/Repo: m.gguf: ")
    else:
        assert isinstance(values, dict)


# ---------------------------------------------------------------------------------------------- HF cache


def test_a_gguf_repo_in_the_hf_cache_is_scanned_cleanly_and_readable(tmp_path: Path) -> None:
    path = add_gguf_repo(tmp_path, "tiny-org/Tiny-Llama-GGUF", "tiny-llama-Q8_0.gguf", file_type=7)
    report = scan_cache_dir(tmp_path / "hub")
    assert report.warnings == []
    (repo,) = report.repos
    assert repo.repo_id == "tiny-org/Tiny-Llama-GGUF" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == {"tiny-llama-Q8_0.gguf", "README.md"}
    assert path.is_symlink() and not os.readlink(path).startswith("/")
    info = read_gguf_metadata(path)
    assert info.quantization == "Q8_0" and info.parameter_count == expected_tiny_parameters()
