"""MLX directory reading, and the Hugging Face cache layout the fixtures build."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import scan_cache_dir

from athanor.discovery.mlx import MLXConfigError, is_mlx_dir, read_mlx_config
from fixtures.tiny_models import (
    TinyLlamaShape,
    add_gguf_repo,
    add_mlx_repo,
    byte_level_vocab,
    make_hf_cache,
    snapshot_dir,
    write_safetensors,
    write_tiny_llama_gguf,
    write_tiny_mlx_llama,
)


def expected_parameters(*, tied: bool = False) -> int:
    """The llama's parameter count from its shapes: what a quantized copy must also report."""
    s = TinyLlamaShape
    vocab = len(byte_level_vocab()[0])
    hd = s.head_dim()
    per_layer = 2 * s.hidden + 2 * s.hidden * s.heads * hd + 2 * s.hidden * s.kv_heads * hd + 3 * s.hidden * s.ffn
    return (1 if tied else 2) * vocab * s.hidden + s.hidden + s.layers * per_layer


def test_plain_mlx_dir(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    assert is_mlx_dir(directory)
    info = read_mlx_config(directory)
    s = TinyLlamaShape
    assert info.model_type == "llama"
    assert info.architectures == ["LlamaForCausalLM"]
    assert (info.context_length, info.layers, info.heads, info.kv_heads) == (256, s.layers, s.heads, s.kv_heads)
    assert (info.hidden_size, info.vocab_size) == (s.hidden, len(byte_level_vocab()[0]))
    assert info.quantization is None and info.bits is None and info.vision is False
    assert info.parameter_count == expected_parameters()
    assert info.to_dict() == {
        "modelType": "llama", "architectures": ["LlamaForCausalLM"], "contextLength": 256, "layers": 2,
        "heads": 4, "kvHeads": 2, "hiddenSize": 64, "parameters": expected_parameters(), "vision": False,
        "keyLength": 16, "valueLength": 16, "reasoning": False,  # its chat template has no thinking mode
    }


def test_a_thinking_chat_template_gives_the_reasoning_capability(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if enable_thinking %}<think>{% endif %}{{ messages[0].content }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_mlx_config(directory).to_dict()["reasoning"] is True
    (directory / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                                 if k != "chat_template"}))
    assert "reasoning" not in read_mlx_config(directory).to_dict(), "no template: unknown, not False"


def test_reading_config_json_directly_gives_the_same(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    assert read_mlx_config(directory / "config.json") == read_mlx_config(directory)


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    info = read_mlx_config(write_tiny_mlx_llama(tmp_path / "m", tie_word_embeddings=True))
    assert info.parameter_count == expected_parameters(tied=True)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantized_dirs_count_unpacked_parameters(tmp_path: Path, bits: int) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "q", quantized_bits=bits)
    info = read_mlx_config(directory)
    assert info.bits == bits
    assert info.quantization == {"group_size": 64, "bits": bits}
    assert info.to_dict()["quantization"] == f"{bits}bit"
    assert info.parameter_count == expected_parameters()
    # ...while the file itself really holds packed weights.
    assert (directory / "model.safetensors").stat().st_size < (
        (write_tiny_mlx_llama(tmp_path / "f") / "model.safetensors").stat().st_size
    )


def test_per_layer_bits_overrides_are_honoured(tmp_path: Path) -> None:
    # A mixed-precision recipe: one module at 8 bits, the other at the default 4.
    rng = np.random.default_rng(0)
    weights = {
        "a.weight": rng.integers(0, 2**32, (16, 128 * 4 // 32), dtype=np.uint32),
        "a.scales": np.ones((16, 2), np.float16),
        "a.biases": np.zeros((16, 2), np.float16),
        "b.weight": rng.integers(0, 2**32, (16, 128 * 8 // 32), dtype=np.uint32),
        "b.scales": np.ones((16, 2), np.float16),
        "b.biases": np.zeros((16, 2), np.float16),
        "b.bias": np.zeros(16, np.float16),  # a real (unquantized) bias is a parameter
        "norm.weight": np.ones(128, np.float16),
    }
    write_safetensors(tmp_path / "model.safetensors", weights)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama",
        "quantization": {"group_size": 64, "bits": 4, "b": {"group_size": 64, "bits": 8}},
    }))
    info = read_mlx_config(tmp_path)
    assert info.parameter_count == 16 * 128 * 2 + 16 + 128
    assert info.quantization == {"group_size": 64, "bits": 4}  # the override is not a top-level setting


def test_quantized_weights_without_bits_give_no_estimate(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "q", quantized_bits=4)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization"]
    (directory / "config.json").write_text(json.dumps(config))
    info = read_mlx_config(directory)
    assert info.parameter_count is None and info.bits is None
    assert "parameters" not in info.to_dict()


def test_quantization_config_block_is_read_too(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "q", quantized_bits=4)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = config.pop("quantization")
    (directory / "config.json").write_text(json.dumps(config))
    info = read_mlx_config(directory)
    assert info.bits == 4 and info.parameter_count == expected_parameters()


def test_sharded_weights_are_summed(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": np.zeros((3, 4), np.float16)})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": np.zeros(5, np.float32)},
                      metadata={"format": "pt"})
    (tmp_path / "config.json").write_text("{}")
    assert read_mlx_config(tmp_path).parameter_count == 17


