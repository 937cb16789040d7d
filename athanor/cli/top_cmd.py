"""``athanor top``: the gateway's /metrics and status, live, one row per model, rates over the last interval."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import click

from athanor.cli.common import store


def _snapshot(client: Any) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per-model totals from /metrics, and the daemon's status."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            row = totals[model]
            if s.name == "athanor_requests_total":
                row["requests"] += s.value
                if not s.labels["status"].startswith("2"):
                    row["errors"] += s.value
            elif s.name == "athanor_tokens_total":
                row[s.labels["kind"]] += s.value
            elif s.name in ("athanor_request_duration_seconds_sum", "athanor_request_duration_seconds_count",
                            "athanor_time_to_first_token_seconds_sum", "athanor_time_to_first_token_seconds_count",
                            "athanor_load_seconds_sum", "athanor_load_seconds_count"):
                row[s.name] += s.value
    return totals, client.get("/status")


def _per(delta: float, seconds: float) -> str:
    return f"{delta / seconds:.1f}" if seconds > 0 else "-"


def _mean(row: dict[str, float], before: dict[str, float], name: str) -> str:
    count = row[f"{name}_count"] - before.get(f"{name}_count", 0.0)
    if count <= 0:
        return "-"
    return f"{(row[f'{name}_sum'] - before.get(f'{name}_sum', 0.0)) / count * 1000:.0f}ms"


def render(totals: dict[str, dict[str, float]], status: dict[str, Any], before: dict[str, dict[str, float]],
           seconds: float) -> str:
    """One screen: a row per model with what changed since ``before`` (``seconds`` ago)."""
    from athanor import views

    instances = status.get("instances", {})
    header = ["MODEL", "PHASE", "INFLIGHT", "QUEUED", "REQ/S", "TOK/S", "LATENCY", "TTFT", "REQUESTS", "ERRORS",
              "PROMPT", "COMPLETION", "LOADS"]
    rows = []
    for name in sorted(set(totals) | set(instances)):
        row, old = totals.get(name, defaultdict(float)), before.get(name, {})
        inst = instances.get(name, {})
        rows.append([
            name, inst.get("phase", "Standby"), str(inst.get("inflight", 0)), str(inst.get("waiting", 0)),
            _per(row["requests"] - old.get("requests", 0.0), seconds),
            _per(row["completion"] - old.get("completion", 0.0), seconds),
            _mean(row, old, "athanor_request_duration_seconds"),
            _mean(row, old, "athanor_time_to_first_token_seconds"),
            f"{row['requests']:.0f}", f"{row['errors']:.0f}", f"{row['prompt']:.0f}", f"{row['completion']:.0f}",
            f"{row['athanor_load_seconds_count']:.0f}",
        ])
    title = f"athanor top - gateway pid {status.get('pid')} - {time.strftime('%H:%M:%S')}"
    if status.get("storeProblem"):
        title += f"\nwarning: {status['storeProblem']}"
    return title + "\n\n" + views.render_table(header, rows)


@click.command("top")
@click.option("-n", "--interval", default=2.0, show_default=True, help="Seconds between updates.")
@click.option("--once", is_flag=True, help="Print one snapshot (rates over one interval) and exit.")
def top_cmd(interval: float, once: bool) -> None:
    """Requests, tokens, latency and phases per model, live from the running gateway (Ctrl-C quits).

    Rates (REQ/S, TOK/S) and means (LATENCY, TTFT) cover the last interval; the other columns are totals since
    the gateway started."""
    from athanor.cli.admin_client import AdminClient

    if interval <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--interval")
    client = AdminClient.for_store(store())
    before, _ = _snapshot(client)
    taken = time.monotonic()
    tty = click.get_text_stream("stdout").isatty() and not once
    try:
        while True:
            time.sleep(interval)  # the refresh interval
            totals, status = _snapshot(client)
            now = time.monotonic()
            screen = render(totals, status, before, now - taken)
            if tty:
                click.clear()
            click.echo(screen)
            if once:
                return
            before, taken = {k: dict(v) for k, v in totals.items()}, now
    except KeyboardInterrupt:
        return
