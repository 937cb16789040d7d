"""A swap's own overhead (issue 16, item 6): what athanor does around a runtime's load, made cheap without making it
blind. The preflight reuses a launch only while nothing it came from changed. Real files and a real store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.serving import apply_models, model_spec
from fixtures.tiny_models import write_tiny_llama_gguf, write_tiny_mlx_llama

from athanor.controller.preflight import LaunchMemo, prepare_launch
from athanor.errors import ModelUnavailable
from athanor.runtimes.launch import LaunchSpec, find_runtime
from athanor.store import open_store

# ---------------------------------------------------------------------------------------------- the launch memo


@pytest.fixture
def applied(home: Path, tmp_path: Path) -> Path:
    """A tiny GGUF served by a copy of llama-server (so the test may rebuild it), and a tiny MLX model."""
    home.mkdir(parents=True, exist_ok=True)
    binary = tmp_path / "bin" / "llama-server"
    binary.parent.mkdir()
    binary.symlink_to(find_runtime("llama-server"))  # a path of the test's own: replacing it is a "rebuild"
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "tiny.gguf")
    mlx = write_tiny_mlx_llama(tmp_path / "weights" / "tiny-mlx")
    gateway = ("apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\n"
               f"spec: {{runtimes: {{llama-server: {{path: {str(binary)!r}}}}}}}\n")
    apply_models(tmp_path / "models.yaml", gateway, model_spec("tiny", gguf), model_spec("tiny-mlx", mlx, "mlx-lm"))
    return binary


def _prepared(memo: LaunchMemo, name: str = "tiny") -> tuple[dict, LaunchSpec]:
    store = open_store()
    doc = store.models.load()
    return doc, prepare_launch(doc, doc["models"][name], store.home, memo=memo)


def test_a_launch_is_reused_for_the_same_document_while_its_files_are_unchanged(applied: Path):
    memo = LaunchMemo()
    doc, first = _prepared(memo)
    again = prepare_launch(doc, doc["models"]["tiny"], open_store().home, memo=memo)
    assert again is first, "worked out once for this document"
    _, reread = _prepared(memo)
    assert reread is not first and reread == first, "a new document (every change replaces it) starts afresh"


def test_a_rebuilt_binary_or_replaced_weights_are_seen_at_once(applied: Path, tmp_path: Path):
    memo = LaunchMemo()
    doc, first = _prepared(memo)
    home = open_store().home
    obj = doc["models"]["tiny"]
    applied.unlink()  # the binary rebuilt in place: another file at the same path
    applied.write_bytes(Path(find_runtime("llama-server")).read_bytes())
    applied.chmod(0o755)
    rebuilt = prepare_launch(doc, obj, home, memo=memo)
    assert rebuilt is not first and rebuilt.park_dir != first.park_dir, "the park key follows the binary"

    applied.chmod(0o644)  # no longer executable: the preflight says so, as it did before any memo
    with pytest.raises(ModelUnavailable, match="not an executable file"):
        prepare_launch(doc, obj, home, memo=memo)
    applied.chmod(0o755)

    weights = Path(obj["artifact"]["path"])
    weights.unlink()
    with pytest.raises(ModelUnavailable, match="weights not found on disk"):
        prepare_launch(doc, obj, home, memo=memo)
    write_tiny_llama_gguf(weights)  # downloaded again: new file, new identity
    assert prepare_launch(doc, obj, home, memo=memo).park_dir != rebuilt.park_dir


def test_an_mlx_launch_is_never_kept(applied: Path):
    """An MLX start's identity spans its Python packages, which no stat of its argv shows."""
    memo = LaunchMemo()
    doc, first = _prepared(memo, "tiny-mlx")
    assert prepare_launch(doc, doc["models"]["tiny-mlx"], open_store().home, memo=memo) is not first
