"""KV parking for mlx-vlm through the real gateway: the tiny Qwen2-VL on the real mlx_vlm.server, swapped away and back.

mlx-vlm's prefix cache writes its blocks to the park directory as it serves; the swap waits for its writer and seals
the shards with athanor's manifest (``athanor/parking/apc.py``), and the new runtime reads them back itself on the
first request: the follow-up's answer shows the conversation's prefix as cached tokens. A shard that no longer
matches the manifest is removed before the runtime starts: a normal answer and a ParkRejected event, never a wrong
answer (mlx-vlm itself would use a shard whose tensors changed under an intact header).
"""

from __future__ import annotations

import json
import os
import stat
import urllib.request
from pathlib import Path

import pytest
from fixtures.serving import Gateway, apply_models, chat, model_spec, wait_until
from fixtures.tiny_models import write_tiny_mlx_qwen2_vl

from athanor.parking import apc
from athanor.parking import files as park_files
from athanor.parking.key import mlx_identity, park_key, unparkable

MODEL = "tiny-vl"
SYSTEM = "You are a careful assistant. " + " ".join(f"fact{i} is {i * 7}." for i in range(8))  # ~150 tokens: 9 blocks


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is fact3?"}]
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"and fact{3 + turn}?"}]
    return messages


def ask(gateway: Gateway, turns: int, model: str = MODEL):
    return gateway.client.chat.completions.create(model=model, messages=conversation(turns), max_tokens=4,
                                                  temperature=0)


def cached(reply) -> int:
    details = reply.usage.prompt_tokens_details
    return (details.cached_tokens if details else 0) or 0


def events(gateway: Gateway, *reasons: str, model: str = MODEL) -> list[dict]:
    with urllib.request.urlopen(gateway.url + "/athanor/v1/events", timeout=10) as resp:
        return [e for e in json.loads(resp.read())["items"] if e["reason"] in reasons and e["name"] == model]


@pytest.fixture
def tiny_vl(gateway: Gateway, tmp_path: Path) -> Gateway:
    weights = write_tiny_mlx_qwen2_vl(tmp_path / "weights" / "tiny-qwen2-vl")
    apply_models(tmp_path / "vlm.yaml", model_spec(MODEL, weights, "mlx-vlm"))
    return gateway


def parked_away(gateway: Gateway, model: str = MODEL) -> None:
    wait_until(lambda: events(gateway, "Parked", "ParkFailed", model=model), 30, f"{model}'s cache to be parked")
    assert not events(gateway, "ParkFailed", model=model)


def park_dir(gateway: Gateway, model: str = MODEL) -> Path:
    [directory] = [p for p in park_files.model_dir(gateway.home, model).iterdir() if p.is_dir()]
    return directory


def test_a_swap_back_reads_the_parked_prefix_as_cached_tokens(tiny_vl: Gateway):
    """Two mlx-vlm models swapped in turn: the Qwen2-VL, and the fixture's text llama served with the vlm flavor
    (what the README offers MLX text models for parking)."""
    gateway = tiny_vl
    flavored = gateway.athanor("flavor", "tiny-mlx", "vlm")
    assert flavored.returncode == 0, flavored.stderr
    first = ask(gateway, 1)
    text_first = ask(gateway, 1, "tiny-mlx")  # the swap parks tiny-vl
    assert cached(first) == cached(text_first) == 0
    parked_away(gateway)
    [parked] = events(gateway, "Parked")
    assert parked["shards"] >= 1 and parked["bytes"] > 0

    directory = park_dir(gateway)
    shards = apc.shards(directory)
    assert shards and (directory / apc.MANIFEST).exists()
    for path in [directory / apc.MANIFEST, *shards]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path  # conversations: the runtime ran under umask 077
    assert {stat.S_IMODE(p.stat().st_mode) for p in [directory, *(s.parent for s in shards)]} == {0o700}
    listed = json.loads(gateway.athanor("park", "ls", MODEL, "-o", "json").stdout)
    assert [(e["slot"], e["bytes"]) for e in listed] == [(park_files.NO_SLOT, sum(p.stat().st_size for p in shards))]
    assert "prefix cache, " in gateway.athanor("describe", "model", MODEL).stdout

    again = ask(gateway, 2)  # the swap parks tiny-mlx
    parked_away(gateway, "tiny-mlx")
    text_again = ask(gateway, 2, "tiny-mlx")
    for before, after in ((first, again), (text_first, text_again)):
        full_blocks = before.usage.prompt_tokens // 16 * 16  # mlx-vlm caches whole blocks of 16 tokens (144 of 147)
        assert 0 < full_blocks <= cached(after) < after.usage.prompt_tokens
    assert not events(gateway, "ParkRejected") and not events(gateway, "ParkRejected", model="tiny-mlx")


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))  # same size, other bytes: the hash tells (so would mlx-vlm)


