"""What every proxied request adds to the metrics: its status, its duration, its time to first token and the tokens
its runtime reported, counted with plain integers and rendered only when scraped (``athanor/metrics.py``).

Apart from ``metrics.py`` so that it can be compiled with the rest of the request path (``athanor/native.py``):
interpreted, these few lines were three of the five Python calls left in a proxied request.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# Typed in full: mypyc 2.4 leaves a ``Final`` tuple of floats whose type is inferred unset (a NameError at use).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                             60.0, 120.0, 300.0)
TTFT_BUCKETS: Final[tuple[float, ...]] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip((*map(_float_text, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


def _float_text(value: float) -> str:
    return repr(float(value))


class RouteCounts:
    """What one (model, route) has counted: requests by status, their durations, and the tokens its runtime
    reported (a list shared by the model's routes: [prompt, completion]). A request's ``Tap`` takes its counts
    when it begins and adds to them once, at its end: one object per request instead of a lookup of four
    tuple-keyed dicts."""

    __slots__ = ("latency", "statuses", "tokens")

    def __init__(self, tokens: list[int]):
        self.statuses: dict[int, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.tokens = tokens

    def add(self, status: int, seconds: float, prompt: int = 0, completion: int = 0) -> None:
        """One request that is over (499: its client went away), with the usage it reported."""
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.latency.observe(seconds)
        if prompt or completion:
            tokens = self.tokens
            tokens[0] += prompt
            tokens[1] += completion


class RequestCounts:
    """Every (model, route)'s ``RouteCounts``, and each model's time to first token."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], RouteCounts] = {}  # (model, route)
        self.tokens: dict[str, list[int]] = {}  # model -> [prompt, completion], shared by its RouteCounts
        self.ttft: dict[str, Histogram] = {}  # model -> time to the first streamed byte

    def counts(self, model: str, route: str) -> RouteCounts:
        """What requests of ``model`` on ``route`` add to (``Tap``), made on first use."""
        found = self.routes.get((model, route))
        if found is None:
            tokens = self.tokens.setdefault(model, [0, 0])
            found = self.routes[(model, route)] = RouteCounts(tokens)
        return found

    def first_token(self, model: str, seconds: float) -> None:
        hist = self.ttft.get(model)
        if hist is None:
            hist = self.ttft[model] = Histogram(TTFT_BUCKETS)
        hist.observe(seconds)
