"""The runtimes as doctor reports them: where each is, its version, how it was installed, and the command that
installs it when it is missing.

What each runtime is comes from ``probe.py``, gathered once into the ``Context``; this check reads it there and
adds the fix: the command that installs a missing runtime, or the Gateway setting that names a wrong one.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from athanor.doctor.check import GATEWAY_FIX, Check
from athanor.doctor.context import Context
from athanor.doctor.probe import RUNTIME_DISTS, our_pip, shown
from athanor.errors import RuntimeNotFoundError
from athanor.runtimes.launch import RUNTIMES, find_runtime
from athanor.runtimes.resolve import runtime_path


def checkout() -> Path | None:
    """The source checkout athanor runs from, when it runs from that checkout's own ``.venv`` (set up by
    ``scripts/setup.sh``, which then also installs the runtimes)."""
    root = Path(__file__).resolve().parents[2]  # CHECKOUT/athanor/doctor/runtimes.py
    if not (root / "scripts" / "setup.sh").is_file():
        return None
    try:
        same = Path(sys.prefix).resolve() == (root / ".venv").resolve()
    except OSError:
        return None
    return root if same else None


def install_fix(runtime: str, system: str, root: Path | None, pip: str) -> str:
    """The command that installs ``runtime`` where athanor finds it (``root``: the checkout athanor runs from)."""
    if runtime == "llama-server" and system == "Darwin":
        return "brew install llama.cpp"
    if runtime in ("llama-server", "mlx-lm") and root is not None:
        return f"bash {shown(root / 'scripts' / 'setup.sh')}"
    package = RUNTIME_DISTS[runtime]
    if runtime != "llama-server" and system == "Linux":
        return f'{pip} install "mlx[cpu]" {package}'
    return f"{pip} install {package}"


def _configured_path_fix(runtime: str, binary: str) -> str:
    """The Gateway names an executable that is not there: point the setting at one, or remove it (the fix says
    where the lookup finds the runtime without it)."""
    try:
        elsewhere = f": {binary} is at {find_runtime(runtime)}"
    except RuntimeNotFoundError:
        elsewhere = ""
    return f"{GATEWAY_FIX} with spec.runtimes.{runtime}.path set to an executable (or removed{elsewhere})"


def check_runtimes(ctx: Context) -> Iterator[Check]:
    """One line per runtime: where it is and its version, or why it cannot run and what fixes it. A runtime is
    required when a registered model uses it."""
    root = checkout()
    for runtime, kind in RUNTIMES.items():
        users = ctx.users(runtime)
        used = f"used by {', '.join(users)}" if users else "no registered model uses it"
        info = ctx.runtimes.get(runtime)
        if info is None:  # MLX on an Intel Mac: never probed
            detail = f"not applicable: MLX needs Apple Silicon (this Mac is {ctx.machine})"
            if users:
                yield Check(False, kind.binary, f"{detail}, but {used}", f"athanor delete model {' '.join(users)}",
                            required=True)
            else:
                yield Check(True, kind.binary, detail)
            continue
        if info.path is None or info.problem:
            where = f"{info.path}: " if info.path else ""
            if info.path is None and runtime_path(ctx.doc, runtime):
                fix = _configured_path_fix(runtime, kind.binary)
            else:
                fix = install_fix(runtime, ctx.system, root, our_pip())
            if runtime == "mlx-vlm" and not users and info.path is None:
                # Optional and needed by nothing registered: nothing is wrong; say how to add it.
                yield Check(True, kind.binary, f"not installed; optional, for MLX vision models (install: {fix})")
                continue
            yield Check(False, kind.binary, f"{where}{info.problem}; {used}", fix, required=bool(users))
            continue
        version = f"version {info.version}" if info.version else "version unknown"
        yield Check(True, kind.binary, f"{info.path}, {version}, installed by {info.installed_by}; {used}",
                    required=bool(users))
