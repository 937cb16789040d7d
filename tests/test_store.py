"""The store: atomic writes, locking across processes, corrupt and future files, migrations."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import tempfile
from pathlib import Path

import pytest

from athanor import actions
from athanor.errors import StoreCorruptError, StoreError, StoreVersionError
from athanor.paths import ensure_private_dir, open_private_file
from athanor.store import Store, atomic_write_text, open_store
from conftest import write
from fixtures.tiny_models import add_gguf_repo

MODEL = """\
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata: {{name: m{i}}}
spec:
  runtime: llama-server
  source: {{path: /models/m{i}.gguf}}
"""


def _apply_many(home: str, spec_dir: str, start: int, count: int, barrier) -> None:
    os.environ["ATHANOR_HOME"] = home
    barrier.wait()
    store = open_store(Path(home))
    for i in range(start, start + count):
        actions.apply(store, [str(Path(spec_dir) / f"m{i}.yaml")])


def test_two_processes_applying_at_once_lose_nothing(home, tmp_path):
    per_process = 15
    for i in range(2 * per_process):
        write(tmp_path / "specs" / f"m{i}.yaml", MODEL.format(i=i))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_apply_many, args=(str(home), str(tmp_path / "specs"), n * per_process, per_process, barrier))
        for n in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    doc = json.loads((home / "models.json").read_text())
    assert sorted(doc["models"]) == sorted(f"m{i}" for i in range(2 * per_process))
    ports = [m["spec"]["port"] for m in doc["models"].values()]
    assert len(set(ports)) == len(ports), "no port handed out twice"


def test_corrupt_registry_is_reported_and_left_untouched(cli, home, tmp_path):
    home.mkdir(parents=True)
    garbage = '{"schemaVersion": 1, "models": {'
    (home / "models.json").write_text(garbage)
    result = cli("apply", "-f", str(write(tmp_path / "m.yaml", MODEL.format(i=1))))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{home / 'models.json'}:1:")
    assert "corrupt JSON" in result.stderr and "Traceback" not in result.stderr
    assert (home / "models.json").read_text() == garbage
    assert cli("get", "models").returncode == 1


def test_wrong_shape_is_corrupt_not_replaced(store: Store, home):
    home.mkdir(parents=True)
    (home / "models.json").write_text('{"schemaVersion": 1, "models": []}')
    with pytest.raises(StoreCorruptError, match="'models' must be a JSON object"):
        store.models.load()


def test_newer_schema_version_is_refused(store: Store, home):
    home.mkdir(parents=True)
    (home / "models.json").write_text('{"schemaVersion": 99, "models": {}}')
    with pytest.raises(StoreVersionError, match="newer athanor"):
        with store.models.edit():
            pass
    assert json.loads((home / "models.json").read_text())["schemaVersion"] == 99


def test_legacy_node_registry_is_migrated_keeping_ports_and_presets(store: Store, home):
    home.mkdir(parents=True)
    legacy = {"version": 1, "models": [
        {"id": "org/x:x.gguf", "slug": "x-q4", "path": "/m/x.gguf", "runtime": "llama.cpp", "port": 40890,
         "formula": "coding", "piAlias": "xq", "source": {"type": "hf", "repo": "org/x", "file": "x.gguf"}},
        {"id": "mlx-community/y", "slug": "y", "path": "/m/y", "runtime": "mlx", "mlxFlavor": "vlm", "port": 40891,
         "source": {"type": "local"}},
    ]}
    (home / "models.json").write_text(json.dumps(legacy))
    with store.models.edit() as doc:
        pass
    written = json.loads((home / "models.json").read_text())
    assert written["schemaVersion"] == 1
    x, y = written["models"]["x-q4"], written["models"]["y"]
    assert x["spec"] == {"runtime": "llama-server", "source": {"hf": {"repo": "org/x", "file": "x.gguf"}},
                         "port": 40890, "recipe": "coding", "aliases": ["xq"]}
    assert y["spec"] == {"runtime": "mlx-vlm", "source": {"path": "/m/y"}, "port": 40891}
    assert doc["models"].keys() == written["models"].keys()


def test_failed_edit_writes_nothing(store: Store, home):
    with store.models.edit() as doc:
        doc["recipes"]["keep"] = {"spec": {}}
    before = (home / "models.json").read_text()
    with pytest.raises(RuntimeError):
        with store.models.edit() as doc:
            doc["recipes"].clear()
            raise RuntimeError("boom")
    assert (home / "models.json").read_text() == before


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    class Unwritable(str):
        def __str__(self):  # pragma: no cover - never reached
            return "x"

    with pytest.raises(TypeError):
        atomic_write_text(target, 42)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(store: Store, home):
    with store.models.edit() as doc:
        doc["recipes"]["first"] = {"spec": {}}
    # What a writer killed between mkstemp and the rename leaves behind, named exactly as atomic_write_text names it.
    fd, stale = tempfile.mkstemp(prefix=".models.json.", suffix=".tmp", dir=home)
    os.write(fd, b'{"schemaVersion": 1, "models": {')
    os.close(fd)
    other_target = tempfile.mkstemp(prefix=".models.json.bak.", suffix=".tmp", dir=home)[1]
    with store.models.edit() as doc:
        doc["recipes"]["second"] = {"spec": {}}
    assert not Path(stale).exists()
    assert Path(other_target).exists(), "a temp file of another target is not this write's to remove"
    assert sorted(json.loads((home / "models.json").read_text())["recipes"]) == ["first", "second"]


@pytest.fixture
def umask_0():
    """Run the block (and the processes it starts) under umask 000, the worst case for file modes."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in [directory, *directory.iterdir()]}


