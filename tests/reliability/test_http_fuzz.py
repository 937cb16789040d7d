"""Bad input, fuzzed: whatever a client sends the gateway's port, it gets an answer a client can parse, the daemon
logs no traceback and no slot stays busy (issue 17, reliability suite: bad input).

Property-based (hypothesis, derandomized: the same cases every run; a failure prints its reproduction blob) against
one real ``athanor serve`` with the tiny GGUF, over raw sockets, asserting only what is seen from outside: these
tests are also the gate for any server that replaces the ``/v1`` hot path. Each test ends with a normal completion,
answered, and nothing left processing in the gateway or in the runtime. The case count is printed at the end.

Invariants: no 5xx; no traceback in a body or in the daemon's log; every error an OpenAI error object (an
Anthropic one for the gateway's own errors on ``/v1/messages``); malformed JSON -> 400; a body over
``limits.maxRequestBytes`` -> 413; a chunked body is read whole; slow clients do not hold up others; pipelined
requests are answered in order, each correctly.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fixtures.raw_http import Answer, Connection, chunked, request
from fixtures.serving import Gateway
from fixtures.shared_gateway import (
    assert_settled,
    BODY_LIMIT,
    MODEL,
    answer_problem,
    completion,
    error_shape_problem,
    port_of,
    shared_gateway,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALIASES = [f"alias-{i}" for i in range(6)]
POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses", "/v1/embeddings",
               "/v1/rerank", "/v1/messages/count_tokens", "/v1/chat/completions/input_tokens"]
CASES: Counter[str] = Counter()  # fuzz cases run, per test
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    try:
        with shared_gateway(tmp_path_factory.mktemp("http-fuzz"),
                            model_lines=f"  aliases: [{', '.join(ALIASES)}]\n") as gateway:
            yield gateway
    finally:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(CASES.items()))
        say(request, f"http fuzz: {sum(CASES.values())} cases ({counts})")


def say(request: pytest.FixtureRequest, line: str) -> None:
    """A line on the terminal, past pytest's capture (the case count is part of the suite's report)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


@pytest.fixture(scope="module")
def port(gw: Gateway) -> int:
    """The gateway's port (what the fuzzed tests take: a failing case prints its arguments)."""
    return port_of(gw)


@pytest.fixture(autouse=True)
def settled_afterwards(gw: Gateway) -> Iterator[None]:
    """After each test: a normal completion is answered at once, nothing stays in flight in the gateway or
    processing in the runtime, and the daemon logged no traceback."""
    yield
    with Connection(port_of(gw), timeout=30) as conn:
        conn.send(request("POST", "/v1/chat/completions", completion(), {"Connection": "close"}))
        answer = conn.read_answer()
    assert answer.status == 200 and answer.json()["choices"], answer
    assert_settled(gw)


def exchange(port: int, raw: bytes, method: str = "POST") -> Answer:
    """One request on a connection of its own; the answer."""
    with Connection(port, timeout=30) as conn:
        conn.send(raw)
        return conn.read_answer(method)


def framed(path: str, body: bytes, chunk_sizes: list[int] | None, method: str = "POST",
           headers: dict[str, str] | None = None) -> bytes:
    """A request with ``body`` sent with Content-Length, or chunked at ``chunk_sizes`` when given."""
    if chunk_sizes is None:
        return request(method, path, body, headers)
    head = request(method, path, None, {"Content-Type": "application/json", "Transfer-Encoding": "chunked",
                                        **(headers or {})})
    return head + chunked(body, chunk_sizes)


chunk_sizes = st.one_of(st.none(), st.lists(st.integers(1, 64), min_size=1, max_size=6))

# ---------------------------------------------------------------------------------------------- malformed JSON


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return True
    return False


