"""``athanor render --target kubernetes``: the desired state as manifests, for ``kubectl apply``."""

from __future__ import annotations

from pathlib import Path

import click

from athanor import actions, catalog
from athanor.cli.common import filename_option, store, warn


@click.command("render")
@click.option("--target", type=click.Choice(["kubernetes"]), required=True, help="What to render for.")
@filename_option
@click.option("-o", "--output", "output", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Write one file per model, gateway.yaml and a kustomization.yaml here (default: "
              "YAML on stdout).")
def render_cmd(target: str, filenames: tuple[str, ...], output: Path | None) -> None:
    """Render the models PATH describes (with this machine's store and HF cache for their weights' files and
    sizes) as Kubernetes manifests: per model a Deployment at zero replicas and a ClusterIP Service, and the
    gateway that scales them on demand (serviceManager: kubernetes): its Deployment, Service, the ConfigMap
    holding the models it serves, and a ServiceAccount with its Role and RoleBinding.

    Nothing is written to the store. The same specs give the same bytes. The runtime key Secret is not rendered:
    create it with kubectl (see the README)."""
    from athanor.kubernetes.manifests import DEFAULT_NAMESPACE, render
    from athanor.kubernetes.output import to_yaml, write_dir

    doc = actions.planned(store(), filenames, stdin=click.get_text_stream("stdin"))
    rendered = render(doc)
    for name, reason in rendered.skipped.items():
        warn(f"model {name!r} left out: {reason}")
    for note in rendered.notes:
        warn(note)
    if output is None:
        click.echo(to_yaml(rendered.objects), nl=False)
        return
    namespace = (catalog.gateway_spec(doc).get("kubernetes") or {}).get("namespace", DEFAULT_NAMESPACE)
    for path in write_dir(rendered, output, namespace):
        click.echo(f"wrote {path}")