def test_duplicate_consolidated_weights_are_not_counted_twice(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    (directory / "consolidated.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    assert read_mlx_config(directory).parameter_count == expected_parameters()


def test_weights_under_other_names_still_count(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "weights.safetensors", {"a": np.zeros((2, 2), np.float32)})
    (tmp_path / "config.json").write_text("{}")
    assert read_mlx_config(tmp_path).parameter_count == 4


def test_vision_dir(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "v", vision=True)
    info = read_mlx_config(directory)
    assert info.vision is True and info.model_type == "qwen2_vl"
    assert info.to_dict()["vision"] is True
    assert is_mlx_dir(directory)


def test_vision_by_model_type_with_text_config(tmp_path: Path) -> None:
    # gemma3-style: the language model's numbers live in text_config.
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {"max_position_embeddings": 131072, "num_hidden_layers": 34, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "hidden_size": 2560, "vocab_size": 262208},
    }))
    info = read_mlx_config(tmp_path)
    assert info.vision is True
    assert (info.context_length, info.layers, info.heads, info.kv_heads) == (131072, 34, 8, 4)
    assert (info.hidden_size, info.vocab_size) == (2560, 262208)
    assert info.parameter_count is None  # no weights here


def test_text_only_model_is_not_vision(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "num_attention_heads": 8, "vision_config": None,
    }))
    info = read_mlx_config(tmp_path)
    assert info.vision is False
    assert info.kv_heads == 8  # defaults to heads


def test_config_values_of_the_wrong_type_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": 3, "architectures": "LlamaForCausalLM", "num_hidden_layers": "2", "num_attention_heads": True,
        "quantization": {"bits": "4"},
    }))
    info = read_mlx_config(tmp_path)
    assert info.model_type is None and info.architectures == []
    assert info.layers is None and info.heads is None and info.bits is None


