"""What a model's weights are, read from disk: format, size, metadata and capabilities.

An ``Artifact`` is the detected half of a Model: rescans replace it wholesale, and nothing the user chose lives
here. Reading never raises for a bad file: the problem is recorded so ``describe`` can show it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.discovery.gguf import GGUFError, read_gguf_metadata, split_info
from athanor.discovery.mlx import MLXConfigError, is_mlx_dir, read_mlx_config


@dataclass(frozen=True)
class Artifact:
    source: dict[str, Any]  # {"hf": {"repo", "file"?}} or {"path": "/abs"}
    format: str  # "gguf" or "mlx"
    path: Path  # the .gguf file (first shard) or the MLX directory
    size_bytes: int
    metadata: dict[str, Any] = field(default_factory=dict)
    vision: bool = False
    revision: str | None = None
    mmproj: Path | None = None
    problem: str | None = None

    @property
    def key(self) -> str:
        return source_key(self.source)

    @property
    def default_runtime(self) -> str:
        return "llama-server" if self.format == "gguf" else "mlx-lm"

    @property
    def capabilities(self) -> list[str]:
        """What it can be asked for: ``embedding`` or ``rerank`` models only that; generative ones ``text``, plus
        ``vision`` and ``reasoning`` where detected."""
        task = self.metadata.get("task")
        if task in ("embedding", "rerank"):
            return [task]
        extra = (["vision"] if self.vision else []) + (["reasoning"] if self.metadata.get("reasoning") else [])
        return ["text", *extra]

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format,
            "path": str(self.path),
            "sizeBytes": self.size_bytes,
            "capabilities": self.capabilities,
            "metadata": self.metadata,
        }
        if self.revision:
            data["revision"] = self.revision
        if self.mmproj:
            data["mmproj"] = str(self.mmproj)
        if self.problem:
            data["problem"] = self.problem
        return data


def source_key(source: dict[str, Any]) -> str:
    """One string per place weights can be: what makes a discovered model and an applied spec the same model."""
    if "hf" in source:
        hf = source["hf"]
        return f"hf:{hf['repo']}:{hf['file']}" if hf.get("file") else f"hf:{hf['repo']}"
    return f"path:{os.path.abspath(os.path.expanduser(source['path']))}"


def gguf_artifact(path: Path, source: dict[str, Any], *, revision: str | None = None) -> Artifact:
    """A GGUF file (the first shard of a split model stands for all of them)."""
    size = sum(_size(p) for p in shards(path))
    mmproj = _mmproj_beside(path)
    try:
        info = read_gguf_metadata(path)
    except GGUFError as exc:
        return Artifact(source, "gguf", path, size, revision=revision, mmproj=mmproj, problem=str(exc))
    except OSError as exc:
        return Artifact(source, "gguf", path, size, revision=revision, problem=f"{path}: {exc.strerror}")
    return Artifact(
        source, "gguf", path, size, info.to_dict(), vision=mmproj is not None, revision=revision, mmproj=mmproj
    )


def mlx_artifact(path: Path, source: dict[str, Any], *, revision: str | None = None) -> Artifact:
    size = sum(_size(p) for p in path.rglob("*") if p.is_file() or p.is_symlink())
    try:
        info = read_mlx_config(path)
    except MLXConfigError as exc:
        return Artifact(source, "mlx", path, size, revision=revision, problem=str(exc))
    except OSError as exc:
        return Artifact(source, "mlx", path, size, revision=revision, problem=f"{path}: {exc.strerror}")
    return Artifact(source, "mlx", path, size, info.to_dict(), vision=info.vision, revision=revision)


def inspect_path(path: Path, source: dict[str, Any] | None = None) -> Artifact | None:
    """The artifact at a user-given path (a .gguf file or an MLX directory), or None if there is none."""
    source = source or {"path": str(path)}
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_artifact(path, source)
    if path.is_dir() and is_mlx_dir(path):
        return mlx_artifact(path, source)
    return None


def is_model_gguf(name: str) -> bool:
    """A .gguf that is a model on its own: not a vision projector, not a later shard of a split model."""
    lower = name.lower()
    if not lower.endswith(".gguf") or "mmproj" in lower:
        return False
    split = split_info(name)
    return split is None or split[0] == 1


def walk_local(directory: Path) -> Iterator[Artifact]:
    """Loose .gguf files and MLX directories below ``directory`` (symlinked directories are not followed)."""
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        if is_mlx_dir(here):
            dirs.clear()
            yield mlx_artifact(here, {"path": str(here)})
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_model_gguf(name):
                yield gguf_artifact(here / name, {"path": str(here / name)})


def shards(path: Path) -> list[Path]:
    """A GGUF and, for llama.cpp's split naming (name-00002-of-00003.gguf), every shard of its set."""
    split = split_info(path.name)
    if not split:
        return [path]
    index, total = split
    stem = path.name[: -len(f"-{index:05d}-of-{total:05d}.gguf")]
    return [path.with_name(f"{stem}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def _mmproj_beside(path: Path) -> Path | None:
    """llama.cpp vision models ship their projector as a separate mmproj*.gguf in the same folder."""
    try:
        candidates = sorted(p for p in path.parent.iterdir() if "mmproj" in p.name.lower() and p.suffix == ".gguf")
    except OSError:
        return None
    return candidates[0] if candidates else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size  # follows the HF cache's symlinks to the blob
    except OSError:
        return 0
