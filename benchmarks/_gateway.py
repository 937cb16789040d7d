"""What the benchmarks share: tiny GGUF models in a private ATHANOR_HOME and a gateway serving them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fixtures.tiny_models import write_tiny_llama_gguf  # noqa: E402

ATHANOR = str(Path(sys.executable).parent / "athanor")


@dataclass(frozen=True)
class Served:
    url: str  # the gateway, http://127.0.0.1:PORT
    home: Path  # its ATHANOR_HOME (gone after the block)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_models(directory: Path, names: tuple[str, ...] = ("m1", "m2")) -> list[Path]:
    """One tiny llama GGUF per name, ``directory/<name>.gguf`` (the file stem is the name llama.cpp's router
    serves it under)."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_tiny_llama_gguf(directory / f"{name}.gguf", context_length=2048, name=name) for name in names]


def wait_answering(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Return once ``url`` answers 200; RuntimeError if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)  # polling while it starts


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection (for servers without a GET route to poll)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)  # polling while it starts


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group (started with ``start_new_session``), SIGKILL whatever is left of the
    group after ``grace`` seconds, and reap ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # children that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def gateway(root: Path, preset: str, names: tuple[str, ...] = ("m1", "m2"), *,
            gateway_spec: str | None = None, extra_models: dict[str, tuple[Path, str]] | None = None
            ) -> Iterator[Served]:
    """Tiny llama GGUF models ``names`` (in ``root/models``), each with ``preset`` (a YAML flow mapping), behind
    ``athanor serve``, all under ``root``; ``gateway_spec``: the Gateway's spec as a YAML flow mapping (default:
    none applied); ``extra_models``: more GGUF models, name -> (weights, preset). Stopped with ``athanor down`` at the end, which also writes every pending state.json record
    (read it after the block); the daemon is killed if it outlives that. Its output goes to ``root/daemon.log``."""
    env = {**os.environ, "ATHANOR_HOME": str(root / "home"), "HF_HUB_CACHE": str(root / "hub")}
    specs = [f"apiVersion: athanor.dev/v1alpha1\nkind: Gateway\nmetadata: {{name: default}}\n"
             f"spec: {gateway_spec}\n"] if gateway_spec else []
    served = [(name, gguf, preset) for name, gguf in zip(names, tiny_models(root / "models", names))]
    for name, gguf, model_preset in served + [(n, w, p) for n, (w, p) in (extra_models or {}).items()]:
        specs.append(f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
                     f"spec:\n  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
                     f"  preset: {model_preset}\n")
    subprocess.run([ATHANOR, "apply", "-f", "-"], input="---\n".join(specs), text=True, env=env, check=True,
                   capture_output=True)
    port = free_port()
    with open(root / "daemon.log", "wb") as log:  # its own log, for a run kept to look into a failure
        daemon = subprocess.Popen([ATHANOR, "serve", "--listen", f"127.0.0.1:{port}"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(url + "/health", daemon, "the gateway")
        yield Served(url, root / "home")
    finally:
        subprocess.run([ATHANOR, "down"], env=env, capture_output=True)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def sweep(root: Path) -> list[int]:
    """Kill every process still running that names ``root`` in its command line or ATHANOR_HOME (a runtime
    or a daemon that outlived its stop); returns their pids."""
    killed = []
    mark_path = str(root)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            named = any(mark_path in part for part in proc.info["cmdline"] or [])
            if not named:
                named = proc.environ().get("ATHANOR_HOME", "").startswith(mark_path)
            if named:
                proc.kill()
                killed.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    gone = []
    for pid in killed:
        with contextlib.suppress(psutil.NoSuchProcess):
            gone.append(psutil.Process(pid))
    psutil.wait_procs(gone, timeout=10)
    return killed
