"""athanor install / uninstall: the gateway as a job of launchd (through the launchctl double) or of systemd (a real
user manager in a container), serving real models; and nothing left behind once uninstalled."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import openai
import psutil

from conftest import write
from fixtures.tiny_models import write_tiny_llama_gguf


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_spec(tmp_path: Path, cli, manager_lines: str) -> tuple[int, Path]:
    port = free_port()
    gguf = write_tiny_llama_gguf(tmp_path / "weights" / "tiny.gguf")
    spec = write(tmp_path / "spec.yaml",
                 "apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {name: default}\nspec:\n"
                 f"  listen: 127.0.0.1:{port}\n{manager_lines}---\n"
                 "apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {name: tiny}\nspec:\n"
                 f"  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
                 "  preset: {ctxSize: 256, maxTokens: 4}\n")
    applied = cli("apply", "-f", str(spec))
    assert applied.returncode == 0, applied.stderr
    return port, tmp_path / "weights"


def answer(port: int) -> str:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    return reply.model


def runtimes(weights: Path) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != "zombie" and str(weights) in " ".join(p.info["cmdline"] or [])]


def serving_processes(home: Path) -> list[psutil.Process]:
    """`athanor serve` processes of this test's home, wherever they run."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != "zombie" and cmdline[-2:] == ["athanor", "serve"]:
            try:
                if proc.environ().get("ATHANOR_HOME") == str(home):
                    found.append(proc)
            except psutil.Error:
                continue
    return found


def wait_gone(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling other processes' exits, with a deadline


def test_install_with_launchd_serves_restarts_and_uninstalls_without_a_trace(home, tmp_path, cli, launchctl):
    agents = tmp_path / "LaunchAgents"
    port, weights = setup_spec(tmp_path, cli, f"  serviceManager: launchd\n  launchd: {{agentsDir: {agents}}}\n")
    installed = cli("install")
    assert installed.returncode == 0, installed.stderr + installed.stdout
    assert "gateway created as dev.athanor.ingress (launchd" in installed.stdout
    assert cli("install").stdout.startswith("gateway unchanged"), "installing again changes nothing"
    uid = os.getuid()
    assert launchctl("print", f"gui/{uid}/dev.athanor.ingress").returncode == 0
    assert answer(port) == "tiny"
    assert launchctl("print", f"gui/{uid}/dev.athanor.model.tiny").returncode == 0, "the model runs as a job too"
    assert [p.name for p in agents.iterdir()] == ["dev.athanor.ingress.plist"], "loaded at login: the gateway alone"
    assert [p.name for p in (home / "launchd").iterdir()] == ["dev.athanor.model.tiny.plist"]
    down = cli("down")
    assert down.returncode == 0 and "stopped (launchd" in down.stdout, down.stderr
    assert launchctl("print", f"gui/{uid}/dev.athanor.ingress").returncode == 113, "down boots the gateway out"
    wait_gone(lambda: not runtimes(weights), "the model's runtime to stop with the gateway")
    assert cli("up").returncode == 0 and answer(port) == "tiny", "up starts the installed gateway again"
    removed = cli("uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "dev.athanor.ingress removed" in removed.stdout and "dev.athanor.model.tiny removed" in removed.stdout
    assert list(agents.iterdir()) == [] and list((home / "launchd").iterdir()) == []
    for label in ("dev.athanor.ingress", "dev.athanor.model.tiny"):
        assert launchctl("print", f"gui/{uid}/{label}").returncode == 113
    assert "athanor" not in launchctl("print-disabled", f"gui/{uid}").stdout, "no trace in the disabled list"
    wait_gone(lambda: not runtimes(weights) and not serving_processes(home), "every process to end")
    assert cli("uninstall").stdout.strip() == "nothing installed"


def test_install_with_systemd_serves_and_uninstalls_without_a_trace(home, tmp_path, cli, systemctl):
    port, weights = setup_spec(tmp_path, cli, "  serviceManager: systemd\n")
    installed = cli("install")
    assert installed.returncode == 0, installed.stderr + installed.stdout
    assert "gateway created as athanor-ingress.service (systemd" in installed.stdout
    assert "loginctl enable-linger" in installed.stdout
    units = systemctl.config_home / "systemd" / "user"
    assert systemctl.systemctl("--user", "is-enabled", "athanor-ingress.service").stdout.strip() == "enabled"
    assert answer(port) == "tiny"
    assert systemctl.systemctl("--user", "is-active", "athanor-model-tiny.service").stdout.strip() == "active"
    assert sorted(p.name for p in units.glob("athanor-*")) == ["athanor-ingress.service", "athanor-model-tiny.service"]
    removed = cli("uninstall")
    assert removed.returncode == 0, removed.stderr
    assert "athanor-ingress.service removed" in removed.stdout and "athanor-model-tiny.service removed" in removed.stdout
    assert list(units.glob("athanor-*")) == []
    listed = systemctl.systemctl("--user", "list-units", "--all", "--plain", "--no-legend", "athanor-*")
    assert listed.stdout.strip() == "", listed.stdout
    wait_gone(lambda: not runtimes(weights) and not serving_processes(home), "every process to end")
