"""``athanor sync pi`` finds pi's directory through ``PI_HOME`` too, as the tool athanor replaces did, after
``PI_CODING_AGENT_DIR``; through the real entry point, as in test_pi_sync.py."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write
from fixtures.serving import model_spec
from fixtures.tiny_models import write_tiny_llama_gguf


def synced_ids(path: Path) -> list[str]:
    return [m["id"] for m in json.loads(path.read_text())["providers"]["athanor"]["models"]]


def test_pi_home_is_honoured_after_pi_coding_agent_dir(cli, home, tmp_path, monkeypatch):
    user_home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(user_home))  # ~/.pi/agent, the default, must stay untouched throughout
    monkeypatch.delenv("PI_CODING_AGENT_DIR", raising=False)
    monkeypatch.setenv("PI_HOME", str(tmp_path / "pi-home"))
    applied = cli("apply", "-f", str(write(tmp_path / "m.yaml", model_spec("tiny", write_tiny_llama_gguf(
        tmp_path / "w" / "tiny.gguf")))))
    assert applied.returncode == 0, applied.stderr

    result = cli("sync", "pi")
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path / 'pi-home' / 'agent' / 'models.json'}" in result.stdout
    assert synced_ids(tmp_path / "pi-home" / "agent" / "models.json") == ["tiny"]

    monkeypatch.setenv("PI_CODING_AGENT_DIR", str(tmp_path / "agent-dir"))  # pi's own variable wins
    result = cli("sync", "pi")
    assert result.returncode == 0, result.stderr
    assert synced_ids(tmp_path / "agent-dir" / "models.json") == ["tiny"]
    assert not (user_home / ".pi").exists()
