"""Swap soak: a real ``athanor serve`` under ``single`` residency with a tiny GGUF (llama-server) and a tiny MLX
model (mlx_lm.server), 32 concurrent clients and 2,012 requests in a seeded random order: 1,476 streamed (729 read
by ``openai.OpenAI``, which hangs up as soon as it has read ``[DONE]``, 279 by ``openai.AsyncOpenAI``, which reads
the body to its end, 468 by aiohttp with every SSE line checked) and 536 not, over chat and completions, by model
name and by alias.

What it holds the gateway to:
- every request is answered correctly (a 200 with a well-formed completion in the requested model's name; a
  stream whose chunks are well formed, end with a finish_reason and then ``data: [DONE]``) or with a documented
  refusal, 429 ``queue_full`` or 503 ``model_unavailable`` (README, "Errors"), or for a stream that waited for
  its model, the error event ``model_unavailable`` that ends it. The queue limit keeps its default (64, more than
  the 32 clients), and a refusal to start happens here only when something else (another gateway on a shared
  machine) holds a model's port;
- there are never two instances of one model: the daemon's process tree is sampled with psutil every 50 ms, and
  the runtimes of each model are counted by session (each runtime runs in a session of its own);
- nothing that carries the gateway's ATHANOR_HOME is left running after ``athanor down``;
- ``/metrics`` counts every request exactly once, by model, route and status, the streamed ones included, the way
  the clients saw them.

The order: an MLX load takes one to two seconds here and mlx_lm.server answers one request at a time, so an order
that draws the model afresh for every request would swap on nearly every request and never end in the budget.
Requests come in bursts instead, in random order within each (kind of client, route, streamed or not, model name
or alias): bursts for one model alternate, the GGUF's long (110-170 requests) and the MLX model's short (25-45),
and every third burst (40-70 requests) mixes both models 70/30 in random order, where the gate (loaded model first,
at most 16 in a row) swaps back and forth under a full queue. The 32 clients take the requests in that order, so
each boundary meets the previous burst's last requests still running. With this seed that is 26 bursts and 29
swaps (15 loads of each model) in 50-85 s on this 2-core machine; the test requires at least ``MIN_SWAPS``.
The figures of each run are printed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import random
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import psutil
from fixtures.serving import Gateway, apply_gateway, wait_until
from prometheus_client.parser import text_string_to_metric_families

SEED = 1717
CLIENTS = 32
GGUF, MLX, ALIAS = "tiny-gguf", "tiny-mlx", "tiny-alias"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# Request kinds and their weights: (client, route, streamed). "sdk" is openai.OpenAI (run on a thread: its stream
# closes the connection as soon as it has read [DONE]), "async-sdk" openai.AsyncOpenAI (which reads the body to its
# end after [DONE], to keep the connection), "raw" aiohttp with every SSE line checked.
KINDS = {
    ("sdk", CHAT, True): 4,
    ("sdk", COMPLETIONS, True): 1,
    ("sdk", CHAT, False): 1,
    ("async-sdk", CHAT, True): 2,
    ("async-sdk", CHAT, False): 1,
    ("raw", CHAT, True): 2,
    ("raw", CHAT, False): 1,
    ("raw", COMPLETIONS, True): 1,
    ("raw", COMPLETIONS, False): 1,
}
DOCUMENTED = {429: "queue_full", 503: "model_unavailable"}
REQUESTS = 2000
MIXED = "mixed"
BURST = {GGUF: (110, 170), MLX: (25, 45), MIXED: (40, 70)}  # requests per burst, (fewest, most)
MIN_SWAPS = 20  # the plan below makes 26 bursts, and at least one swap at every boundary but a few


@dataclass(frozen=True)
class Planned:
    """One request of the plan: who sends it, where, and for which name."""

    index: int
    requested: str  # what the client names: a model or an alias
    client: str
    route: str
    stream: bool

    @property
    def model(self) -> str:
        """The model athanor counts it against."""
        return GGUF if self.requested in (GGUF, ALIAS) else MLX


def plan(rng: random.Random) -> tuple[list[Planned], int]:
    """The requests in the order clients take them, and the number of bursts. Bursts for one model alternate, the
    GGUF's long (llama-server answers fast) and the MLX model's short (mlx_lm.server answers one at a time); every
    third burst mixes both models in random order."""
    kinds, weights = list(KINDS), list(KINDS.values())
    planned: list[Planned] = []
    bursts = 0
    while len(planned) < REQUESTS:
        mixed = bursts % 3 == 2
        model = (GGUF, MLX)[bursts % 2]
        for _ in range(rng.randint(*BURST[MIXED if mixed else model])):
            target = (GGUF if rng.random() < 0.7 else MLX) if mixed else model
            requested = ALIAS if target == GGUF and rng.random() < 0.2 else target
            client, route, stream = rng.choices(kinds, weights)[0]
            planned.append(Planned(len(planned), requested, client, route, stream))
        bursts += 1
    return planned, bursts


@dataclass
class Outcome:
    """What one client saw: the status athanor should count it with, and how it was answered."""

    status: int
    kind: str  # "ok", a documented refusal's code, "undocumented", "stream error" (an error event) or "broken"
    problem: str | None = None  # set when the answer was neither correct nor a documented error
    when: tuple[float, float] = (0.0, 0.0)  # wall-clock start and end, to find it in the gateway's logs


def _body(p: Planned) -> dict:
    body: dict = {"model": p.requested, "max_tokens": 4, "stream": p.stream}
    if p.route == CHAT:
        body["messages"] = [{"role": "user", "content": f"hello {p.index}"}]
    else:
        body["prompt"] = f"hello {p.index}"
    return body


def _check_chunk(p: Planned, chunk: dict) -> str | None:
    want = "chat.completion.chunk" if p.route == CHAT else "text_completion"
    if chunk.get("object") != want or chunk.get("model") != p.requested or not chunk.get("choices"):
        return f"malformed chunk {chunk!r}"
    return None


def _check_answer(p: Planned, answer: dict) -> str | None:
    want = "chat.completion" if p.route == CHAT else "text_completion"
    choices = answer.get("choices") or [{}]
    text = choices[0].get("message", {}).get("content") if p.route == CHAT else choices[0].get("text")
    if answer.get("object") != want or answer.get("model") != p.requested or not isinstance(text, str):
        return f"malformed answer {answer!r}"
    if not answer.get("usage", {}).get("completion_tokens"):
        return f"no usage in {answer!r}"
    return None


def _stream_refusal(error: object) -> Outcome:
    """An error event that ends a stream whose headers (200) went out while it waited for its model: documented
    when the model could not start (README: "a failed load ... ends the stream with an error event")."""
    code = error.get("code") if isinstance(error, dict) else None
    if code == DOCUMENTED[503]:
        return Outcome(200, f"{code} (event)")
    return Outcome(200, "stream error", f"error event in the stream: {error!r}")


def _refusal(status: int, error: object) -> Outcome:
    code = error.get("code") if isinstance(error, dict) else None
    if DOCUMENTED.get(status) == code:
        return Outcome(status, code)
    return Outcome(status, "undocumented", f"status {status}: {error!r}")


async def raw_request(session: aiohttp.ClientSession, url: str, p: Planned) -> Outcome:
    async with session.post(url + p.route, json=_body(p)) as resp:
        if resp.status != 200:
            return _refusal(resp.status, (await resp.json(content_type=None)).get("error"))
        if not p.stream:
            return Outcome(200, "ok", _check_answer(p, await resp.json()))
        text = (await resp.read()).decode()
    data = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    if any(line and not line.startswith(("data: ", ": ")) for line in text.split("\n")):
        return Outcome(200, "ok", f"a line that is neither data nor a comment in {text!r}")
    if data and data[-1].startswith('{"error"'):
        return _stream_refusal(json.loads(data[-1])["error"])
    if not data or data[-1] != "[DONE]":
        return Outcome(200, "ok", f"stream without its [DONE]: {text!r}")
    chunks = [json.loads(d) for d in data[:-1]]
    if not chunks or not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks):
        return Outcome(200, "ok", f"stream without a finish_reason: {text!r}")
    return Outcome(200, "ok", next(filter(None, (_check_chunk(p, c) for c in chunks)), None))


def _sdk_outcome(p: Planned, answer: object) -> Outcome:
    """A non-streamed answer, or every chunk of a stream (the SDK ends its iteration at [DONE], and raises on an
    error event or a cut body): a complete stream ends with a finish_reason."""
    if not p.stream:
        return Outcome(200, "ok", _check_answer(p, answer.model_dump()))
    chunks = [chunk.model_dump() for chunk in answer]  # type: ignore[attr-defined]
    if not chunks or not any(c.get("choices") and c["choices"][0].get("finish_reason") for c in chunks):
        return Outcome(200, "ok", f"stream without a finish_reason: {chunks!r}")
    return Outcome(200, "ok", next(filter(None, (_check_chunk(p, c) for c in chunks)), None))


def _sdk_error(exc: openai.APIError) -> Outcome:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        return _refusal(exc.status_code, body.get("error", body))
    if isinstance(exc.body, dict):  # an error event in a stream
        return _stream_refusal(exc.body)
    return Outcome(0, "broken", f"{type(exc).__name__}: {exc}")  # no answer at all (a connection error)


def sdk_request(client: openai.OpenAI, p: Planned) -> Outcome:
    """The synchronous SDK, as most scripts use it (on a worker thread here)."""
    create = client.chat.completions.create if p.route == CHAT else client.completions.create
    try:
        answer = create(**_body(p))
        return _sdk_outcome(p, answer if not p.stream else list(answer))
    except openai.APIError as exc:
        return _sdk_error(exc)


async def async_sdk_request(client: openai.AsyncOpenAI, p: Planned) -> Outcome:
    create = client.chat.completions.create if p.route == CHAT else client.completions.create
    try:
        answer = await create(**_body(p))
        return _sdk_outcome(p, answer if not p.stream else [chunk async for chunk in answer])
    except openai.APIError as exc:
        return _sdk_error(exc)


async def run_clients(url: str, planned: list[Planned]) -> dict[int, Outcome]:
    """CLIENTS clients, each with its own keep-alive connections, taking the next planned request in order."""
    queue: asyncio.Queue[Planned] = asyncio.Queue()
    for p in planned:
        queue.put_nowait(p)
    outcomes: dict[int, Outcome] = {}

    loop = asyncio.get_running_loop()
    threads = concurrent.futures.ThreadPoolExecutor(CLIENTS, thread_name_prefix="soak-sdk")

    async def client() -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        options = {"base_url": url + "/v1", "api_key": "not-needed", "max_retries": 0, "timeout": 120}
        async with aiohttp.ClientSession(timeout=timeout) as session, openai.AsyncOpenAI(**options) as async_sdk:
            sdk = openai.OpenAI(**options)
            try:
                while not queue.empty():
                    p = queue.get_nowait()
                    began = time.time()
                    try:
                        if p.client == "sdk":
                            outcome = await loop.run_in_executor(threads, sdk_request, sdk, p)
                        elif p.client == "async-sdk":
                            outcome = await async_sdk_request(async_sdk, p)
                        else:
                            outcome = await raw_request(session, url, p)
                    except Exception as exc:  # noqa: BLE001 - a broken answer is a finding, kept with its request
                        outcome = Outcome(0, "broken", f"{type(exc).__name__}: {exc}")
                    outcome.when = (began, time.time())
                    outcomes[p.index] = outcome
            finally:
                sdk.close()

    try:
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    finally:
        threads.shutdown()
    return outcomes


class InstanceSampler(threading.Thread):
    """Samples the daemon's process tree until stopped: the most runtimes of one model seen at once, counted as
    distinct sessions (a runtime is started in a session of its own) among live processes that name the model's
    weights."""

    def __init__(self, daemon_pid: int, weights: dict[str, str]):
        super().__init__(daemon=True)
        self.daemon_pid, self.weights = daemon_pid, weights
        self.stop = threading.Event()
        self.samples = 0
        self.most: dict[str, int] = collections.Counter()
        self.worst: dict[str, list[str]] = {}

    def run(self) -> None:
        daemon = psutil.Process(self.daemon_pid)
        while not self.stop.is_set():
            self.sample(daemon)
            self.stop.wait(0.05)  # the sampling period, not a synchronisation

    def sample(self, daemon: psutil.Process) -> None:
        sessions: dict[str, set[int]] = collections.defaultdict(set)
        seen: dict[str, list[str]] = collections.defaultdict(list)
        try:
            children = daemon.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in children:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(proc.cmdline())
                sid = os.getsid(proc.pid)
            except (psutil.Error, ProcessLookupError):
                continue
            for model, path in self.weights.items():
                if path in cmdline:
                    sessions[model].add(sid)
                    seen[model].append(f"{proc.pid} (session {sid}): {cmdline[:160]}")
        self.samples += 1
        for model, found in sessions.items():
            if len(found) > self.most[model]:
                self.most[model] = len(found)
                self.worst[model] = seen[model]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def counted(samples: dict[tuple[str, tuple], float]) -> collections.Counter:
    """(model, route, status) -> requests, as athanor counted them."""
    out: collections.Counter = collections.Counter()
    for (name, labels), value in samples.items():
        if name == "athanor_requests_total":
            label = dict(labels)
            out[(label["model"], label["route"], int(label["status"]))] = int(value)
    return out


def left_running(home: Path) -> list[str]:
    """Live processes (zombies are not) that carry this home: anything `athanor down` should have stopped."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        try:
            if (proc.info["environ"] or {}).get("ATHANOR_HOME") == str(home) and \
                    proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])[:160]}")
        except (psutil.Error, KeyError):
            continue
    return found


