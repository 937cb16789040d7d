"""What the benchmarks share: tiny GGUF models in a private ATHANOR_HOME and a gateway serving them."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


@contextlib.contextmanager
def gateway(root: Path, preset: str, names: tuple[str, ...] = ("m1", "m2")) -> Iterator[Served]:
    """Tiny llama GGUF models ``names``, each with ``preset`` (a YAML flow mapping), behind ``athanor serve``, all
    under ``root``; stopped with ``athanor down`` at the end, which also writes every pending state.json record
    (read it after the block)."""
    env = {**os.environ, "ATHANOR_HOME": str(root / "home"), "HF_HUB_CACHE": str(root / "hub")}
    specs = []
    for name in names:
        gguf = write_tiny_llama_gguf(root / f"{name}.gguf", context_length=2048, name=name)
        specs.append(f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
                     f"spec:\n  runtime: llama-server\n  source: {{path: {json.dumps(str(gguf))}}}\n"
                     f"  preset: {preset}\n")
    subprocess.run([ATHANOR, "apply", "-f", "-"], input="---\n".join(specs), text=True, env=env, check=True,
                   capture_output=True)
    port = free_port()
    daemon = subprocess.Popen([ATHANOR, "serve", "--listen", f"127.0.0.1:{port}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("the gateway did not start") from None
                time.sleep(0.05)  # polling while the gateway starts
        yield Served(url, root / "home")
    finally:
        subprocess.run([ATHANOR, "down"], env=env, capture_output=True)
        daemon.wait(30)
