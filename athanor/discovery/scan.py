"""One discovery pass: the HF cache plus the gateway's extra directories, resolved once and reused."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from athanor.discovery.artifacts import Artifact, inspect_path, source_key, walk_local
from athanor.discovery.hfcache import HFCacheIndex, hf_cache_dir


@dataclass
class Discovery:
    index: HFCacheIndex
    found: list[Artifact]
    warnings: list[str] = field(default_factory=list)
    _by_key: dict[str, Artifact] = field(default_factory=dict)

    def resolve(self, source: dict[str, Any]) -> Artifact | None:
        """The artifact for a model's source: from this pass when it was seen, else looked up directly."""
        key = source_key(source)
        hf = source.get("hf")
        if key in self._by_key and not (hf and hf.get("revision")):
            return self._by_key[key]
        if hf:
            artifact = self.index.resolve(hf)
        else:
            artifact = inspect_path(Path(os.path.expanduser(source["path"])).absolute(), source)
        if artifact is not None:
            self._by_key[key] = artifact
        return artifact


def discover(discovery_spec: dict[str, Any], extra_paths: tuple[str, ...] = ()) -> Discovery:
    """Scan what the Gateway's ``spec.discovery`` names (HF cache unless disabled, extra paths)."""
    index = HFCacheIndex.scan(hf_cache_dir(discovery_spec))
    found = index.discovered() if discovery_spec.get("hfCache", True) else []
    warnings = list(index.warnings)
    for raw in [*discovery_spec.get("paths", []), *extra_paths]:
        directory = Path(raw).expanduser()
        if not directory.is_dir():
            warnings.append(f"{directory}: discovery path is not a directory; skipped")
            continue
        found += walk_local(directory.absolute())
    result = Discovery(index, found, warnings)
    for artifact in found:
        result._by_key.setdefault(artifact.key, artifact)
    return result
