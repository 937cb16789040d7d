"""Starter suggestions by memory tier: what is safe to pull on a machine of this size, for an empty registry.

Curated rather than searched: a first model should be a known-good chat model whose 4-bit (or 8-bit, when small)
weights and a working context fit the tier with the OS's headroom to spare. Each suggestion carries the exact
``athanor pull`` command. MLX conversions are offered only where MLX runs (Apple Silicon).
"""

from __future__ import annotations

import platform
import shlex
from dataclasses import dataclass

from athanor.quantities import GIB


@dataclass(frozen=True)
class Starter:
    repo: str
    file: str | None  # the GGUF to pull; None for an MLX repo (pulled whole)
    what: str

    @property
    def mlx(self) -> bool:
        return self.file is None

    @property
    def pull(self) -> str:
        return shlex.join(["athanor", "pull", self.repo, *(["--file", self.file] if self.file else [])])


# (tier name, smallest machine it is for) -> suggestions, best first
TIERS: list[tuple[str, int, list[Starter]]] = [
    ("8 GB", 0, [
        Starter("Qwen/Qwen3-1.7B-GGUF", "Qwen3-1.7B-Q8_0.gguf", "small chat and tool calls, thinking mode"),
        Starter("mlx-community/Qwen3-1.7B-4bit", None, "the same on MLX"),
        Starter("unsloth/gemma-3-4b-it-GGUF", "gemma-3-4b-it-Q4_K_M.gguf", "chat, good at writing"),
    ]),
    ("16 GB", 14 * GIB, [
        Starter("Qwen/Qwen3-8B-GGUF", "Qwen3-8B-Q4_K_M.gguf", "general chat, code and agents"),
        Starter("mlx-community/Qwen3-8B-4bit", None, "the same on MLX"),
        Starter("unsloth/gemma-3-12b-it-GGUF", "gemma-3-12b-it-Q4_K_M.gguf", "chat and writing"),
    ]),
    ("32 GB+", 28 * GIB, [
        Starter("unsloth/Qwen3-30B-A3B-GGUF", "Qwen3-30B-A3B-Q4_K_M.gguf", "mixture of experts: fast for its size"),
        Starter("mlx-community/Qwen3-30B-A3B-4bit", None, "the same on MLX"),
        Starter("unsloth/gemma-3-27b-it-GGUF", "gemma-3-27b-it-Q4_K_M.gguf", "strong dense chat model"),
    ]),
    ("64 GB+", 56 * GIB, [
        Starter("Qwen/Qwen3-32B-GGUF", "Qwen3-32B-Q8_0.gguf", "dense 32B at 8 bits"),
        Starter("unsloth/Llama-3.3-70B-Instruct-GGUF", "Llama-3.3-70B-Instruct-Q4_K_M.gguf", "70B instruct"),
        Starter("mlx-community/Qwen3-32B-8bit", None, "dense 32B on MLX"),
    ]),
]


def mlx_runs_here() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def tier_for(total_bytes: int) -> str:
    """The largest tier this machine's total memory reaches."""
    return [name for name, floor, _ in TIERS if total_bytes >= floor][-1]


def suggestions(total_bytes: int, *, mlx: bool | None = None) -> tuple[str, list[Starter]]:
    """This machine's tier and what to pull, best first (MLX repos only where MLX runs)."""
    mlx = mlx_runs_here() if mlx is None else mlx
    tier = tier_for(total_bytes)
    picks = next(starters for name, _, starters in TIERS if name == tier)
    return tier, [s for s in picks if mlx or not s.mlx]


def empty_state(total_bytes: int) -> str:
    """What ``athanor get models`` (and the TUI) says when nothing is registered."""
    tier, picks = suggestions(total_bytes)
    lines = ["No models registered. Run 'athanor scan' to find models already on disk, or pull one that fits this "
             f"machine ({tier} tier):"]
    lines += [f"  {s.pull:<70}  # {s.what}" for s in picks]
    lines.append("More: 'athanor search QUERY --sort fit'.")
    return "\n".join(lines)
