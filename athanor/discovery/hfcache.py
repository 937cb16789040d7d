"""Models in the local Hugging Face hub cache, found through ``huggingface_hub``'s own cache scanner.

The cache location is the Gateway's ``spec.discovery.hfCacheDir`` when set, else follows the hub's rules at call time
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the XDG cache), so a test or a user can point it anywhere without
re-importing anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.discovery.artifacts import Artifact, gguf_artifact, is_model_gguf, mlx_artifact
from athanor.discovery.mlx import is_mlx_dir


def hf_cache_location(discovery: Mapping[str, Any] | None = None) -> tuple[Path, str]:
    """(the HF cache, what named it): ``discovery``'s ``hfCacheDir`` (the Gateway's ``spec.discovery``) when set,
    else ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else the XDG cache (``default``). Scan, the cache watcher, pull,
    delete and doctor all ask here, so they agree on the one directory."""
    configured = (discovery or {}).get("hfCacheDir")
    if configured:
        return Path(configured).expanduser(), "Gateway spec.discovery.hfCacheDir"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser(), "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "HF_HOME"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub", "default"


def hf_cache_dir(discovery: Mapping[str, Any] | None = None) -> Path:
    """The HF cache ``discovery`` names (see ``hf_cache_location``); the hub's own rules without it."""
    return hf_cache_location(discovery)[0]


@dataclass
class _Revision:
    commit: str
    refs: frozenset[str]
    snapshot: Path
    last_modified: float


@dataclass
class HFCacheIndex:
    """Every model repo and revision in one cache, scanned once."""

    cache_dir: Path
    repos: dict[str, list[_Revision]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def scan(cls, cache_dir: Path | None = None) -> HFCacheIndex:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        index = cls(cache_dir or hf_cache_dir())
        if not index.cache_dir.is_dir():
            return index
        try:
            info = scan_cache_dir(index.cache_dir)
        except CacheNotFound:
            return index
        except (OSError, ValueError) as exc:
            index.warnings.append(f"{index.cache_dir}: cannot scan the Hugging Face cache: {exc}")
            return index
        index.warnings += [str(w) for w in info.warnings]
        for repo in info.repos:
            if repo.repo_type != "model":
                continue
            index.repos[repo.repo_id] = [
                _Revision(rev.commit_hash, frozenset(rev.refs), Path(rev.snapshot_path), rev.last_modified)
                for rev in repo.revisions
            ]
        return index

    def discovered(self) -> list[Artifact]:
        """The models of each repo's current revision (``main``, else the newest)."""
        found: list[Artifact] = []
        for repo_id in sorted(self.repos):
            revision = self._pick(repo_id, None)
            if revision is not None:
                found += _artifacts_in(repo_id, revision)
        return found

    def resolve(self, hf: dict[str, Any]) -> Artifact | None:
        """The artifact an ``hf`` source names, or None when it is not in the cache."""
        revision = self._pick(hf["repo"], hf.get("revision"))
        if revision is None:
            return None
        source = {"hf": dict(hf)}
        if hf.get("file"):
            path = revision.snapshot / hf["file"]
            return gguf_artifact(path, source, revision=revision.commit) if path.is_file() else None
        if is_mlx_dir(revision.snapshot):
            return mlx_artifact(revision.snapshot, source, revision=revision.commit)
        return None

    def _pick(self, repo_id: str, wanted: str | None) -> _Revision | None:
        revisions = self.repos.get(repo_id, [])
        if wanted:
            for rev in revisions:
                if wanted in rev.refs or rev.commit.startswith(wanted):
                    return rev
            return None
        for rev in revisions:
            if "main" in rev.refs:
                return rev
        return max(revisions, key=lambda r: r.last_modified, default=None)


def _artifacts_in(repo_id: str, revision: _Revision) -> list[Artifact]:
    snapshot = revision.snapshot
    ggufs = sorted(
        p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if is_model_gguf(p.name)
    )
    if ggufs:
        return [
            gguf_artifact(snapshot / rel, {"hf": {"repo": repo_id, "file": rel}}, revision=revision.commit)
            for rel in ggufs
        ]
    if is_mlx_dir(snapshot):
        artifact = mlx_artifact(snapshot, {"hf": {"repo": repo_id}}, revision=revision.commit)
        # Plain transformers checkpoints (embedders, classifiers) look the same on disk; only register what
        # is recognisably MLX. A spec can still name any such repo explicitly.
        if "mlx" in repo_id.lower() or "quantization" in artifact.metadata:
            return [artifact]
    return []
