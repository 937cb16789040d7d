"""Untrusted model metadata stays bounded: GGUF heads and config.json files from the Hub (the fake hub, with the real
huggingface_hub client) and from disk, read by the one GGUF reader and the shape reader with one set of limits.
Every failure is athanor's own one-line error naming the file or repo, and search, ``athanor fit REPO`` and pull
answer with an unknown shape instead of crashing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from fixtures.fake_hub import FakeHub, HubFile, HubRepo, gguf_header, tiny_mlx_files

from athanor import hub
from athanor.discovery import gguf as reader
from athanor.discovery.gguf import GGUFError, GGUFIncomplete, read_gguf_head, read_gguf_metadata
from athanor.discovery.mlx import MLXConfigError, read_mlx_config
from athanor.errors import MetadataError
from athanor.fit import estimate_meta
from athanor.fit._shape import MAX_LAYERS, read_shape
from athanor.hub import _client
from athanor.hub._header import HEAD_BYTES

MiB = 2**20
NESTED = "athanor-test/Nested-GGUF"
DEEP_MLX = "athanor-test/Deep-Config-4bit"


# ---------------------------------------------------------------------------------------------- crafted bytes


def _key(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_string(name: str, value: str) -> bytes:
    raw = value.encode()
    return _key(name) + struct.pack("<IQ", 8, len(raw)) + raw


def kv_u32(name: str, value: int) -> bytes:
    return _key(name) + struct.pack("<II", 4, value)


def kv_nested(name: str, depth: int) -> bytes:
    """`depth` levels of "an array of one array", ending in an empty u8 array."""
    return _key(name) + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 0, 0)


def gguf_bytes(*pairs: bytes, kv_count: int | None = None, tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(pairs) if kv_count is None else kv_count) + b"".join(pairs)


LLAMA_KEYS = (kv_string("general.architecture", "llama"), kv_u32("llama.block_count", 32),
              kv_u32("llama.attention.head_count", 32), kv_u32("llama.attention.head_count_kv", 8),
              kv_u32("llama.embedding_length", 4096))


def nested_head(depth: int = 5000) -> bytes:
    """A GGUF head whose last key nests arrays `depth` deep: a RecursionError for a reader without a depth limit."""
    return gguf_bytes(*LLAMA_KEYS, kv_nested("crafted", depth))


def long_tokenizer_head(tmp_path: Path) -> bytes:
    """A real GGUF (the reference writer) whose architecture keys come first and whose vocabulary runs far past
    the Hub head's HEAD_BYTES, as in files llama.cpp's converter writes."""
    path = tmp_path / "long-vocab.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    writer.add_block_count(36)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_embedding_length(4096)
    writer.add_context_length(40960)
    writer.add_token_list([f"token-{i:06d}" for i in range(60000)])
    writer.add_tensor("t", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def mlx_repo(repo_id: str, config: bytes) -> HubRepo:
    files = {**tiny_mlx_files(4), "config.json": HubFile(config)}
    return HubRepo(repo_id, files, tags=["mlx", "llama", "4-bit"], library_name="mlx")


def huge_layer_config() -> bytes:
    config = json.loads(tiny_mlx_files(4)["config.json"].data)
    return json.dumps({**config, "num_hidden_layers": 10**12}).encode()


# ---------------------------------------------------------------------------------------------- the one reader


def both_ways(tmp_path: Path, data: bytes) -> tuple[Exception | None, Exception | None]:
    """What the reader says about `data` as a whole file on disk, and as the Hub's prefix of a file that size."""
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    errors: list[Exception | None] = []
    for read in (lambda: read_gguf_metadata(path), lambda: read_gguf_head(data, name=str(path), size=len(data))):
        try:
            read()
        except MetadataError as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors[0], errors[1]


@pytest.mark.parametrize(("data", "message"), [
    (nested_head(), f"arrays nested deeper than {reader.MAX_ARRAY_DEPTH} for key 'crafted'"),
    (gguf_bytes(*LLAMA_KEYS, kv_count=reader.MAX_KEYS + 1) + bytes(24 * reader.MAX_KEYS),
     f"{reader.MAX_KEYS + 1} metadata keys (the limit is {reader.MAX_KEYS})"),
    (gguf_bytes(_key("k" * (reader.MAX_KEY_BYTES + 1)) + struct.pack("<II", 4, 1)),
     f"metadata key of {reader.MAX_KEY_BYTES + 1} bytes"),
    (gguf_bytes(_key("big") + struct.pack("<IIQ", 9, 0, reader.MAX_ARRAY_LENGTH + 1))
     + bytes(reader.MAX_ARRAY_LENGTH + 1),
     f"array of {reader.MAX_ARRAY_LENGTH + 1} items for key 'big'"),
    (b"<html>not a model</html>", "not a GGUF file"),
], ids=["depth", "keys", "key-length", "array-length", "not-gguf"])
def test_files_on_disk_and_hub_prefixes_meet_the_same_limits(tmp_path, data, message):
    on_disk, prefix = both_ways(tmp_path, data)
    for exc in (on_disk, prefix):
        assert isinstance(exc, GGUFError) and str(exc).startswith(f"{tmp_path / 'crafted.gguf'}: ")
        assert message in str(exc) and "\n" not in str(exc)


