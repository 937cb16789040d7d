"""A full disk under ATHANOR_HOME: every store write fails cleanly and leaves the old store as it was.

ATHANOR_HOME is on a tmpfs of its own (a real filesystem with a real size limit, mounted for the test), filled to
the last page. Then an ``athanor apply``, the daemon's status write (``StateWriter``, what ``athanor serve`` runs)
and a registry write (``athanor scan``) must fail with a message naming the file and the cause, without a
traceback; models.json and state.json must stay byte for byte what they were, with no temp file left; and once
space is freed, the next writes work.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from athanor.controller.persist import StateWriter
from athanor.errors import StoreError
from athanor.store import open_store
from conftest import ATHANOR, RunCLI, write
from fixtures.tiny_models import add_gguf_repo

MODEL = """\
apiVersion: athanor.dev/v1alpha1
kind: Model
metadata: {{name: {name}}}
spec:
  runtime: llama-server
  source: {{path: /models/{name}.gguf}}
  env: {{NOTE: "{name}"}}
"""
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def small_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """ATHANOR_HOME on a 1 MiB tmpfs mounted for this test, unmounted afterwards whatever happened."""
    mountpoint = tmp_path / "small-fs"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test (it needs root and CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip() or mounted.returncode}")
    try:
        small = mountpoint / "home"
        monkeypatch.setenv("ATHANOR_HOME", str(small))
        yield small
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to its last byte; returns the filler file (delete it to free space)."""
    filler = directory.parent / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (directory.parent / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    (directory.parent / "probe").unlink(missing_ok=True)
    return filler


def snapshot(home: Path) -> dict[str, bytes]:
    """The store's files, byte for byte (the lock files hold only their last holder's pid)."""
    return {p.name: p.read_bytes() for p in sorted(home.iterdir()) if p.is_file() and p.suffix != ".lock"}


def temps(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob(".*.tmp"))


def cli_in(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ATHANOR, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ATHANOR_HOME": str(home)})


def clean_failure(result: subprocess.CompletedProcess[str], path: Path) -> None:
    """Non-zero, one clear line naming the file and the cause; no traceback, no 'internal error'."""
    assert result.returncode != 0, result.stdout
    assert str(path) in result.stderr and NO_SPACE in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr


def test_a_full_disk_fails_every_write_cleanly_and_keeps_the_old_store(small_home: Path, cli: RunCLI, hf_root: Path,
                                                                       tmp_path: Path):
    home = small_home
    assert cli("apply", "-f", str(write(tmp_path / "a.yaml", MODEL.format(name="a")))).returncode == 0
    store = open_store(home)
    with store.state.edit() as state:
        state["instances"]["a"] = {"phase": "Standby", "message": "before the disk filled"}
    before = snapshot(home)
    assert {"models.json", "state.json"} <= before.keys()

    filler = fill(home)
    try:
        # apply: the models.json write fails, the CLI says where and why
        applied = cli("apply", "-f", str(write(tmp_path / "b.yaml", MODEL.format(name="b"))))
        clean_failure(applied, home / "models.json")

        # a first apply into a fresh home on the same full disk: no lock file yet, nothing to keep
        fresh = home.parent / "fresh-home"
        first = cli_in(fresh, "apply", "-f", str(tmp_path / "b.yaml"))
        clean_failure(first, fresh / "models.json")
        assert not (fresh / "models.json").exists() and temps(fresh) == []

        # a registry write: `athanor scan` registering a newly found model
        add_gguf_repo(hf_root, "full-org/tiny-GGUF")
        scanned = cli("scan")
        clean_failure(scanned, home / "models.json")

        # a status write as the CLI's store transactions make it
        with pytest.raises(StoreError) as refused:
            with store.state.edit() as state:
                state["instances"]["a"] = {"phase": "Ready", "message": "after"}
        assert str(home / "state.json") in str(refused.value) and NO_SPACE in str(refused.value)

        assert snapshot(home) == before, "the old store is intact, byte for byte"
        assert temps(home) == [], "a failed write leaves no temp file"
        assert json.loads((home / "models.json").read_text())["models"].keys() == {"a"}
        assert cli("get", "models").returncode == 0, "the old store still reads"

        # the daemon's status writer: it cannot record and serving goes on; once space is freed, its retry lands
        async def daemon_status() -> None:
            writer = StateWriter(store)
            writer.record("a", {"phase": "Ready", "message": "recorded once space is back"})
            assert not await writer.settled(0.5), "nothing can be recorded on a full disk"
            assert snapshot(home) == before and temps(home) == []
            filler.unlink()
            assert await writer.settled(10), "the writer's retry records it once there is space"
            await writer.close()
        asyncio.run(daemon_status())
        assert store.state.load()["instances"]["a"]["message"] == "recorded once space is back"
    finally:
        filler.unlink(missing_ok=True)

    # space is back: the same writes work
    applied = cli("apply", "-f", str(tmp_path / "b.yaml"))
    assert applied.returncode == 0, applied.stderr
    assert cli("scan").returncode == 0
    with store.state.edit() as state:
        state["instances"]["b"] = {"phase": "Standby", "message": "recorded"}
    models = store.models.load()["models"]
    assert {"a", "b"} <= models.keys() and len(models) == 3, "a, b and the scanned model"
    assert models["b"]["spec"]["env"] == {"NOTE": "b"}
    state = store.state.load()
    assert state["instances"]["a"]["message"] == "recorded once space is back"
    assert state["instances"]["b"]["message"] == "recorded"
    assert temps(home) == []
