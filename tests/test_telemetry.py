"""Request telemetry that outlives the daemon (issue 15, Deliver 1): records written by a real gateway in front of
real llama-server and mlx_lm.server, read back through the admin API and ``athanor telemetry`` with the gateway up,
down, restarted, and killed with SIGKILL; retention; the request path's share (one append)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import sqlite3
import stat
import urllib.request
from pathlib import Path

from fixtures.llama_direct import LlamaServer
from hypothesis import given, settings
from hypothesis import strategies as st
from fixtures.serving import Gateway, apply_gateway, long_gguf, start_daemon, wait_until
from fixtures.tiny_models import write_tiny_llama_gguf

from athanor import catalog
from athanor.ingress import tap as tap_module
from athanor.ingress.tap import Tap
from athanor.metrics import Metrics
from athanor.telemetry import db
from athanor.telemetry import recorder as recorder_module
from athanor.telemetry.recorder import Recorder, retention_of, timings_of

# A whole answer as llama-server gives it (captured from the one setup.sh builds): usage, then its own timings
LLAMA_ANSWER = (b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","content":"hi"}}],'
                b'"model":"tiny.gguf","object":"chat.completion","usage":{"completion_tokens":4,"prompt_tokens":20,'
                b'"total_tokens":24,"prompt_tokens_details":{"cached_tokens":19}},"timings":{"cache_n":19,'
                b'"prompt_n":1,"prompt_ms":0.158,"prompt_per_second":6329.1,"predicted_n":4,"predicted_ms":0.278,'
                b'"predicted_per_second":10791.4}}')


def _rows(path: Path) -> list[tuple]:
    """What another process sees in the file now (a reader of its own, as the CLI is)."""
    conn = db.connect(path, create=False)
    if conn is None:
        return []
    try:
        return conn.execute(f"SELECT {', '.join(db.COLUMNS)} FROM requests ORDER BY id").fetchall()
    finally:
        conn.close()


def _admin(gateway: Gateway, path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(gateway.url + "/athanor/v1" + path, method=method)
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _send(gateway: Gateway, model: str, stream: bool) -> dict:
    """One chat request through the openai SDK; the usage the SDK saw, and the model asked."""
    messages = [{"role": "user", "content": f"hello from a {'streamed' if stream else 'whole'} request"}]
    if not stream:
        usage = gateway.client.chat.completions.create(model=model, messages=messages, max_tokens=6).usage
    else:
        usage = None
        for chunk in gateway.client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                                            stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
    assert usage is not None
    return {"model": model, "stream": stream, "prompt": usage.prompt_tokens, "completion": usage.completion_tokens}


def _restart(gateway: Gateway, sig: signal.Signals = signal.SIGTERM) -> None:
    gateway.proc.send_signal(sig)
    gateway.proc.wait(60)


def _start(gateway: Gateway) -> None:
    gateway.proc = start_daemon(gateway.home, int(gateway.url.rsplit(":", 1)[1]))


# ---------------------------------------------------------------------------------------------- through a daemon


def test_records_match_what_the_client_saw_and_compare_survives_a_restart(gateway):
    sent = [_send(gateway, model, stream) for model in ("tiny-gguf", "tiny-mlx") for stream in (True, False, True)]
    items = _admin(gateway, "/telemetry")["items"]  # the read flushes first: every request is there already
    assert len(items) == len(sent)
    for seen, record in zip(sent, reversed(items), strict=True):  # newest first
        assert (record["model"], record["status"], record["route"]) == (seen["model"], 200, "/v1/chat/completions")
        assert record["runtime"] == ("llama-server" if seen["model"] == "tiny-gguf" else "mlx-lm")
        assert (record["promptTokens"], record["completionTokens"]) == (seen["prompt"], seen["completion"])
        assert record["clientGone"] is False and record["totalSeconds"] > 0
        assert (record["ttftSeconds"] is not None) == seen["stream"], "only a stream has a first token to time"
        if seen["stream"]:
            assert 0 < record["ttftSeconds"] <= record["totalSeconds"]
        # A rate is positive or absent, never 0: llama-server says 0 when its timer read 0 ms (measured nothing)
        assert all(record[k] is None or record[k] > 0 for k in ("decodeTokensPerSecond", "prefillTokensPerSecond"))
        if record["runtime"] == "llama-server":  # llama-server's own timings, streamed or not
            assert record["cachedTokens"] is not None
    only_mlx = _admin(gateway, "/telemetry?model=tiny-mlx&limit=2")["items"]
    assert [r["model"] for r in only_mlx] == ["tiny-mlx", "tiny-mlx"] and only_mlx == items[:2]
    by_alias = _admin(gateway, "/telemetry?model=tiny-alias")["items"]
    assert {r["model"] for r in by_alias} == {"tiny-gguf"} and len(by_alias) == 3

    def expected(model: str) -> dict:
        mine = [s for s in sent if s["model"] == model]
        ttfts = sorted(r["ttftSeconds"] for r in items if r["model"] == model and r["ttftSeconds"] is not None)
        return {"model": model, "requests": len(mine), "errors": 0, "clientGone": 0,
                "promptTokens": sum(s["prompt"] for s in mine), "completionTokens": sum(s["completion"] for s in mine),
                "ttftP50": ttfts[math.ceil(0.5 * len(ttfts)) - 1], "ttftP95": ttfts[math.ceil(0.95 * len(ttfts)) - 1]}

    def figures(result) -> list[dict]:
        assert result.returncode == 0, result.stderr
        models = json.loads(result.stdout)["models"]
        return [{k: m[k] for k in expected("tiny-gguf")} for m in models]

    want = [expected("tiny-gguf"), expected("tiny-mlx")]
    assert figures(gateway.athanor("telemetry", "compare", "tiny-gguf", "tiny-mlx", "-o", "json")) == want
    _restart(gateway)
    # The gateway is down: the CLI reads the file itself.
    assert figures(gateway.athanor("telemetry", "compare", "tiny-gguf", "tiny-mlx", "-o", "json")) == want
    _start(gateway)
    assert figures(gateway.athanor("telemetry", "compare", "tiny-gguf", "tiny-mlx", "-o", "json")) == want
    table = gateway.athanor("telemetry", "compare", "tiny-gguf", "tiny-mlx")
    assert table.returncode == 0 and "TTFT P95" in table.stdout and "tiny-mlx" in table.stdout, table.stderr
    last_two = json.loads(gateway.athanor("telemetry", "compare", "tiny-gguf", "--last", "2", "-o", "json").stdout)
    assert last_two["models"][0]["requests"] == 2

    after = _send(gateway, "tiny-gguf", True)  # the restarted daemon appends to the same file
    listed = json.loads(gateway.athanor("telemetry", "ls", "tiny-gguf", "-o", "json").stdout)["items"]
    assert len(listed) == 4 and listed[0]["completionTokens"] == after["completion"]
    assert stat.S_IMODE(os.stat(gateway.home / db.FILENAME).st_mode) == 0o600
    cleared = gateway.athanor("telemetry", "clear")
    assert cleared.returncode == 0 and "deleted 7 records" in cleared.stdout, cleared.stderr
    assert _admin(gateway, "/telemetry")["items"] == []


def test_a_daemon_killed_with_sigkill_leaves_a_readable_file_with_every_flushed_record(gateway):
    path = gateway.home / db.FILENAME
    sent = [_send(gateway, "tiny-gguf", stream) for stream in (True, False, True, False)]
    wait_until(lambda: len(_rows(path)) == len(sent), 30, "the recorder to write its batch")
    _restart(gateway, signal.SIGKILL)  # no shutdown: no last flush, no checkpoint of the WAL

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    rows = _rows(path)
    assert [(r[5], r[6]) for r in rows] == [(s["prompt"], s["completion"]) for s in sent]
    listed = gateway.athanor("telemetry", "ls", "-o", "json")  # no daemon: straight from the file
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["items"]) == len(sent)

    _start(gateway)  # reopens the file (and re-attaches the runtime, which the fixture's down then stops)
    _send(gateway, "tiny-gguf", False)
    assert len(_admin(gateway, "/telemetry")["items"]) == len(sent) + 1


def test_retention_follows_the_gateway_spec(gateway, tmp_path):
    apply_gateway(gateway, tmp_path, "  telemetry: {retention: {maxRecords: 2, maxAge: 720h}}\n")
    sent = [_send(gateway, "tiny-gguf", False) for _ in range(3)]
    items = _admin(gateway, "/telemetry")["items"]
    assert [r["completionTokens"] for r in items] == [s["completion"] for s in sent][::-1][:2]


def test_a_client_that_hangs_up_mid_stream_is_recorded_as_gone(gateway, tmp_path):
    model = long_gguf(tmp_path)
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": model, "stream": True, "max_tokens": 100000, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + gateway.url[7:].encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        received = b""
        while b"data:" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended early"
            received += chunk
    wait_until(lambda: _admin(gateway, f"/telemetry?model={model}")["items"], 30, "the request to be over")
    (record,) = _admin(gateway, f"/telemetry?model={model}")["items"]
    assert (record["status"], record["clientGone"], record["runtime"]) == (499, True, "llama-server")
    assert 0 < record["ttftSeconds"] <= record["totalSeconds"]
    figures = _admin(gateway, f"/telemetry/compare?model={model}")["models"][0]
    assert (figures["requests"], figures["errors"], figures["clientGone"]) == (1, 0, 1)


# ---------------------------------------------------------------------------------------------- without a daemon


def test_the_request_path_only_appends_and_a_flush_writes_the_batch(tmp_path):
    """Tap.finish puts one tuple in the recorder's buffer and touches no file; the flush writes it, with
    llama-server's own timings preferred over the figures the gateway could work out."""
    path = tmp_path / db.FILENAME

    async def scenario() -> None:
        recorder = Recorder(path, lambda: db.Retention(None, None))
        await recorder.open()
        tap = Tap(Metrics(), "tiny-gguf", "/v1/chat/completions", arrived=0.0, telemetry=recorder)
        tap.runtime = "llama-server"
        tap.read_usage(LLAMA_ANSWER)
        tap.finish(200)
        assert len(recorder.pending) == 1 and _rows(path) == []
        assert await recorder.flush() == 1 and not recorder.pending
        (row,) = _rows(path)
        assert row[1:8] == ("tiny-gguf", "llama-server", "/v1/chat/completions", 200, 20, 4, 19)
        assert (row[8], row[10], row[11]) == (None, 10791.4, 6329.1)  # no stream: no TTFT; the runtime's rates
        streamed = Tap(Metrics(), "tiny-mlx", "/v1/chat/completions", arrived=0.0, telemetry=recorder)
        streamed.ttft = 0.5
        streamed.read_usage(b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":9}}')
        streamed.finish(200, client_gone=True)
        await recorder.close()
        last = _rows(path)[-1]
        total = last[9]
        assert last[4] == 499 and last[12] == 1
        assert last[10] == 9 / (total - 0.5) and last[11] == 10 / 0.5  # computed: no timings from this runtime

    asyncio.run(scenario())


def test_usage_and_timings_read_from_the_real_runtimes_answers_as_they_are(llama_server: LlamaServer,
                                                                             tmp_path: Path):
    """Whole and streamed answers of the real llama-server: the counts and timings the tap reads are the ones the
    answer says (a JSON parse of it), and they come through the pattern for llama-server's own layout, so a build
    that changes that layout is noticed here rather than quietly taking the slower general patterns."""
    _, url, _ = llama_server(write_tiny_llama_gguf(tmp_path / "tiny.gguf"), "-c", "512", "-t", "1")
    chat = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}
    completion = {"prompt": "hello there", "max_tokens": 3}
    usage_too = {"stream": True, "stream_options": {"include_usage": True}}
    answers = []
    asked = [("/v1/chat/completions", chat), ("/v1/completions", completion),
             ("/v1/chat/completions", {**chat, **usage_too}), ("/v1/completions", {**completion, **usage_too})]
    for route, body in asked:
        request = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            data = resp.read()
        if body.get("stream"):
            data = next(line for line in data.splitlines() if b'"usage"' in line)
        answers.append(data)

    for data in answers:
        said = json.loads(data.removeprefix(b"data: "))
        tap = Tap(Metrics(), "tiny", "/v1/chat/completions", arrived=0.0)
        tap.read_usage(data)
        usage, timings = said["usage"], said["timings"]
        assert tap.counts == {b"prompt_tokens": usage["prompt_tokens"],
                              b"completion_tokens": usage["completion_tokens"],
                              b"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}
        kept = timings_of(tap.timings)
        assert kept is not None
        assert [float(value) for value in kept] == [timings[key.decode()] for key in recorder_module.TIMING_KEYS]
        assert tap_module.llama_usage(data, data.find(b'"usage"')) is not None, data  # the fast path
        assert recorder_module._LLAMA_TIMINGS.match(data, data.find(b'"timings"')), data


def test_retention_trims_by_count_and_age(tmp_path):
    conn = db.connect(tmp_path / db.FILENAME, create=True)
    assert conn is not None
    retention = retention_of(catalog.overlay(catalog.GATEWAY_DEFAULTS, {"telemetry": {"retention": {"maxRecords": 3}}}))
    assert retention == db.Retention(3, 720 * 3600)
    now = 1_000_000_000.0

    def row(at: float, completion: int) -> db.Row:
        return db.Row(at, "m", "llama-server", "/v1/completions", 200, 1, completion, None, None, 0.1, None, None,
                      False)

    db.write(conn, [row(now - 10 * 86400, 1)] + [row(now - i, i + 2) for i in range(5, 0, -1)], retention, now)
    assert [r["completionTokens"] for r in db.records(conn, "m")] == [3, 4, 5]  # the newest three
    db.write(conn, [row(now, 9)], db.Retention(None, 2.5), now)
    assert [r["completionTokens"] for r in db.records(conn, "m")] == [9, 3, 4]  # nothing older than 2.5 s
    assert db.clear(conn) == 3 and db.records(conn) == []
    conn.close()


def test_a_batch_larger_than_one_statement_is_stored_row_for_row_with_its_empty_figures_empty(tmp_path):
    """``db.write`` puts ``ROWS_PER_INSERT`` rows in each statement and binds an empty figure as ``ABSENT``: a
    batch of two full statements and a remainder comes back exactly as written, in order, each None still None
    and every zero still zero."""
    conn = db.connect(tmp_path / db.FILENAME, create=True)
    assert conn is not None
    count = 2 * db.ROWS_PER_INSERT + 23
    written = [db.Row(1_000_000_000.0 + i, f"m{i % 3}", "llama-server", "/v1/completions", 200 + i % 2,
                      None if i % 5 == 0 else i, 0 if i % 4 == 0 else i, None if i % 2 else 0,
                      None if i % 3 == 0 else i / 1000, 0.5 + i, None if i % 7 == 0 else 0.0 + i,
                      None if i % 6 == 0 else 2.5 * i, i % 2 == 0)
               for i in range(count)]
    db.write(conn, written, db.Retention(None, None), 1_000_000_000.0)
    stored = [db.Row(*r[:-1], bool(r[-1])) for r in conn.execute(f"SELECT {', '.join(db.COLUMNS)} FROM requests "
                                                                  "ORDER BY id")]
    conn.close()
    assert stored == written


def test_a_runtime_rate_of_zero_measured_nothing_and_is_not_recorded_as_zero():
    """llama-server reports 0 tokens/s when its timer read 0 ms: a stream falls back to the gateway's own figures,
    a whole answer has none; a real rate is kept as the runtime gave it."""
    from athanor.telemetry.recorder import rates

    assert rates(10, 9, None, 1.0, 0.0, 0.0) == (None, None)
    assert rates(10, 9, 0.5, 1.5, 0.0, 0.0) == (9 / 1.0, 10 / 0.5)
    assert rates(10, 9, None, 1.0, 120.5, float("inf")) == (120.5, None)


def test_timings_in_another_layout_are_read_and_a_figure_that_is_not_a_number_is_left_out():
    """Timings that are not in llama-server's own layout take the general pattern; of what it finds, a value that
    does not parse as a number is stored as absent, not as a failed row."""
    from athanor.telemetry.recorder import row_of

    tap = Tap(Metrics(), "m", "/v1/completions", arrived=0.0)
    tap.read_usage(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 2}, "timings": {"prompt_n": 5, '
                   b'"cache_n": 3, "predicted_per_second": 1e-, "prompt_per_second": 250.5}}')
    assert timings_of(tap.timings) == (b"3", b"5", b"250.5", None, b"1e-")
    row = row_of((0.0, "m", "llama-server", "/v1/completions", 200, 5, 2, None, None, 1.0, tap.timings, False))
    assert (row[7], row[10], row[11]) == (3, None, 250.5)  # cached from cache_n; no decode rate; the prefill's


def test_the_usage_read_is_the_runtime_s_not_a_generated_text_that_says_usage():
    """A model that answers with the word "usage" (a JSON string value, quoted like a key) comes before the answer's
    own usage: the counts and the timings are still the runtime's, and what is kept of the timings is the object."""
    tap = Tap(Metrics(), "m", "/v1/chat/completions", arrived=0.0)
    tap.read_usage(b'{"choices":[{"message":{"role":"assistant","content":"usage"}}],"usage":{"completion_tokens":3,'
                   b'"prompt_tokens":9,"total_tokens":12},"id":"x","timings":{"cache_n":0,"prompt_n":9,"prompt_ms":1,'
                   b'"prompt_per_token_ms":0.1,"prompt_per_second":9000.5,"predicted_n":3,"predicted_ms":2,'
                   b'"predicted_per_token_ms":0.6,"predicted_per_second":1500.25}}')
    assert tap.slot_tokens() == 12
    assert timings_of(tap.timings) == (b"0", b"9", b"9000.5", b"3", b"1500.25")


# llama-server's usage layout as a regular expression: the reference ``tap.llama_usage`` reads by hand
_LLAMA_USAGE = re.compile(rb'"usage":\{"completion_tokens":(\d+),"prompt_tokens":(\d+),"total_tokens":\d+'
                          rb'(?:,"prompt_tokens_details":\{"cached_tokens":(\d+)\})?\}')


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b'"usage":{"completion_tokens":', b',"prompt_tokens":', b',"total_tokens":',
                                 b',"prompt_tokens_details":{"cached_tokens":', b"}", b"0", b"42",
                                 b"123456789012345678901", b" ", b",", b'"', b"-", b"\xd9", b"{"]), max_size=12),
       st.booleans())