def test_a_header_larger_than_the_limit_is_refused_on_disk_and_from_the_hub(tmp_path):
    skipped = reader.MAX_HEADER_BYTES  # one string that alone is the whole allowance
    data = gguf_bytes(*LLAMA_KEYS, _key("blob") + struct.pack("<IQ", 8, skipped)) + bytes(skipped)
    on_disk, prefix = both_ways(tmp_path, data)
    assert isinstance(on_disk, GGUFError) and isinstance(prefix, GGUFError) and str(on_disk) == str(prefix)
    assert f"GGUF header larger than {reader.MAX_HEADER_BYTES} bytes" in str(on_disk)


def test_a_prefix_that_ends_inside_the_header_needs_more_bytes_and_is_not_malformed(tmp_path):
    data = long_tokenizer_head(tmp_path)
    head = data[:HEAD_BYTES]
    with pytest.raises(GGUFIncomplete) as short:
        read_gguf_head(head, name="org/Repo: long.gguf", size=len(data))
    assert short.value.needed > HEAD_BYTES
    assert str(short.value).startswith("org/Repo: long.gguf: the first 262144 bytes end inside the GGUF header")
    assert short.value.values["qwen3.block_count"] == 36 and "tokenizer.ggml.tokens" not in short.value.values
    assert not isinstance(short.value, GGUFError)
    # The same bytes as a whole file are a truncated one: malformed.
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_head(head, name="org/Repo: long.gguf", size=HEAD_BYTES)
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_metadata(tmp_path / "cut.gguf")
    # Enough bytes: every key, the long vocabulary skipped (it is not metadata anyone reads).
    values = read_gguf_head(data, name="org/Repo: long.gguf", size=len(data))
    assert values["qwen3.block_count"] == 36 and "tokenizer.ggml.tokens" not in values


def test_a_deeply_nested_local_mlx_config_is_a_metadata_error(tmp_path):
    model = tmp_path / "deep-mlx"
    model.mkdir()
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MLXConfigError, match="config.json: ") as err:
        read_mlx_config(model)
    assert isinstance(err.value, MetadataError) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- the shape


def test_an_implausible_layer_count_is_an_unknown_shape_not_a_memory_error():
    config = {"model_type": "llama", "num_hidden_layers": 10**12, "num_attention_heads": 32,
              "num_key_value_heads": 8, "hidden_size": 4096, "max_position_embeddings": 4096}
    shape = read_shape(config)
    assert shape.layers == () and shape.problem == (f"num_hidden_layers {10**12} is not a plausible layer count "
                                                    f"(at most {MAX_LAYERS})")
    estimate = estimate_meta(config, weights_bytes=1, runtime="mlx-lm", context=4096)
    assert estimate.kv_cache == 0
    facts = {"architecture": "llama", "layers": 2 * 10**6, "heads": 32, "kvHeads": 8, "embeddingLength": 4096}
    assert read_shape(facts).problem and estimate_meta(facts, weights_bytes=1, runtime="llama-server",
                                                       context=4096).kv_cache == 0


