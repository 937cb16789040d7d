"""Discovery over real cache layouts and loose directories: naming, classification, refresh rules."""

from __future__ import annotations

import json

from athanor import registry
from athanor.naming import base_name, slugify, unique_name
from fixtures.tiny_models import add_gguf_repo, add_mlx_repo, make_hf_cache, write_tiny_llama_gguf


def test_names_are_predictable_slugs():
    assert base_name("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf") == "qwen3-8b-q4-k-m"
    assert base_name("mlx-community/Qwen3-4B-Instruct-2507-4bit", None) == "qwen3-4b-instruct-2507-4bit"
    assert base_name("org/big", "sub/Big-Q8_0-00001-of-00003.gguf") == "big-q8-0"
    assert slugify("!!!") == "model"
    assert len(slugify("x" * 200)) == 63
    taken = {"qwen3-8b-q4-k-m"}
    assert unique_name("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", taken) == "qwen-qwen3-8b-q4-k-m"
    taken.add("qwen-qwen3-8b-q4-k-m")
    assert unique_name("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", taken) == "qwen3-8b-q4-k-m-2"


def test_same_file_name_in_two_repos_gets_distinct_names(store, hf_root):
    add_gguf_repo(hf_root, "a/tiny-GGUF", filename="tiny.gguf")
    add_gguf_repo(hf_root, "b/tiny-GGUF", filename="tiny.gguf", seed=1)
    registry.scan(store)
    models = store.models.load()["models"]
    assert {n: m["spec"]["source"]["hf"]["repo"] for n, m in models.items()} == {"tiny": "a/tiny-GGUF", "b-tiny": "b/tiny-GGUF"}


def test_split_shards_register_once_and_projectors_mark_vision(store, hf_root, tmp_path):
    shard = write_tiny_llama_gguf(tmp_path / "shard.gguf")
    make_hf_cache(hf_root, {"org/split-GGUF": {
        "Big-Q8_0-00001-of-00002.gguf": shard,
        "Big-Q8_0-00002-of-00002.gguf": b"GGUF second shard",
        "mmproj-Big-f16.gguf": b"GGUF projector",
    }})
    registry.scan(store)
    models = store.models.load()["models"]
    assert list(models) == ["big-q8-0"]
    artifact = models["big-q8-0"]["artifact"]
    assert artifact["sizeBytes"] == shard.stat().st_size + len(b"GGUF second shard")
    assert artifact["capabilities"] == ["text", "vision"]
    assert artifact["mmproj"].endswith("mmproj-Big-f16.gguf")


def test_vision_mlx_model_is_detected_but_served_as_text_by_default(store, hf_root):
    add_mlx_repo(hf_root, "mlx-community/tiny-vl-4bit", quantized_bits=4, vision=True)
    registry.scan(store)
    (model,) = store.models.load()["models"].values()
    assert model["spec"]["runtime"] == "mlx-lm"
    assert model["artifact"]["capabilities"] == ["text", "vision"]


def test_plain_transformers_checkpoints_are_not_taken_for_mlx(store, hf_root):
    add_mlx_repo(hf_root, "sentence-transformers/tiny-embedder")  # unquantized, no 'mlx' in the name
    registry.scan(store)
    assert store.models.load()["models"] == {}


def test_loose_files_in_extra_paths(store, tmp_path, home):
    models_dir = tmp_path / "models"
    write_tiny_llama_gguf(models_dir / "nested" / "Loose-Q4_1.gguf")
    (models_dir / ".hidden").mkdir(parents=True)
    write_tiny_llama_gguf(models_dir / ".hidden" / "skip.gguf")
    registry.scan(store, (str(models_dir),))
    models = store.models.load()["models"]
    assert list(models) == ["loose-q4-1"]
    assert models["loose-q4-1"]["spec"]["source"] == {"path": str(models_dir / "nested" / "Loose-Q4_1.gguf")}


def test_vanished_files_mark_the_model_missing_and_prune_forgets_it(store, hf_root, cli):
    gguf = add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    registry.scan(store)
    gguf.unlink()
    result = registry.scan(store)
    assert [str(c) for c in result.changes] == ["model/tiny-llama-f32 missing"]
    table = cli("get", "models").stdout
    assert "NotFound" in table
    assert [str(c) for c in registry.scan(store, prune=True).changes] == ["model/tiny-llama-f32 pruned"]
    assert store.models.load()["models"] == {}


def test_corrupt_gguf_is_registered_with_its_problem(store, tmp_path, cli):
    bad = tmp_path / "models" / "broken.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 10)
    registry.scan(store, (str(bad.parent),))
    out = json.loads(cli("get", "models", "broken", "-o", "json").stdout)
    available = out["status"]["conditions"][0]
    assert available["status"] == "False" and available["reason"] == "Unreadable"
    assert str(bad) in available["message"]


def test_rescan_says_what_was_added_updated_and_unchanged(cli, hf_root):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    add_mlx_repo(hf_root, "mlx-community/tiny-llama-4bit", quantized_bits=4)
    first = cli("scan")
    assert sorted(first.stdout.splitlines()) == ["model/tiny-llama-4bit discovered", "model/tiny-llama-f32 discovered"]
    assert first.stderr.splitlines()[-1] == "scan: 2 added, 0 updated, 0 unchanged"
    again = cli("scan")
    assert again.stdout == ""
    assert again.stderr.splitlines()[-1] == "scan: 0 added, 0 updated, 2 unchanged"
    # A new revision of one repo (other weights on disk) and a new repo beside it.
    add_gguf_repo(hf_root, "test-org/tiny-GGUF", context_length=512)
    add_gguf_repo(hf_root, "other/extra-GGUF", filename="extra.gguf")
    changed = cli("scan")
    assert sorted(changed.stdout.splitlines()) == ["model/extra discovered", "model/tiny-llama-f32 refreshed"]
    assert changed.stderr.splitlines()[-1] == "scan: 1 added, 1 updated, 1 unchanged"


def test_scan_counts_missing_and_pruned_models_apart(store, hf_root, cli):
    gguf = add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    add_gguf_repo(hf_root, "other/extra-GGUF", filename="extra.gguf")
    assert registry.scan(store).unchanged == 0
    gguf.unlink()
    gone = cli("scan")
    assert gone.stdout == "model/tiny-llama-f32 missing\n"
    assert gone.stderr.splitlines()[-1] == "scan: 0 added, 0 updated, 1 unchanged, 1 missing"
    still = registry.scan(store)
    assert (still.changes, still.unchanged) == ([], 2), "missing before and missing now is no change"
    pruned = cli("scan", "--prune")
    assert pruned.stdout == "model/tiny-llama-f32 pruned\n"
    assert pruned.stderr.splitlines()[-1] == "scan: 0 added, 0 updated, 1 unchanged, 1 pruned"
