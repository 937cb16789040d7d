"""Rendered objects as YAML: one stream, or one file per model and one for the gateway plus a kustomization, the
same bytes every time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from athanor.kubernetes.manifests import Rendered
from athanor.kubernetes.names import object_name


class _Plain(yaml.SafeDumper):
    """No anchors and aliases (``&id001``): a manifest repeats its labels in full, as people write them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    """A string of several lines as a literal block (``|``), as people write one (the gateway's models.json, the
    fetch program); PyYAML falls back to quoting one a block cannot hold exactly."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Plain.add_representer(str, _text)
GATEWAY_FILE = "gateway.yaml"


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document stream, in the order given, keys as built (not sorted: apiVersion and kind come first)."""
    return "".join("---\n" + yaml.dump(obj, Dumper=_Plain, sort_keys=False, default_flow_style=False,
                                        allow_unicode=True) for obj in objects)


def write_dir(rendered: Rendered, directory: Path, namespace: str) -> list[Path]:
    """One file per model (its Deployment and Service), ``gateway.yaml`` (every object of the gateway) and a
    ``kustomization.yaml`` naming them, for ``kubectl apply -k DIR``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if rendered.gateway:
        path = directory / GATEWAY_FILE
        path.write_text(to_yaml(rendered.gateway), encoding="utf-8")
        written.append(path)
    for name, objects in sorted(rendered.by_model.items(), key=lambda item: object_name("athanor", item[0])):
        path = directory / f"{object_name('athanor', name)}.yaml"
        path.write_text(to_yaml(objects), encoding="utf-8")
        written.append(path)
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "namespace": namespace, "resources": [p.name for p in written]}  # the gateway, then by name
    index = directory / "kustomization.yaml"
    index.write_text(yaml.safe_dump(kustomization, sort_keys=False), encoding="utf-8")
    return [*written, index]