VALID = completion()
MALFORMED_SAMPLES = [
    b"{", b"[", b"}", b"nul", b'{"model": "tiny-gguf",}', b"{'model': 'tiny-gguf'}", b'{"model": tiny-gguf}',
    b'\xef\xbb\xbf{"model": "tiny-gguf"}', b'{"model": "\xff\xfe"}', b'{"model": "tiny-gguf"} trailing',
    b'{"model": "tiny-gguf", "messages": [', b"[" * 100_000, b'{"a":' * 40_000, b"1" * 5_000, b'"\\ud800', b"\x00",
    b'{"model": "tiny-gguf", "messages": [{"role": "user", "content": "\x01\x02"}]}',
]
malformed_bodies = st.one_of(
    st.sampled_from(MALFORMED_SAMPLES).filter(_not_json),
    st.integers(1, len(VALID) - 1).map(lambda n: VALID[:n]),
    st.binary(min_size=1, max_size=300).filter(_not_json),
    st.text(min_size=1, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")).filter(_not_json),
)


@settings(FUZZ, max_examples=250)
@given(path=st.sampled_from(POST_ROUTES), body=malformed_bodies, sizes=chunk_sizes)
def test_malformed_json_is_refused_with_a_400_error_object(port: int, path: str, body: bytes,
                                                          sizes: list[int] | None):
    CASES["malformed json"] += 1
    answer = exchange(port, framed(path, body, sizes))
    assert answer.status == 400, (answer.status, answer.body[:300])
    problem = answer_problem(path, "POST", answer.status, answer.body) or _strict_shape(path, answer.body)
    assert problem is None, problem


def _strict_shape(path: str, body: bytes) -> str | None:
    """The gateway's own error: in Anthropic's shape on the Messages routes, OpenAI's elsewhere."""
    parsed = json.loads(body)
    if path.startswith("/v1/messages") and parsed.get("type") != "error":
        return f"the gateway's own error on {path} is not in Anthropic's shape: {body[:200]!r}"
    return error_shape_problem("/v1" if not path.startswith("/v1/messages") else path, body)

# ---------------------------------------------------------------------------------------------- wrong types


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children,
                                                                                max_size=3)),
    max_leaves=6,
)
USER = [{"role": "user", "content": "hi"}]
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 2},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"model": MODEL, "messages": USER, "max_tokens": 2},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 2},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": USER},
    "/v1/chat/completions/input_tokens": {"model": MODEL, "messages": USER},
}
# The fields each API's bodies carry (a dotted path reaches into the first message or the stream options).
FIELDS: dict[str, list[str]] = {
    "/v1/chat/completions": [
        "model", "messages", "messages.0", "messages.0.role", "messages.0.content", "stream", "max_tokens",
        "max_completion_tokens", "stream_options", "stream_options.include_usage", "temperature", "top_p", "n", "stop",
        "seed", "tools", "tool_choice", "response_format", "logit_bias", "logprobs", "top_logprobs",
        "presence_penalty", "frequency_penalty", "user", "reasoning_effort", "chat_template_kwargs",
        "parallel_tool_calls"],
    "/v1/completions": ["model", "prompt", "stream", "max_tokens", "stream_options", "stream_options.include_usage",
                        "echo", "suffix", "n", "stop", "temperature", "logprobs", "seed"],
    "/v1/messages": ["model", "messages", "messages.0", "messages.0.role", "messages.0.content", "max_tokens",
                     "system", "stream", "stop_sequences", "temperature", "top_k", "tools", "tool_choice", "thinking",
                     "metadata"],
    "/v1/responses": ["model", "input", "instructions", "max_output_tokens", "stream", "reasoning", "tools",
                      "temperature"],
    "/v1/messages/count_tokens": ["model", "messages", "messages.0.content", "system", "tools"],
    "/v1/chat/completions/input_tokens": ["model", "messages", "messages.0.role", "tools"],
}


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each dotted path set to its value; deeper paths first, so a whole field set later wins."""
    body = json.loads(json.dumps(base))
    for path in sorted(values, key=lambda p: -p.count(".")):
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = values[path]
        elif isinstance(node, dict):
            node[last] = values[path]
    return body


@st.composite
def mistyped(draw: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(sorted(BASES)))
    fields = draw(st.lists(st.sampled_from(FIELDS[path]), min_size=1, max_size=3, unique=True))
    return path, with_values(BASES[path], {field: draw(json_values) for field in fields})


@settings(FUZZ, max_examples=300)
@given(case=mistyped(), stream=st.sampled_from([None, True, False]))
def test_wrongly_typed_fields_never_give_a_server_error(port: int, case: tuple[str, dict[str, Any]],
                                                       stream: bool | None):
    path, body = case
    if stream is not None and "stream" not in body:
        body["stream"] = stream
    CASES["wrong types"] += 1
    answer = exchange(port, request("POST", path, json.dumps(body).encode()))
    problem = answer_problem(path, "POST", answer.status, answer.body)
    assert problem is None, f"{path} {json.dumps(body)[:400]}: {problem}"
    if answer.status == 200 and "text/event-stream" in (answer.header("content-type") or ""):
        for event in sse_data(answer.body):
            if isinstance(event, dict) and "error" in event:
                assert not _is_server_error(event), f"{path} {json.dumps(body)[:400]}: stream ended with {event}"


def sse_data(body: bytes) -> list[Any]:
    """The JSON of each ``data:`` line of an event stream ([DONE] left out)."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def _is_server_error(event: dict[str, Any]) -> bool:
    error = event["error"]
    return isinstance(error, dict) and (error.get("code") == 500 or error.get("type") in ("server_error", "api_error"))

