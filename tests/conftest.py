"""Shared fixtures: an isolated ATHANOR_HOME and HF cache per test, and the real `athanor` entry point."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest
from fixtures.tier import Tier

from athanor.store import Store, open_store

ATHANOR = shutil.which("athanor", path=str(Path(sys.executable).parent)) or "athanor"
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`pytest ... &`, nohup) with SIGINT ignored, and the processes the tests start
    # would inherit that: Python installs no KeyboardInterrupt in a process that starts with SIGINT ignored, so the
    # tests that stop a CLI with Ctrl-C's signal would find it ignored. The tests get SIGINT as a terminal gives it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private ATHANOR_HOME, and an empty HF cache so the developer's own cache never leaks in."""
    athanor_home = tmp_path / "athanor-home"
    monkeypatch.setenv("ATHANOR_HOME", str(athanor_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    return athanor_home


@pytest.fixture
def hf_root(home: Path, tmp_path: Path) -> Path:
    """The root that tests/fixtures/tiny_models.make_hf_cache builds into (its hub/ is HF_HUB_CACHE)."""
    return tmp_path / "hf"


@pytest.fixture
def store(home: Path) -> Store:
    return open_store(home)


RunCLI = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(home: Path) -> RunCLI:
    """Run the installed `athanor` console script as a user would, in a fresh process."""

    def run(*args: str, input: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ATHANOR, *args], input=input, capture_output=True, text=True, env=dict(os.environ),
            cwd=cwd or REPO, timeout=120,
        )

    return run


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tier(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tier]:
    """The fast controller tier (fixtures/tier.py); no scripted runtime may outlive the test."""
    monkeypatch.setenv("SCRIPTED_RUNTIME_DIR", str(tmp_path / "scripts"))
    t = Tier(home, tmp_path)
    try:
        yield t
    finally:
        assert not t.kill_leftovers(), "a scripted runtime outlived its controller"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier is whatever runs on the tier fixture: marked here, so no list of files needs keeping."""
    for item in items:
        if "tier" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fast)


def lan_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


class LaunchctlDouble:
    """The launchctl double on PATH (tests/doubles/launchctl_double.py): its state, and a way to ask it."""

    def __init__(self, root: Path):
        self.state = root / "launchd-double"
        self.bin = root / "launchd-double-bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        script = REPO / "tests" / "doubles" / "launchctl_double.py"
        wrapper = self.bin / "launchctl"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} {self.state} \"$@\"\n")
        wrapper.chmod(0o755)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "launchctl"), *args], capture_output=True, text=True, timeout=30)

    def shutdown(self) -> None:
        """Kill every job and the double's launchd, and wait until it is gone."""
        self("--shutdown")
        pid_file = self.state / "launchd.pid"
        if pid_file.exists():
            import psutil

            try:
                psutil.Process(int(pid_file.read_text())).wait(30)
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def launchctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LaunchctlDouble]:
    """launchctl on PATH is the double for this test; every job it ran is gone afterwards."""
    double = LaunchctlDouble(tmp_path)
    monkeypatch.setenv("PATH", f"{double.bin}{os.pathsep}{os.environ['PATH']}")
    try:
        yield double
    finally:
        double.shutdown()


@pytest.fixture(scope="session")
def systemd_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real systemd user manager in a container (fixtures/systemd_host.py), booted once per session."""
    from fixtures import systemd_host as host_module

    why = host_module.unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.getbasetemp()
    host = host_module.boot(base, base / "systemd-bin")
    try:
        yield host
    finally:
        host_module.shutdown(host)


@pytest.fixture
def systemctl(systemd_host: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``systemctl`` on PATH is the bridge to the container's real user manager, and unit files go where it reads
    them; every athanor unit this test left is stopped and removed afterwards."""
    monkeypatch.setenv("PATH", f"{systemd_host.bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(systemd_host.config_home))
    try:
        yield systemd_host
    finally:
        units = systemd_host.config_home / "systemd" / "user"
        for unit in units.glob("athanor-*.service"):
            systemd_host.systemctl("--user", "stop", unit.name)
            systemd_host.systemctl("--user", "reset-failed", unit.name)
            unit.unlink()
        systemd_host.systemctl("--user", "daemon-reload")


# Fixtures every test module may ask for by name: the real gateway (fixtures/serving.py), llama-server started
# directly (fixtures/llama_direct.py), the fake Hugging Face Hub (fixtures/fake_hub.py) and the stand-in Kubernetes
# API server (fixtures/kube_api.py).
from fixtures.fake_hub import fake_hub  # noqa: E402,F401
from fixtures.kube_api import kube_api  # noqa: E402,F401
from fixtures.llama_direct import llama_server  # noqa: E402,F401
from fixtures.serving import gateway, models  # noqa: E402,F401
