"""search and trending: Hub repos as athanor would pull them, with this machine's fit band.

The work is in athanor.hub (huggingface_hub is imported there, when a command runs); this module only prints.
"""

from __future__ import annotations

import json
from typing import Any

import click

_HEADER = ["REPO", "FORMAT", "SIZE", "QUANT", "FIT", "DOWNLOADS"]
_WIDE = ["LIKES", "TRENDING", "MODIFIED", "FILES"]

_output_option = click.option("-o", "--output", type=click.Choice(("json", "wide")), default=None,
                              help="Output format (default: a table).")
_limit_option = click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, metavar="N",
                             help="At most N repos.")


@click.command("search")
@click.argument("query", required=False)
@click.option("--mlx", "fmt", flag_value="mlx", help="MLX repos only (mlx_lm.server).")
@click.option("--gguf", "fmt", flag_value="gguf", help="GGUF repos only (llama-server).")
@click.option("--any", "fmt", flag_value="any", default=True, help="Both, and plain safetensors (the default).")
@click.option("--author", metavar="A", help="Repos of this user or organisation only, e.g. mlx-community.")
@click.option("--sort", type=click.Choice(("downloads", "likes", "trending", "modified", "size", "fit")),
              default="downloads", show_default=True,
              help="size: smallest first; fit: comfortable, tight, risky on this machine, then downloads.")
@_limit_option
@_output_option
def search_cmd(query: str | None, fmt: str, author: str | None, sort: str, limit: int, output: str | None) -> None:
    """Search the Hugging Face Hub for models athanor can serve.

    QUERY matches repo ids (case-insensitive). A QUERY that is a repo id (org/name) also lists the repos made
    from it, such as its MLX and GGUF conversions (tagged base_model:org/name on the Hub).

    Each row is what `athanor pull` would fetch: for GGUF the preferred quant (Q4_K_M, Q5_K_M, Q6_K, Q4_K_S,
    Q8_0, else the smallest), split shards summed, a vision projector (mmproj) counted beside; for MLX the
    weights. FIT says how the estimate (weights, KV cache at the default context, runtime) sits in this
    machine's available memory. HF_ENDPOINT and HF_TOKEN are honoured.
    """
    from athanor import hub

    _print(hub.search(query, fmt=fmt, author=author, sort=sort, limit=limit), output)


@click.command("trending")
@_limit_option
@_output_option
def trending_cmd(limit: int, output: str | None) -> None:
    """The Hub's trending models athanor can serve, with this machine's fit band."""
    from athanor import hub

    _print(hub.trending(limit), output)


def _print(rows: list[Any], output: str | None) -> None:
    if output == "json":
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    if not rows:
        click.echo("No matching repos found.", err=True)
        return
    from athanor.views import human_bytes, human_count, render_table

    header = _HEADER + (_WIDE if output == "wide" else [])
    table = []
    for row in rows:
        quant = row.quant or "-"
        if row.projector:
            quant += " +mmproj"
        cells = [row.repo, row.format, human_bytes(row.size_bytes), quant, row.fit or "-", human_count(row.downloads)]
        if output == "wide":
            files = row.files[0] if len(row.files) == 1 else f"{row.files[0]} (+{len(row.files) - 1})"
            cells += [human_count(row.likes), f"{row.trending_score:g}", (row.last_modified or "-")[:10], files]
        table.append(cells)
    click.echo(render_table(header, table))
    gated = [row.repo for row in rows if row.gated]
    if gated:
        click.echo(f"\ngated (accept the terms on the Hub, then set HF_TOKEN to pull): {', '.join(gated)}")