# ---------------------------------------------------------------------------------------------- huge bodies


@settings(FUZZ, max_examples=24)
@given(path=st.sampled_from(POST_ROUTES), extra=st.integers(1, BODY_LIMIT),
       sizes=st.one_of(st.none(), st.lists(st.integers(1024, 128 * 1024), min_size=1, max_size=4)))
def test_a_body_over_the_limit_is_refused_with_413(port: int, path: str, extra: int, sizes: list[int] | None):
    CASES["huge bodies"] += 1
    prefix = b'{"model": "tiny-gguf", "messages": [{"role": "user", "content": "'
    suffix = b'"}]}'
    body = prefix + b"x" * (BODY_LIMIT + extra - len(prefix) - len(suffix)) + suffix
    with Connection(port, timeout=30) as conn:
        conn.send_until_answered(framed(path, body, sizes))
        answer = conn.read_answer()
    assert answer.status == 413, (answer.status, answer.body[:300])
    assert _strict_shape(path, answer.body) is None, answer.body

# ---------------------------------------------------------------------------------------------- chunked bodies


def _answered_as(answer: Answer, alias: str, stream: bool) -> None:
    """A completion answered in full, naming the model as the client did."""
    assert answer.status == 200, (answer.status, answer.body[:300])
    if stream:
        events = sse_data(answer.body)
        assert answer.body.rstrip().endswith(b"data: [DONE]"), answer.body[-300:]
        assert events and all(e.get("model") == alias for e in events if "choices" in e), answer.body[:600]
    else:
        assert answer.json()["model"] == alias, answer.body[:300]


@settings(FUZZ, max_examples=40)
@given(alias=st.sampled_from(ALIASES), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8),
       stream=st.booleans(), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_a_chunked_body_is_read_whole(port: int, alias: str, sizes: list[int], stream: bool, path: str):
    CASES["chunked bodies"] += 1
    body = dict(BASES[path], model=alias, stream=stream)
    answer = exchange(port, framed(path, json.dumps(body).encode(), sizes))
    _answered_as(answer, alias, stream)

# ---------------------------------------------------------------------------------------------- routes, methods

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
SEGMENTS = ["v1", "athanor", "models", "chat", "completions", "messages", "embeddings", "status", "events", "health",
            "metrics", "alias-1", "nope", "%ff", "%2e%2e", "..", ".", "%00", "%2F", "a" * 300, "~", "x.json", ""]


@settings(FUZZ, max_examples=200)
@given(method=st.one_of(st.sampled_from(METHODS), st.from_regex(r"[A-Z]{1,12}", fullmatch=True)),
       segments=st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5),
       query=st.sampled_from(["", "?x=1", "?lines=abc", "?since=zz", "?x=%zz", "?" + "q" * 500]),
       body=st.one_of(st.none(), st.just(b"{}"), st.just(VALID)))
def test_unknown_routes_and_methods_get_error_objects(port: int, method: str, segments: list[str], query: str,
                                                      body: bytes | None):
    CASES["routes and methods"] += 1
    path = "/" + "/".join(segments) + query
    answer = exchange(port, request(method, path, body, {"Connection": "close"}), method)
    problem = answer_problem(path, method, answer.status, answer.body)
    assert problem is None, f"{method} {path}: {problem}"

# ---------------------------------------------------------------------------------------------- slow clients


@settings(FUZZ, max_examples=12)
@given(slow=st.lists(st.tuples(st.sampled_from(ALIASES), st.booleans()), min_size=1, max_size=6),
       piece=st.integers(1, 3), stalled=st.integers(0, 16), every=st.integers(1, 8))