def test_layer_patterns_are_counted_without_one_entry_per_layer():
    gemma = {"general.architecture": "gemma3", "gemma3.block_count": MAX_LAYERS, "gemma3.attention.head_count": 8,
             "gemma3.attention.head_count_kv": 4, "gemma3.attention.key_length": 256,
             "gemma3.attention.value_length": 256, "gemma3.attention.sliding_window": 1024,
             "gemma3.embedding_length": 2560}
    shape = read_shape(gemma)
    assert len(shape.layers) == 2  # the global layers, and the windowed ones: two groups, not MAX_LAYERS entries
    assert {(g.count, g.window) for g in shape.layers} == {(MAX_LAYERS // 6, None),
                                                           (MAX_LAYERS - MAX_LAYERS // 6, 1024)}
    per_token = 4 * 256 * 2 * 2
    assert estimate_meta(gemma, weights_bytes=1, runtime="mlx-lm", context=4096).kv_cache == per_token * (
        MAX_LAYERS // 6 * 4096 + (MAX_LAYERS - MAX_LAYERS // 6) * 1024)


# ---------------------------------------------------------------------------------------------- the Hub


@pytest.fixture
def crafted(fake_hub: FakeHub) -> FakeHub:
    fake_hub.add(HubRepo(NESTED, {"Nested-Q4_K_M.gguf": HubFile(nested_head(), size=3 * 10**9)}, library_name="gguf",
                         gguf={"total": 7_000_000_000, "architecture": "llama"}))
    fake_hub.add(mlx_repo(DEEP_MLX, huge_layer_config()))
    return fake_hub


def test_search_gives_a_crafted_gguf_head_a_row_with_an_unknown_shape(crafted):
    [row] = hub.search("Nested")
    assert (row.repo, row.quant, row.size_bytes) == (NESTED, "Q4_K_M", 3 * 10**9)
    assert not read_shape(row.meta).layers and row.fit in hub.BANDS
    assert row.shape_problem == (f"{NESTED}: Nested-Q4_K_M.gguf: arrays nested deeper than {reader.MAX_ARRAY_DEPTH} "
                                 "for key 'crafted'")
    assert row.to_json()["shapeProblem"] == row.shape_problem


def test_a_config_with_10_to_the_12_layers_is_a_row_with_an_unknown_shape(crafted):
    row = hub.repo_row(DEEP_MLX)
    assert (row.format, row.quant) == ("mlx", "4bit") and not read_shape(row.meta).layers
    assert row.shape_problem == (f"{DEEP_MLX}: config.json: num_hidden_layers {10**12} is not a plausible layer "
                                 f"count (at most {MAX_LAYERS})")


def test_a_deeply_nested_config_json_on_the_hub_is_a_row_with_an_unknown_shape(fake_hub):
    fake_hub.add(mlx_repo("athanor-test/Nested-Config-4bit", b"[" * 100_000 + b"]" * 100_000))
    row = hub.repo_row("athanor-test/Nested-Config-4bit")
    assert row.format == "mlx" and not read_shape(row.meta).layers
    assert row.shape_problem.startswith("athanor-test/Nested-Config-4bit: config.json: ")


def test_the_head_of_a_long_header_still_gives_the_shape(fake_hub, tmp_path):
    data = long_tokenizer_head(tmp_path)
    fake_hub.add(HubRepo("t/Long-Vocab-GGUF", {"Long-Vocab-Q4_K_M.gguf": HubFile(data, size=5 * 10**9)},
                         library_name="gguf"))
    row = hub.repo_row("t/Long-Vocab-GGUF")
    assert row.shape_problem is None and row.meta["qwen3.block_count"] == 36
    assert [r.range for r in fake_hub.requests_to("/t/Long-Vocab-GGUF/resolve/", "GET")] == [
        f"bytes=0-{HEAD_BYTES - 1}"]


def _socket_buffers() -> int:
    """The most the kernel can hold between the fake hub's writes and the client's reads on loopback."""
    def most(name: str) -> int:
        return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[-1])

    return most("tcp_rmem") + most("tcp_wmem")


def test_a_server_that_ignores_range_is_read_only_as_far_as_the_head(fake_hub):
    bound = HEAD_BYTES + _socket_buffers() + MiB  # + one of the fake hub's writes
    size = 4 * bound
    fake_hub.add(HubRepo("t/Whole-GGUF", {"Whole-Q4_K_M.gguf": HubFile(gguf_header(), size=size)},
                         library_name="gguf"))
    fake_hub.ignore_range = True

    row = hub.repo_row("t/Whole-GGUF")

    assert row.meta["llama.block_count"] == 32 and row.shape_problem is None
    [get] = fake_hub.requests_to("/t/Whole-GGUF/resolve/", "GET")
    assert get.finished.wait(30)
    assert (get.status, get.range) == (200, f"bytes=0-{HEAD_BYTES - 1}")
    assert get.dropped and get.sent <= bound < size, "the client closed the connection once it had the head"

    fake_hub.clear_log()
    assert len(_client.read_head("t/Whole-GGUF", "Whole-Q4_K_M.gguf", "main", 4096)) == 4096
    [get] = fake_hub.requests_to("/t/Whole-GGUF/resolve/", "GET")
    assert get.finished.wait(30) and get.dropped and get.sent <= bound


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_search_and_fit_answer_for_a_crafted_head_and_an_implausible_config(crafted, cli):
    search = cli("search", "Nested", "-o", "json")
    assert search.returncode == 0, search.stderr
    [row] = json.loads(search.stdout)
    assert row["repo"] == NESTED and "arrays nested deeper than" in row["shapeProblem"]

    for repo in (NESTED, DEEP_MLX):
        fit = cli("fit", repo)
        assert fit.returncode == 0, fit.stderr
        lines = dict(line.split(":", 1) for line in fit.stdout.splitlines())
        assert lines["KV cache"].strip().startswith("unknown: ")
        assert lines["Model"].strip().startswith(f"{repo} (")
        assert fit.stderr == ""


def test_pull_of_a_crafted_head_registers_it_as_unreadable(fake_hub, cli):
    repo = "athanor-test/Nested-Small-GGUF"
    fake_hub.add(HubRepo(repo, {"Nested-Small-Q4_K_M.gguf": HubFile(nested_head())}, library_name="gguf"))
    result = cli("pull", repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "model/nested-small-q4-k-m pulled (58.8KiB)\n"
    nested = f"Nested-Small-Q4_K_M.gguf: arrays nested deeper than {reader.MAX_ARRAY_DEPTH} for key 'crafted'"
    assert f"{repo}: {nested}: its KV cache is not counted" in result.stderr  # the estimate before the download
    [model] = json.loads(cli("get", "models", "-o", "json").stdout)["items"]
    [available] = [c for c in model["status"]["conditions"] if c["type"] == "Available"]
    assert (available["status"], available["reason"]) == ("False", "Unreadable")  # discovery's reader, on disk
    assert available["message"] == f"{model['status']['artifact']['path']}: arrays nested deeper than " \
                                   f"{reader.MAX_ARRAY_DEPTH} for key 'crafted'"