def _flipped(path: Path) -> None:
    """A bit of the first layer's first key flipped under an intact header: mlx-vlm restores this one silently."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    start, _end = json.loads(data[8:8 + header])["k0"]["data_offsets"]
    data[8 + header + start + 1] ^= 0x40  # the high byte of a half: its exponent
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("spoil", [_garbage, _flipped], ids=["garbage", "payload-flipped"])
def test_a_spoiled_shard_gives_a_normal_answer_and_an_event(tiny_vl: Gateway, spoil):
    gateway = tiny_vl
    reference = ask(gateway, 2)  # the answer of a prefill from nothing
    assert cached(reference) == 0
    chat(gateway.client, "tiny-gguf")  # the swap parks tiny-vl
    parked_away(gateway)
    shards = apc.shards(park_dir(gateway))
    assert shards
    spoiled = {}
    for path in shards:
        spoil(path)
        spoiled[path] = path.read_bytes()

    again = ask(gateway, 2)
    assert cached(again) == 0  # prefilled anew, from the conversation itself
    assert again.choices[0].message.content == reference.choices[0].message.content
    rejected = events(gateway, "ParkRejected")
    assert rejected and all(e["type"] == "Warning" and "sha256" in e["message"] for e in rejected)
    # removed before the runtime could read them (the new prefill may have written the same blocks afresh)
    assert all(not path.exists() or path.read_bytes() != spoiled[path] for path in shards)


# ---------------------------------------------------------------------------------------------- the pieces, on files


def test_mlx_vlm_is_parked_and_mlx_lm_says_why_and_what_to_do():
    assert unparkable("mlx-vlm", {"architecture": "qwen2_vl"}, task=None, mmproj=None, argv=["python"]) is None
    reason = unparkable("mlx-lm", {}, task=None, mmproj=None, argv=["python"])
    assert reason and "in memory only" in reason and "README" in reason and "athanor flavor MODEL vlm" in reason


def test_the_key_of_an_mlx_start_follows_its_weights_and_its_server(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (model / "model.safetensors").write_bytes(b"x" * 64)
    script = tmp_path / "bin" / "mlx_vlm.server"
    script.parent.mkdir()
    script.write_text("#!/usr/bin/python3\n")

    def key(port: int = 28100) -> str:
        argv = ["/usr/bin/python3", "guarded.py", "--secret-file", "k", "--", str(script), "--model", str(model),
                "--host", "127.0.0.1", "--port", str(port)]
        hashed, stat_only = mlx_identity(argv, str(model))
        return park_key(argv, hashed, stat_only=stat_only)

    first = key()
    assert key(28101) == first  # the port shapes no cache
    os.utime(model / "model.safetensors", ns=(1, 1))
    second = key()
    assert second != first  # weights touched in place
    (model / "model.safetensors").write_bytes(b"y" * 65)
    third = key()
    assert third != second  # other weights
    script.write_text("#!/usr/bin/python3\n# mlx-vlm reinstalled\n")
    assert key() != third  # another server install


def test_verify_keeps_exactly_what_the_manifest_vouches_for(tmp_path: Path):
    directory = tmp_path / "key0"
    namespace = directory / "some_model_s4-abc"
    namespace.mkdir(parents=True)
    kept, changed, late = (namespace / f"shard_{c * 32}.safetensors" for c in "abc")
    kept.write_bytes(b"k" * 100)
    changed.write_bytes(b"c" * 100)
    assert apc.seal(directory, "key0") == (2, 200)
    assert stat.S_IMODE(kept.stat().st_mode) == stat.S_IMODE((directory / apc.MANIFEST).stat().st_mode) == 0o600
    changed.write_bytes(b"C" + b"c" * 99)
    late.write_bytes(b"l" * 10)

    problems = apc.verify(directory, "key0")
    assert sorted(p.split(":")[0] for p in problems) == [changed.name, late.name]
    assert kept.exists() and not changed.exists() and not late.exists()
    vouched = json.loads((directory / apc.MANIFEST).read_text())["shards"]
    assert list(vouched) == [kept.relative_to(directory).as_posix()]
    assert apc.verify(directory, "key0") == []  # what is left is vouched for

    [problem] = apc.verify(directory, "another")  # a manifest of another key vouches for nothing here
    assert "another runtime" in problem and not kept.exists()


def test_the_launch_env_points_mlx_vlm_at_the_park_directory():
    env = apc.launch_env("/home/u/.athanor/park/m/k", 4 * 2**30)
    assert env["APC_ENABLED"] == "1" and env["APC_DISK_PATH"] == "/home/u/.athanor/park/m/k"
    assert env["APC_HASH"] == "sha256" and float(env["APC_DISK_MAX_GB"]) == 4.0
    assert float(env["APC_DISK_MIN_FREE_RAM_GB"]) < 2.0  # mlx-vlm's default would skip restores on small machines


def test_cache_shards_count_in_the_park_budget_least_recently_used_first(tmp_path: Path):
    slot_dir = park_files.key_dir(tmp_path, "gguf", "k")
    park_files.prepare(slot_dir)
    (slot_dir / park_files.slot_filename(0)).write_bytes(b"s" * 3000)
    slot = park_files.seal(slot_dir, "gguf", "k", 0, tokens=300)
    manifest = slot.path.with_suffix(".json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "usedAt": 200.0}))
    namespace = park_files.key_dir(tmp_path, "vl", "k") / "ns"
    namespace.mkdir(parents=True)
    old, recent = namespace / f"shard_{'a' * 32}.safetensors", namespace / f"shard_{'b' * 32}.safetensors"
    for path, used in ((old, 100), (recent, 300)):
        path.write_bytes(b"x" * 3000)
        os.utime(path, (used, used))  # mlx-vlm touches a shard it reads back

    removed = park_files.evict(tmp_path, budget=6500)
    assert [(r.model, r.path.name) for r in removed] == [("vl", old.name)]
    assert slot.path.exists() and recent.exists() and not old.exists()
    assert park_files.evict(tmp_path, budget=6500) == []
    park_files.evict(tmp_path, budget=0)
    assert not slot.path.exists() and not recent.exists() and park_files.listing(tmp_path) == []