def test_slow_clients_do_not_hold_up_others(port: int, slow: list[tuple[str, bool]], piece: int, stalled: int,
                                            every: int):
    """Slowloris: requests dribbled ``piece`` bytes at a time over several connections, and connections left with
    half a request line, while another client's requests are answered between the pieces; then each slow request
    is answered as if it had come at once."""
    CASES["slow clients"] += 1
    raws = [request("POST", "/v1/chat/completions", json.dumps(dict(BASES["/v1/chat/completions"], model=alias,
                                                                     stream=stream)).encode())
            for alias, stream in slow]
    halves = [Connection(port) for _ in range(stalled)]
    slows = [Connection(port) for _ in raws]
    try:
        for conn in halves:
            conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        with Connection(port) as other:
            for step, at in enumerate(range(0, max(map(len, raws)), piece)):
                for conn, raw in zip(slows, raws, strict=True):
                    if at < len(raw):
                        conn.send(raw[at:at + piece])
                if step % every == 0:
                    other.send(request("POST", "/v1/chat/completions", completion()) if step % 2 else
                               request("GET", "/v1/models"))
                    answer = other.read_answer()
                    assert answer.status == 200, (answer.status, answer.body[:300])
        for conn, (alias, stream) in zip(slows, slow, strict=True):
            _answered_as(conn.read_answer(), alias, stream)
    finally:
        for conn in halves + slows:
            conn.close()

# ---------------------------------------------------------------------------------------------- pipelining


def _pipelined_kinds() -> st.SearchStrategy[tuple[bytes, Callable[[Answer], None]]]:
    def chat(alias: str, stream: bool, sizes: list[int] | None) -> tuple[bytes, Callable[[Answer], None]]:
        body = json.dumps(dict(BASES["/v1/chat/completions"], model=alias, stream=stream)).encode()
        return framed("/v1/chat/completions", body, sizes), lambda a: _answered_as(a, alias, stream)

    def text(alias: str) -> tuple[bytes, Callable[[Answer], None]]:
        body = json.dumps(dict(BASES["/v1/completions"], model=alias)).encode()

        def check(a: Answer) -> None:
            assert a.status == 200 and a.json()["object"] == "text_completion" and a.json()["model"] == alias, a
        return request("POST", "/v1/completions", body), check

    def missing(n: int) -> tuple[bytes, Callable[[Answer], None]]:
        def check(a: Answer) -> None:
            assert a.status == 404 and f"missing-{n}" in a.json()["error"]["message"], a
        return request("POST", "/v1/chat/completions", json.dumps(dict(BASES["/v1/chat/completions"],
                                                                       model=f"missing-{n}")).encode()), check

    def bad_json(n: int) -> tuple[bytes, Callable[[Answer], None]]:
        def check(a: Answer) -> None:
            assert a.status == 400 and error_shape_problem("/v1", a.body) is None, a
        return request("POST", "/v1/chat/completions", b'{"model": "x' + b"y" * n), check

    def model(alias: str) -> tuple[bytes, Callable[[Answer], None]]:
        def check(a: Answer) -> None:
            assert a.status == 200 and a.json()["id"] == MODEL, a
        return request("GET", f"/v1/models/{alias}"), check

    def health() -> tuple[bytes, Callable[[Answer], None]]:
        def check(a: Answer) -> None:
            assert a.status == 200 and a.json() == {"status": "ok"}, a
        return request("GET", "/health"), check

    aliases = st.sampled_from(ALIASES)
    return st.one_of(st.builds(chat, aliases, st.booleans(), chunk_sizes), st.builds(text, aliases),
                     st.builds(missing, st.integers(0, 99)), st.builds(bad_json, st.integers(0, 20)),
                     st.builds(model, aliases), st.builds(health))


@settings(FUZZ, max_examples=50)
@given(kinds=st.lists(_pipelined_kinds(), min_size=2, max_size=8), cuts=st.lists(st.integers(0, 4000), max_size=3))
def test_pipelined_requests_are_answered_in_order(port: int, kinds: list[tuple[bytes, Callable[[Answer], None]]],
                                                  cuts: list[int]):
    """Several requests in one write (or cut across a few writes anywhere, mid-request too) on one kept-alive
    connection: one answer each, in order, each the right one."""
    CASES["pipelines"] += 1
    data = b"".join(raw for raw, _ in kinds)
    bounds = sorted({0, len(data), *(c % len(data) for c in cuts)})
    with Connection(port) as conn:
        for start, end in zip(bounds, bounds[1:]):
            conn.send(data[start:end])
        for n, (_, check) in enumerate(kinds):
            answer = conn.read_answer()
            try:
                check(answer)
            except AssertionError as exc:
                raise AssertionError(f"answer {n} of {len(kinds)}: {exc}") from None
