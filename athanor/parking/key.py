"""Which park files a runtime may restore: a key over everything a restore depends on, and whether parking can work.

A slot file holds K/V tensors laid out for one model, one binary and one cache configuration. Offered to anything
else, llama-server may refuse it, abort, or worse, accept it. So the park directory of a start is named by a hash
of: the weights (path, size, mtime and the hash of their first MiB: a file replaced in place under the same name
and size still changes it), the projector and the draft model likewise, the runtime binary (path, size, mtime),
and the runtime's whole argv except what provably does not shape the cache (network, auth, threads, sampling,
logging). Hashing the argv rather than a list of cache flags errs one way only: a new flag costs a re-prefill,
never a wrong restore. An MLX start adds what its argv cannot say (``mlx_identity``): the model directory's files
and the server's version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEAD_BYTES = 2**20
KEY_CHARS = 16  # 64 bits of sha256: a directory name, not a security boundary (the manifest carries the full key)

# Flags (with the number of values each takes) that do not change what a slot file holds or how it loads.
NEUTRAL_FLAGS: Mapping[str, int] = {
    "--host": 1, "--port": 1, "--alias": 1, "--api-key-file": 1, "--threads-http": 1, "--threads": 1,
    "--temp": 1, "--top-p": 1, "--top-k": 1, "--min-p": 1, "--n-predict": 1, "--repeat-penalty": 1, "--seed": 1,
    "--log-verbosity": 1, "--slot-save-path": 1,
}

# Architectures whose cache is recurrent or hybrid: a slot file does not carry their state checkpoints
# (llama.cpp #25913), so a restore would resume from a state that is not the conversation's.
RECURRENT_ARCHITECTURES = frozenset({
    "mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1", "granitehybrid",
    "nemotron_h", "qwen3next", "lfm2", "lfm2moe", "plamo2", "minimax-m2-hybrid",
})


@functools.lru_cache(maxsize=256)
def _head_hash(path: str, size: int, mtime_ns: int) -> str:
    """The first MiB's sha256, remembered per (path, size, mtime): the monitor derives launches every few
    seconds, and a model's head does not change without its mtime changing."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()


def file_identity(path: str, *, head: bool = True) -> dict[str, Any]:
    """What identifies a file's contents without reading all of it. Missing files say so (the key then changes
    when they appear)."""
    try:
        st = os.stat(path)
        identity: dict[str, Any] = {"path": path, "size": st.st_size, "mtime": st.st_mtime_ns}
        if head:
            identity["head"] = _head_hash(path, st.st_size, st.st_mtime_ns)
    except OSError as exc:  # gone, or gone between the stat and the read (a rescan moving a repo meanwhile)
        return {"path": path, "missing": type(exc).__name__}
    return identity


def shaping_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the flags that do not shape the cache (``NEUTRAL_FLAGS``) and without the binary."""
    kept: list[str] = []
    skip = 0
    for arg in argv[1:]:
        if skip:
            skip -= 1
        elif arg in NEUTRAL_FLAGS:
            skip = NEUTRAL_FLAGS[arg]
        else:
            kept.append(arg)
    return kept


def park_key(argv: Sequence[str], weights: Sequence[str], *, stat_only: Sequence[str] = ()) -> str:
    """The key of a start: ``argv`` as it will run (before ``--slot-save-path``), ``weights`` every model file it
    loads (the model, a projector, a draft), ``stat_only`` files known by path, size and mtime alone (an MLX
    model's shards, a server script)."""
    identity: dict[str, Any] = {
        "binary": file_identity(argv[0], head=False),
        "weights": [file_identity(path) for path in weights],
        "argv": shaping_argv(argv),
    }
    if stat_only:  # absent otherwise: llama-server's keys stay what they were
        identity["files"] = [file_identity(path, head=False) for path in stat_only]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def mlx_identity(argv: Sequence[str], model_dir: str) -> tuple[list[str], list[str]]:
    """(files hashed by their head, files known by their stat) that identify an MLX start beyond its argv.

    A guarded MLX runtime's ``argv[0]`` is the Python that runs the server (``runtimes/guarded.py``), which says
    nothing of mlx-vlm's version, and athanor cannot import the runtime's packages. So: the server's console script
    (pip rewrites it on every install or upgrade) and, when it sits in the usual ``lib/python*/site-packages`` of
    that Python's prefix, ``mlx_vlm/version.py`` (its head hash holds the version string); the model directory's
    ``config.json`` (hashed) and its ``*.safetensors`` (stat: reading a MiB of each of dozens of shards every few
    seconds buys nothing over their size and mtime)."""
    script = argv[argv.index("--") + 1] if "--" in argv[:-1] else argv[0]
    prefix = Path(argv[0]).parent.parent
    versions = sorted(str(p) for p in prefix.glob("lib/python*/site-packages/mlx_vlm/version.py"))
    directory = Path(model_dir)
    return ([str(directory / "config.json"), *versions],
            [script, *sorted(str(p) for p in directory.glob("*.safetensors"))])


def unparkable(runtime: str, facts: Mapping[str, Any], *, task: str | None, mmproj: str | None,
               argv: Sequence[str]) -> str | None:
    """Why this model's slots are not parked (None: they are). ``facts``: the artifact's discovered metadata."""
    if runtime not in ("llama-server", "mlx-vlm"):
        return (f"{runtime} keeps its prompt cache in memory only (see the README's KV parking section; "
                "`athanor flavor MODEL vlm` serves an MLX model on mlx-vlm, whose cache is parked)")
    if task:
        return f"an {task} model keeps no conversation"
    if runtime == "mlx-vlm":
        return None  # its prefix cache keeps hybrid models' checkpoints and hashes images into its blocks (apc.py)
    architecture = facts.get("architecture")
    if facts.get("recurrent") or architecture in RECURRENT_ARCHITECTURES:
        return (f"its cache is recurrent or hybrid ({architecture}): llama-server does not save its state "
                "checkpoints with a slot (llama.cpp #25913)")
    if facts.get("slidingWindow") and "--swa-full" not in argv:
        return ("it uses sliding-window attention, whose checkpoints llama-server does not save with a slot "
                "(llama.cpp #25913); preset args --swa-full keeps a full cache, which can be parked")
    if mmproj:
        return ("it loads a projector: a slot that holds an image is saved only by builds with llama.cpp #26640, "
                "which this build cannot be shown to have")
    return None