def test_swap_soak_answers_everything_and_counts_it_once(gateway: Gateway, tmp_path: Path):
    apply_gateway(gateway, tmp_path, "  residency: {policy: single}\n")
    planned, bursts = plan(random.Random(SEED))
    weights = {GGUF: str(tmp_path / "weights" / "tiny.gguf"), MLX: str(tmp_path / "weights" / "tiny-mlx")}
    sampler = InstanceSampler(gateway.proc.pid, weights)  # the paths the models fixture serves
    sampler.start()
    started = time.monotonic()
    try:
        outcomes = asyncio.run(run_clients(gateway.url, planned))
    finally:
        sampler.stop.set()
        sampler.join(10)
    elapsed = time.monotonic() - started
    seen = collections.Counter((p.model, p.route, outcomes[p.index].status) for p in planned)

    # Every answer is over on the clients' side; a count may follow a moment later (a handler ends after its
    # client had the last byte), so the counts are awaited, with a deadline.
    scraped: list[collections.Counter] = []

    def all_counted() -> bool:
        scraped.append(counted(scrape(gateway.url)))
        return sum(scraped[-1].values()) >= len(planned)

    with contextlib.suppress(AssertionError):  # the comparison below says what is missing
        wait_until(all_counted, 10, "every request to be counted")
    samples = scrape(gateway.url)
    athanor_counted = counted(samples)
    missing, extra = seen - athanor_counted, athanor_counted - seen
    swaps = int(samples.get(("athanor_swaps_total", ()), 0))
    loads = {m: int(samples.get(("athanor_load_seconds_count", (("model", m),)), 0)) for m in (GGUF, MLX)}
    down = gateway.athanor("down")
    leftovers = left_running(gateway.home)

    problems = [(p, outcomes[p.index]) for p in planned if outcomes[p.index].problem]
    streamed = collections.Counter(p.client for p in planned if p.stream)
    print(f"\nswap soak (seed {SEED}): {len(planned)} requests from {CLIENTS} clients in {elapsed:.1f} s, "
          f"{sum(streamed.values())} streamed ({streamed['sdk']} by openai.OpenAI, {streamed['async-sdk']} by "
          f"openai.AsyncOpenAI, {streamed['raw']} raw); {bursts} bursts, {swaps} swaps, loads {loads}; answers by "
          f"kind {dict(collections.Counter(o.kind for o in outcomes.values()))}, by status "
          f"{dict(collections.Counter(o.status for o in outcomes.values()))}; most instances of one model at once "
          f"{dict(sampler.most)} over {sampler.samples} samples; not yet counted at the first scrape after the "
          f"last answer: {sum((seen - scraped[0]).values())}")
    for p, outcome in problems[:20]:
        began, ended = outcome.when
        print(f"  bad answer {p} at {time.strftime('%H:%M:%S', time.gmtime(began))}.{int(began % 1 * 1000):03d} "
              f"+{ended - began:.3f} s: {outcome.problem:.300}")

    failures = []
    if problems:
        failures.append(f"{len(problems)} requests answered neither correctly nor with a documented error, "
                        f"the first: {problems[0][0]}: {problems[0][1].problem:.500}")
    if sampler.samples < 100 or set(sampler.most) != {GGUF, MLX}:
        failures.append(f"the sampler did not see both runtimes: {sampler.samples} samples, {dict(sampler.most)}")
    if any(n > 1 for n in sampler.most.values()):
        failures.append(f"two instances of one model at once: {sampler.worst}")
    if swaps < MIN_SWAPS:
        failures.append(f"only {swaps} swaps (at least {MIN_SWAPS} expected from {bursts} bursts)")
    if down.returncode != 0:
        failures.append(f"athanor down failed: {down.stderr}")
    if leftovers:
        failures.append(f"left running after athanor down: {leftovers}")
    if missing or extra:
        failures.append(f"/metrics does not count every request once: seen by clients but not counted "
                        f"{dict(missing)}, counted but not seen {dict(extra)}")
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures)
