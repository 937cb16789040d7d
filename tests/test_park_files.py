"""The park store and key on real files: what is offered to a runtime, what is evicted, what a key depends on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from athanor.parking import files
from athanor.parking.key import park_key, shaping_argv, unparkable


def park(home: Path, model: str, key: str, slot: int, size: int, used_at: float | None = None) -> files.Parked:
    """A slot file as a runtime would write it, sealed as parking seals it."""
    directory = files.key_dir(home, model, key)
    files.prepare(directory)
    (directory / files.slot_filename(slot)).write_bytes(os.urandom(size))
    record = files.seal(directory, model, key, slot, tokens=size // 10)
    if used_at is not None:
        manifest = record.path.with_suffix(".json")
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "usedAt": used_at}))
    return record


def test_a_sealed_slot_is_private_and_verifies(tmp_path: Path):
    record = park(tmp_path, "m", "k1", 3, 4096)
    assert oct(record.path.stat().st_mode & 0o777) == "0o600"
    assert oct(record.path.with_suffix(".json").stat().st_mode & 0o777) == "0o600"
    assert oct(files.key_dir(tmp_path, "m", "k1").stat().st_mode & 0o777) == "0o700"
    good, problems = files.verify(tmp_path, "m", "k1")
    assert [(p.slot, p.size, p.tokens) for p in good] == [(3, 4096, 409)] and problems == []


@pytest.mark.parametrize("spoil, says", [
    (lambda p: p.write_bytes(os.urandom(4096)), "do not match its manifest's sha256"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "100 bytes where its manifest says 4096"),
    (lambda p: p.with_suffix(".json").unlink(), "has no manifest"),
    (lambda p: p.with_suffix(".json").write_text("{not json"), "manifest slot-3.json is unreadable"),
    (lambda p: p.with_suffix(".json").write_text(
        json.dumps({**json.loads(p.with_suffix(".json").read_text()), "key": "other"})), "belongs to another runtime"),
], ids=["garbage", "truncated", "no-manifest", "bad-manifest", "foreign"])
def test_a_slot_file_its_manifest_does_not_vouch_for_is_removed_not_offered(tmp_path: Path, spoil, says: str):
    record = park(tmp_path, "m", "k1", 3, 4096)
    spoil(record.path)
    good, problems = files.verify(tmp_path, "m", "k1")
    assert good == []
    assert len(problems) == 1 and says in problems[0]
    assert not record.path.exists() and not record.path.with_suffix(".json").exists()


def test_the_budget_evicts_least_recently_used_slots_first(tmp_path: Path):
    old = park(tmp_path, "a", "k", 0, 3000, used_at=100.0)
    recent = park(tmp_path, "b", "k", 0, 3000, used_at=300.0)
    middle = park(tmp_path, "a", "k", 1, 3000, used_at=200.0)
    removed = files.evict(tmp_path, budget=6500)
    assert [(r.model, r.slot) for r in removed] == [("a", 0)]
    assert not old.path.exists() and recent.path.exists() and middle.path.exists()
    assert files.evict(tmp_path, budget=6500) == []  # within budget now


def test_files_of_an_older_key_go_when_the_model_starts_with_a_new_one(tmp_path: Path):
    park(tmp_path, "m", "old", 0, 100)
    park(tmp_path, "m", "new", 0, 100)
    park(tmp_path, "other", "old", 0, 100)
    assert files.drop_other_keys(tmp_path, "m", "new") == ["old"]
    assert sorted((p.model, p.key) for p in files.listing(tmp_path)) == [("m", "new"), ("other", "old")]


def test_clear_removes_one_models_park_or_all_of_it(tmp_path: Path):
    park(tmp_path, "a", "k", 0, 100)
    park(tmp_path, "b", "k", 0, 200)
    assert files.clear(tmp_path, "a") >= 100
    assert [p.model for p in files.listing(tmp_path)] == ["b"]
    assert files.clear(tmp_path) >= 200
    assert files.listing(tmp_path) == [] and files.clear(tmp_path) == 0


def test_the_key_follows_the_weights_and_cache_settings_but_not_network_or_sampling(tmp_path: Path):
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"\x7fELF")
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 5000)
    base = [str(binary), "--model", str(weights), "--port", "8001", "--ctx-size", "4096"]
    key = park_key(base, [str(weights)])
    assert park_key([*base[:4], "8002", *base[5:], "--temp", "0.2", "--threads", "3"], [str(weights)]) == key
    assert park_key([*base[:5], "8192"], [str(weights)]) != key  # another context: another cache layout
    assert park_key([*base, "--cache-type-k", "q8_0"], [str(weights)]) != key
    assert park_key([*base, "--some-new-flag"], [str(weights)]) != key  # unknown flags count: never a wrong restore
    weights.write_bytes(b"GGUF" + b"\1" * 5000)  # same size, new contents
    assert park_key(base, [str(weights)]) != key
    assert shaping_argv([str(binary), "--port", "1", "--ctx-size", "9"]) == ["--ctx-size", "9"]


@pytest.mark.parametrize("runtime, facts, extra, mmproj, says", [
    ("mlx-lm", {}, {}, None, "in memory only"),
    ("llama-server", {"architecture": "bert"}, {"task": "embedding"}, None, "keeps no conversation"),
    ("llama-server", {"architecture": "mamba2"}, {}, None, "recurrent or hybrid"),
    ("llama-server", {"architecture": "lfm9", "recurrent": True}, {}, None, "recurrent or hybrid"),
    ("llama-server", {"architecture": "gemma3", "slidingWindow": 1024}, {}, None, "sliding-window"),
    ("llama-server", {"architecture": "llama"}, {}, "/m/mmproj.gguf", "projector"),
    ("llama-server", {"architecture": "llama"}, {}, None, None),
])
def test_models_whose_cache_cannot_be_parked_say_why(runtime, facts, extra, mmproj, says):
    reason = unparkable(runtime, facts, task=extra.get("task"), mmproj=mmproj, argv=["llama-server"])
    assert (reason is None) if says is None else (says in reason)


def test_a_sliding_window_model_with_a_full_cache_can_be_parked():
    assert unparkable("llama-server", {"architecture": "gemma3", "slidingWindow": 1024}, task=None, mmproj=None,
                      argv=["llama-server", "--swa-full"]) is None


def test_a_start_s_park_directory_exists_before_its_runtime_is_spawned(tier):
    """llama-server exits at once when ``--slot-save-path`` is not a directory yet (seen in CI when the directory
    was made beside the spawn): the preflight makes it, before the process exists."""
    tier.model("a")

    async def scenario() -> None:
        async with tier.controller(start=False) as c:
            launch, _, _ = await c._prepare_start(c.instance("a"), c.doc()["models"]["a"])
            assert launch.park_dir and Path(launch.park_dir).is_dir()
            assert launch.argv[launch.argv.index("--slot-save-path") + 1] == launch.park_dir

    tier.run(scenario)
