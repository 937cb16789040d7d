"""The preflight memory guard against a real gateway: a model that cannot fit is refused before anything starts or
is evicted, with a reason that names memory; the spec or ``athanor start --force`` lets it through."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import psutil
import pytest
from fixtures.serving import Gateway, apply_models, chat, model_spec
from fixtures.tiny_models import write_tiny_llama_gguf

HUGE = 200 * 10**9  # bytes: more than any machine these tests run on


def sparse_gguf(path: Path, size: int = HUGE) -> Path:
    """A real tiny GGUF, made ``size`` bytes by a sparse tail: its size says 200 GB, the disk holds 300 KB."""
    write_tiny_llama_gguf(path, seed=4)
    os.truncate(path, size)
    return path


def test_a_model_that_can_never_fit_is_refused_and_nothing_is_evicted(gateway: Gateway, tmp_path):
    apply_models(tmp_path / "huge.yaml", model_spec("huge", sparse_gguf(tmp_path / "weights" / "huge.gguf")))
    assert chat(gateway.client, "tiny-gguf").model == "tiny-gguf"
    loaded = gateway.runtime_pid("tiny-gguf")
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gateway.client, "huge")
    assert caught.value.status_code == 503
    message = caught.value.body["message"]
    assert "not enough memory" in message and "'huge'" in message and "186.3 GiB" in message
    assert gateway.runtime_pid("tiny-gguf") == loaded and gateway.phase("tiny-gguf") == "Ready", "nothing evicted"
    assert gateway.runtime_pid("huge") is None and not (gateway.home / "logs" / "huge.log").exists(), \
        "no process was started"
    gateway.recorded()
    view = json.loads(gateway.athanor("get", "models", "huge", "-o", "json").stdout)
    memory = next(c for c in view["status"]["conditions"] if c["type"] == "InsufficientMemory")
    assert memory["status"] == "True" and "not enough memory" in memory["message"]
    assert "InsufficientMemory" in gateway.athanor("get", "events", "huge").stdout
    # Asked again: refused again at once, still without stopping anything.
    with pytest.raises(openai.APIStatusError):
        chat(gateway.client, "huge")
    assert gateway.runtime_pid("tiny-gguf") == loaded


def test_force_and_allow_overcommit_let_a_start_through(gateway: Gateway, tmp_path):
    # Just over this machine's memory: refused, yet quick for llama-server to map when forced (it reads the file).
    huge = sparse_gguf(tmp_path / "weights" / "huge.gguf", psutil.virtual_memory().total + 2**30)
    apply_models(tmp_path / "huge.yaml", model_spec("huge", huge))
    refused = gateway.athanor("start", "huge")
    assert refused.returncode != 0 and "not enough memory" in refused.stderr
    forced = gateway.athanor("start", "--force", "huge")  # the file's real tensors are tiny: it does start
    assert forced.returncode == 0, forced.stderr
    assert gateway.phase("huge") == "Ready"
    gateway.recorded()
    view = json.loads(gateway.athanor("get", "models", "huge", "-o", "json").stdout)
    assert "InsufficientMemory" not in [c["type"] for c in view["status"]["conditions"]], "cleared by the start"
    assert gateway.athanor("stop", "huge").returncode == 0
    apply_models(tmp_path / "huge.yaml", model_spec("huge", huge, extra="  allowOvercommit: true\n"))
    assert chat(gateway.client, "huge").model == "huge"