def test_home_and_store_files_are_private_under_umask_0(cli, home, hf_root, tmp_path, umask_0):
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", MODEL.format(i=1)))).returncode == 0
    assert cli("scan").returncode == 0
    assert _modes(home) == {
        home.name: 0o700, "models.json": 0o600, "models.json.lock": 0o600, "state.json": 0o600,
        "state.json.lock": 0o600,
    }


def test_a_home_others_can_write_into_is_tightened(cli, home, tmp_path):
    home.mkdir()
    os.chmod(home, 0o777)
    (home / "models.json.lock").touch(mode=0o666)
    os.chmod(home / "models.json.lock", 0o666)
    assert cli("apply", "-f", str(write(tmp_path / "m.yaml", MODEL.format(i=1)))).returncode == 0
    modes = _modes(home)
    assert modes[home.name] == 0o700
    assert modes["models.json.lock"] == 0o600 and modes["models.json"] == 0o600


def test_private_dirs_and_files_whatever_the_umask(tmp_path, umask_0):
    logs = ensure_private_dir(tmp_path / "a" / "b" / "logs")
    assert [stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a", tmp_path / "a" / "b", logs)] == [0o700] * 3
    assert ensure_private_dir(logs) == logs
    os.close(open_private_file(logs / "daemon.log", os.O_WRONLY | os.O_APPEND))
    assert stat.S_IMODE((logs / "daemon.log").stat().st_mode) == 0o600
    old_log = logs / "old.log"
    old_log.write_text("written by an older athanor\n")
    os.chmod(old_log, 0o644)
    os.close(open_private_file(old_log, os.O_WRONLY | os.O_APPEND))
    assert stat.S_IMODE(old_log.stat().st_mode) == 0o600
    readable = tmp_path / "readable"
    readable.mkdir(mode=0o755)
    ensure_private_dir(readable)
    assert stat.S_IMODE(readable.stat().st_mode) == 0o755, "only group/other write access is taken away"
    not_a_dir = write(tmp_path / "file", "")
    with pytest.raises(StoreError, match=f"{not_a_dir}: exists but is not a directory"):
        ensure_private_dir(not_a_dir)
