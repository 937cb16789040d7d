"""Prometheus metrics, counted with plain integers on the request path and rendered only when scraped.

prometheus-client's own counters take a lock and resolve label children on every increment, a cost every proxied
request would pay. So requests are counted into dicts keyed by label tuples (``ingress/counters.py``, compiled with
the request path), histograms are bucket lists, and ``render`` turns them into the text format at scrape time,
through prometheus-client's collector API so the exposition is exactly what Prometheus parses.

What the controller does (loads, swaps, evictions, failures) arrives as events (``controller/events.py``); what
is true now (phases, queue depth, requests in flight) is read from the controller at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from athanor.ingress.counters import Histogram, RequestCounts

if TYPE_CHECKING:
    from athanor.controller.controller import Controller

LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FAILURE_REASONS = ("Crashed", "Hung", "Unhealthy", "StartFailed", "StopFailed", "RestoreFailed")
PARKING = {"Parked": "park", "Restored": "restore"}  # event reason -> operation
PARKING_PROBLEMS = ("ParkRejected", "RestoreRefused", "ParkFailed", "ParkEvicted")
PHASES = ("Standby", "Starting", "Ready", "Draining", "Stopping", "Failed")


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.request_counts = RequestCounts()  # what each request adds, on the request path (``Tap``)
        self.ttft = self.request_counts.ttft  # model -> time to the first streamed byte
        self.loads: dict[str, Histogram] = {}  # model -> seconds from start to ready
        self.evictions: dict[str, int] = {}
        self.failures: dict[tuple[str, str], int] = {}  # (model, reason)
        self.swaps = 0
        self.parking: dict[tuple[str, str], list[float]] = {}  # (model, park|restore) -> [count, bytes, seconds]
        self.parking_problems: dict[tuple[str, str], int] = {}  # (model, reason)

    # ------------------------------------------------------------------ what requests counted

    @property
    def requests(self) -> dict[tuple[str, str, int], int]:
        """(model, route, status) -> count."""
        return {(model, route, status): count for (model, route), counts in self.request_counts.routes.items()
                for status, count in counts.statuses.items()}

    @property
    def latency(self) -> dict[tuple[str, str], Histogram]:
        """(model, route) -> the durations of its requests."""
        return {key: counts.latency for key, counts in self.request_counts.routes.items() if counts.statuses}

    @property
    def tokens(self) -> dict[tuple[str, str], int]:
        """(model, prompt|completion) -> tokens reported, for those with any."""
        return {(model, kind): count for model, (prompt, completion) in self.request_counts.tokens.items()
                for kind, count in (("prompt", prompt), ("completion", completion)) if count}

    # ------------------------------------------------------------------ the controller's events

    def event(self, event: dict[str, Any]) -> None:
        """An EventLog listener: loads, swaps, evictions and failures as they happen."""
        reason, name = event["reason"], event["name"]
        if reason == "Ready" and "loadSeconds" in event:
            hist = self.loads.get(name)
            if hist is None:
                hist = self.loads[name] = Histogram(LOAD_BUCKETS)
            hist.observe(event["loadSeconds"])
        elif reason == "Swapping":
            self.swaps += 1
        elif reason == "Evicted":
            self.evictions[name] = self.evictions.get(name, 0) + 1
        elif reason in FAILURE_REASONS and event.get("phase") == "Failed":
            self.failures[(name, reason)] = self.failures.get((name, reason), 0) + 1
        elif reason in PARKING:
            figures = self.parking.setdefault((name, PARKING[reason]), [0, 0, 0.0])
            figures[0] += 1
            figures[1] += event.get("bytes", 0)
            figures[2] += event.get("seconds", 0.0)
        elif reason in PARKING_PROBLEMS:
            self.parking_problems[(name, reason)] = self.parking_problems.get((name, reason), 0) + 1

    # ------------------------------------------------------------------ scrape time

    def as_json(self, controller: Controller) -> dict[str, Any]:
        """The same counts as ``render``, per model, for the admin API's ``GET /athanor/v1/metrics`` (a TUI's
        figures without parsing the text format). ``errors``: answers with a status of 400 or more, except 499
        (the client went away)."""
        models: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            found = models.get(name)
            if found is None:
                found = models[name] = {
                    "requests": 0, "errors": 0, "statuses": {}, "promptTokens": 0, "completionTokens": 0,
                    "ttftSecondsSum": 0.0, "ttftCount": 0, "durationSecondsSum": 0.0, "durationCount": 0,
                    "loadSecondsSum": 0.0, "loadCount": 0, "evictions": 0, "failures": {}, "phase": None,
                    "inflight": 0, "waiting": 0, "parking": {}}
            return found

        for (model, _route, status), count in self.requests.items():
            e = entry(model)
            e["requests"] += count
            e["statuses"][str(status)] = e["statuses"].get(str(status), 0) + count
            if status >= 400 and status != 499:
                e["errors"] += count
        for (model, _route), hist in self.latency.items():
            e = entry(model)
            e["durationSecondsSum"] += hist.total
            e["durationCount"] += sum(hist.counts)
        for model, hist in self.ttft.items():
            e = entry(model)
            e["ttftSecondsSum"], e["ttftCount"] = hist.total, sum(hist.counts)
        for (model, kind), count in self.tokens.items():
            entry(model)["promptTokens" if kind == "prompt" else "completionTokens"] += count
        for model, hist in self.loads.items():
            e = entry(model)
            e["loadSecondsSum"], e["loadCount"] = hist.total, sum(hist.counts)
        for model, count in self.evictions.items():
            entry(model)["evictions"] = count
        for (model, reason), count in self.failures.items():
            entry(model)["failures"][reason] = count
        for (model, operation), (count, size, seconds) in self.parking.items():
            entry(model)["parking"][operation] = {"count": count, "bytes": size, "seconds": seconds}
        for name, inst in controller.instances.items():
            e = entry(name)
            e["phase"], e["inflight"], e["waiting"] = inst.phase.value, inst.inflight, inst.waiting
        return {"startTime": self.started, "swaps": self.swaps, "models": dict(sorted(models.items()))}

    def render(self, controller: Controller) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, controller))
        return generate_latest(registry)


class _Collector:
    """prometheus-client's collector protocol over the plain counts."""

    def __init__(self, metrics: Metrics, controller: Controller):
        self.metrics = metrics
        self.controller = controller

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = self.metrics
        requests = CounterMetricFamily("athanor_requests", "Requests proxied, by model, route and HTTP status "
                                       "(499: the client went away before the end of its answer).",
                                       labels=["model", "route", "status"])
        for (model, route, status), count in sorted(m.requests.items()):
            requests.add_metric([model, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily("athanor_request_duration_seconds",
                                        "Time from a request's arrival to the end of its answer (loads included).",
                                        labels=["model", "route"])
        for (model, route), hist in sorted(m.latency.items()):
            latency.add_metric([model, route], hist.cumulative(), hist.total)
        yield latency
        ttft = HistogramMetricFamily("athanor_time_to_first_token_seconds",
                                     "Time from a streamed request's arrival to its first byte from the runtime.",
                                     labels=["model"])
        for model, hist in sorted(m.ttft.items()):
            ttft.add_metric([model], hist.cumulative(), hist.total)
        yield ttft
        tokens = CounterMetricFamily("athanor_tokens", "Tokens the runtimes reported in usage, by kind.",
                                     labels=["model", "kind"])
        for (model, kind), count in sorted(m.tokens.items()):
            tokens.add_metric([model, kind], count)
        yield tokens
        loads = HistogramMetricFamily("athanor_load_seconds", "Time from a runtime's start to its readiness.",
                                      labels=["model"])
        for model, hist in sorted(m.loads.items()):
            loads.add_metric([model], hist.cumulative(), hist.total)
        yield loads
        yield CounterMetricFamily("athanor_swaps", "Starts that stopped other models to make room.", value=m.swaps)
        evictions = CounterMetricFamily("athanor_evictions", "Times a model was stopped to make room for another.",
                                        labels=["model"])
        for model, count in sorted(m.evictions.items()):
            evictions.add_metric([model], count)
        yield evictions
        failures = CounterMetricFamily("athanor_failures", "Runtime failures by reason (Crashed, Hung, Unhealthy, "
                                       "StartFailed, RestoreFailed).", labels=["model", "reason"])
        for (model, reason), count in sorted(m.failures.items()):
            failures.add_metric([model, reason], count)
        yield failures
        yield from self._parking()
        phase = GaugeMetricFamily("athanor_model_phase", "1 for the phase each model is in.",
                                  labels=["model", "phase"])
        waiting = GaugeMetricFamily("athanor_queue_depth", "Requests waiting for a model to load or swap in.",
                                    labels=["model"])
        inflight = GaugeMetricFamily("athanor_requests_in_flight", "Requests a model's runtime is answering.",
                                     labels=["model"])
        for name, inst in sorted(self.controller.instances.items()):
            for value in PHASES:
                phase.add_metric([name, value], 1.0 if inst.phase.value == value else 0.0)
            waiting.add_metric([name], inst.waiting)
            inflight.add_metric([name], inst.inflight)
        yield phase
        yield waiting
        yield inflight
        yield GaugeMetricFamily("athanor_start_time_seconds", "When the gateway started (Unix time).",
                                value=m.started)

    def _parking(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        m = self.metrics
        families = [CounterMetricFamily(f"athanor_parking_{what}", help_text, labels=["model", "operation"])
                    for what, help_text in (("operations", "KV parking saves (park) and restores (restore)."),
                                            ("bytes", "Bytes of K/V parked and restored."),
                                            ("seconds", "Seconds spent parking and restoring."))]
        for (model, operation), figures in sorted(m.parking.items()):
            for family, value in zip(families, figures, strict=True):
                family.add_metric([model, operation], value)
        yield from families
        problems = CounterMetricFamily("athanor_parking_problems", "Park files rejected, restores refused, saves "
                                       "failed and files evicted for the budget, by event reason.",
                                       labels=["model", "reason"])
        for (model, reason), count in sorted(m.parking_problems.items()):
            problems.add_metric([model, reason], count)
        yield problems