def test_llama_s_usage_read_by_hand_agrees_with_its_pattern(parts: list[bytes], canonical: bool):
    """Whatever the bytes (llama-server's layout, one cut short or changed anywhere), the hand-read usage is the
    pattern's match: the same counts, the same end, and None where it does not match."""
    data = b"".join(parts)
    if canonical:  # half the cases start as llama-server's own layout, so the deep branches are reached too
        data = b'"usage":{"completion_tokens":4,"prompt_tokens":20,"total_tokens":24' + data
    match = _LLAMA_USAGE.match(data, 0)
    expected = None if match is None else (int(match[1]), int(match[2]),
                                           None if match[3] is None else int(match[3]), match.end())
    assert tap_module.llama_usage(data, 0) == expected


def test_tokens_worked_out_once_still_follow_a_later_usage():
    """``slot_tokens`` and ``finish`` share one working-out of the counts; usage read after the first still counts
    (an Anthropic stream sends its input count first and its final output count last)."""
    metrics = Metrics()
    tap = Tap(metrics, "m", "/v1/messages", arrived=0.0)
    tap.read_usage(b'data: {"type":"message_start","message":{"usage":{"input_tokens":7,"output_tokens":1}}}')
    assert tap.slot_tokens() == 8
    tap.read_usage(b'data: {"type":"message_delta","usage":{"output_tokens":40}}')
    assert tap.slot_tokens() == 47
    tap.finish(200)
    assert metrics.tokens == {("m", "prompt"): 7, ("m", "completion"): 40}