def test_malformed_config_names_path_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(MLXConfigError) as exc:
        read_mlx_config(tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: invalid JSON")
    assert "line 3 column 18" in message
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"llama"', b"\xff\xfe{}"])
def test_config_that_is_not_a_json_object_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(MLXConfigError, match="config.json"):
        read_mlx_config(tmp_path)


def test_missing_config_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_mlx_config(tmp_path)


def _with_length(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("header", [
    b"",  # empty file
    struct.pack("<Q", 10**12) + b"{}",  # header longer than the file
    _with_length(b"{nope"),  # not JSON
    _with_length(b"[]"),  # not an object
    _with_length(b'{"a":{"shape":[-1],"dtype":"F32","data_offsets":[0,0]}}'),  # negative dimension
    _with_length(b'{"a":"x"}'),  # entry is not an object
    _with_length(b'{"a":{"dtype":"F32"}}'),  # no shape
])
def test_a_corrupt_weight_header_only_loses_the_estimate(tmp_path: Path, header: bytes) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    (directory / "model-extra.safetensors").write_bytes(header)
    info = read_mlx_config(directory)
    assert info.parameter_count is None and info.layers == TinyLlamaShape.layers


def test_is_mlx_dir_refuses_what_mlx_lm_cannot_load(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    assert not is_mlx_dir(directory / "config.json")
    assert not is_mlx_dir(tmp_path / "missing")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    assert not is_mlx_dir(tmp_path / "no-weights")
    (tmp_path / "no-config").mkdir()
    write_safetensors(tmp_path / "no-config" / "model.safetensors", {"a": np.zeros(2, np.float32)})
    assert not is_mlx_dir(tmp_path / "no-config")
    write_tiny_llama_gguf(directory / "model.gguf")
    assert not is_mlx_dir(directory)


def test_safetensors_writer_follows_the_format(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.arange(3, dtype=np.uint32)}
    raw = write_safetensors(tmp_path / "x.safetensors", arrays, {"format": "mlx"}).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    assert header["__metadata__"] == {"format": "mlx"}
    assert header["a"] == {"dtype": "U32", "shape": [3], "data_offsets": [0, 12]}
    assert header["b"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]}
    assert len(data) == 36
    assert np.array_equal(np.frombuffer(data[12:36], "<f4").reshape(2, 3), arrays["b"])


def test_tokenizer_files_agree_with_the_config(tmp_path: Path) -> None:
    directory = write_tiny_mlx_llama(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    ids = set(tokenizer["model"]["vocab"].values()) | {t["id"] for t in tokenizer["added_tokens"]}
    assert ids == set(range(config["vocab_size"]))
    vocab = tokenizer["model"]["vocab"]
    for merge in tokenizer["model"]["merges"]:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    eos = tokenizer_config["eos_token"]
    assert {t["content"]: t["id"] for t in tokenizer["added_tokens"]}[eos] == config["eos_token_id"]


# ---------------------------------------------------------------------------------------------- HF cache


def test_hf_cache_layout_is_accepted_by_scan_cache_dir(tmp_path: Path) -> None:
    model_dir = add_mlx_repo(tmp_path, "mlx-community/Tiny-Llama-4bit", quantized_bits=4)
    add_gguf_repo(tmp_path, "tiny-org/Tiny-GGUF")
    hub = make_hf_cache(tmp_path, {"tiny-org/plain": {
        "README.md": b"same bytes",
        "docs/copy.md": b"same bytes",  # nested path, content shared with README.md
        "nested/deeper/file.txt": lambda p: p.write_text("written by a callable"),
        "from-path.bin": tmp_path / "hub" / "models--tiny-org--Tiny-GGUF" / "refs" / "main",
    }})
    assert hub == tmp_path / "hub"

    report = scan_cache_dir(hub)
    assert report.warnings == []
    repos = {r.repo_id: r for r in report.repos}
    assert set(repos) == {"mlx-community/Tiny-Llama-4bit", "tiny-org/Tiny-GGUF", "tiny-org/plain"}
    plain = repos["tiny-org/plain"]
    (revision,) = plain.revisions
    assert revision.refs == frozenset({"main"})
    assert {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files} == {
        "README.md", "docs/copy.md", "nested/deeper/file.txt", "from-path.bin",
    }
    assert len(list((plain.repo_path / "blobs").iterdir())) == 3  # identical contents share one blob
    assert len(revision.commit_hash) == 40 and int(revision.commit_hash, 16) >= 0

    for f in revision.files:
        link = os.readlink(f.file_path)
        assert not link.startswith("/") and f.file_path.resolve().parent == plain.repo_path / "blobs"
    assert (revision.snapshot_path / "nested/deeper/file.txt").read_text() == "written by a callable"

    mlx_repo = repos["mlx-community/Tiny-Llama-4bit"]
    assert {f.file_name for f in next(iter(mlx_repo.revisions)).files} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    }
    # Discovery reads straight through the snapshot symlinks.
    assert is_mlx_dir(model_dir)
    info = read_mlx_config(model_dir)
    assert info.bits == 4 and info.parameter_count == expected_parameters()


def test_hf_cache_is_deterministic_and_can_be_added_to(tmp_path: Path) -> None:
    first = make_hf_cache(tmp_path / "a", {"org/x": {"f": b"1"}})
    second = make_hf_cache(tmp_path / "b", {"org/x": {"f": b"1"}})
    assert snapshot_dir(first, "org/x").name == snapshot_dir(second, "org/x").name
    make_hf_cache(tmp_path / "a", {"org/x": {"f": b"2"}})  # a new revision becomes main
    assert (snapshot_dir(first, "org/x") / "f").read_bytes() == b"2"
    report = scan_cache_dir(first)
    assert report.warnings == []
    (repo,) = report.repos
    assert len(repo.revisions) == 2
