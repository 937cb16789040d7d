"""Clients that do not read (issue 17, reliability suite: the admin API and the event stream under a slow reader).

A client that opens a stream and stops reading must cost the gateway a bounded amount of memory, must not hold up
anyone else, and must end up either dropped or caught up once it reads again. Checked against one real
``athanor serve`` over raw sockets whose receive buffer is a few kilobytes, so the gateway's writes to it really
block:

- the admin API's followed streams (events, status, the daemon's log) while thousands of events are generated (model
  stops and starts, then models.json made unreadable and readable again: two real events, and a log line, each
  time, at a few milliseconds a flip): the daemon's RSS stays under a bound, other clients (completions, the admin API) are answered meanwhile, and the slow
  event stream, read at last, ends with ``event: lagged`` (dropped) or reaches the newest event (caught up); the
  status feed and the log reach what is current;
- a streamed completion nobody reads: other clients' completions are answered while it is held up, and read at
  last it is complete.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.raw_http import Connection, request
from fixtures.serving import Gateway, wait_until
from fixtures.shared_gateway import (
    assert_settled,
    MODEL,
    completion,
    daemon_log,
    daemon_rss,
    port_of,
    runtime_work,
    shared_gateway,
)

MiB = 1024 * 1024
RSS_BOUND = 64 * MiB  # what the daemon may grow by while slow readers hold streams open (it grew by ~5 MiB here)
SMALL_RCVBUF = 4096
STORE_FLIPS = 1200  # each: models.json unreadable, then readable again: two events
STREAM_TOKENS = 900


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Long answers: a context of 2k over two slots, no cap on the answer but the client's max_tokens.
    with shared_gateway(tmp_path_factory.mktemp("slow-readers"), preset="ctxSize: 2048, parallel: 2",
                        context_length=2048) as gateway:
        status, body = gateway.post("/v1/chat/completions", completion())
        assert status == 200, body
        yield gateway


@pytest.fixture(autouse=True)
def settled_afterwards(gw: Gateway) -> Iterator[None]:
    yield
    assert_settled(gw, 30)


def served(gw: Gateway) -> None:
    """Another client is answered now: a completion, a streamed one, and the admin API's status and event list."""
    with Connection(port_of(gw), timeout=30) as conn:
        conn.send(request("POST", "/v1/chat/completions", completion()))
        answer = conn.read_answer()
        assert answer.status == 200 and answer.json()["choices"], answer
        conn.send(request("POST", "/v1/chat/completions", completion(stream=True)))
        answer = conn.read_answer()
        assert answer.status == 200 and answer.body.rstrip().endswith(b"data: [DONE]"), answer
        conn.send(request("GET", "/athanor/v1/status"))
        answer = conn.read_answer("GET")
        assert answer.status == 200 and MODEL in answer.json()["instances"], answer
        conn.send(request("GET", "/athanor/v1/events"))
        answer = conn.read_answer("GET")
        assert answer.status == 200 and answer.json()["items"], answer


def flip_store(models: Path, good: bytes, trigger: Connection) -> None:
    """models.json made unreadable, then readable again, each seen by the gateway (a request that names a model
    makes it look): a StoreUnreadable and a StoreReadable event. Each write is a new file renamed into place, as
    the store's own are."""
    for content in (b"{ not json", good):
        spare = models.with_suffix(".flip")
        spare.write_bytes(content)
        os.replace(spare, models)
        trigger.send(request("POST", "/v1/chat/completions", b'{"model": "no-such-model"}'))
        assert trigger.read_answer().status == 404


class Followed:
    """A followed stream (chunked, as HTTP/1.1 streams are) opened by a client that does not read it yet."""

    def __init__(self, gw: Gateway, target: str, accept: str = "text/event-stream"):
        self.conn = Connection(port_of(gw), timeout=30, rcvbuf=SMALL_RCVBUF)
        self.conn.send(request("GET", target, None, {"Accept": accept}))
        self.body = b""
        self.started = self.ended = False

    def unread(self) -> int:
        return self.conn.unread()

    def read_until(self, until: Callable[[bytes], bool], deadline_s: float = 60.0) -> bytes:
        """Read the stream until ``until(body so far)`` holds or the stream ends; the body so far."""
        if not self.started:
            head = self.conn.read_head()
            assert head.status == 200 and "chunked" in (head.header("transfer-encoding") or ""), head
            self.started = True
        deadline = time.monotonic() + deadline_s
        while not until(self.body) and not self.ended:
            if time.monotonic() > deadline:
                raise AssertionError(f"the slow reader neither caught up nor was dropped within {deadline_s} s: "
                                     f"{self.body[-500:]!r}")
            chunk = self.conn.read_chunk()
            if chunk is None:
                self.ended = True
            else:
                self.body += chunk
        return self.body

    def close(self) -> None:
        self.conn.close()


def event_ids(data: bytes) -> list[int]:
    return [int(line[4:]) for line in data.split(b"\n") if line.startswith(b"id: ")]


def last_status_event(data: bytes) -> int | None:
    """``lastEvent`` of the newest complete status the feed sent in ``data``."""
    complete = data[:data.rfind(b"\n\n")]
    lines = [line for line in complete.split(b"\n") if line.startswith(b"data: {")]
    return json.loads(lines[-1][6:])["lastEvent"] if lines else None


def test_slow_readers_of_the_admin_streams_cost_bounded_memory_and_hold_up_nobody(gw: Gateway):
    models = gw.home / "models.json"
    good = models.read_bytes()
    baseline = daemon_rss(gw)
    events = Followed(gw, "/athanor/v1/events?follow=1")
    status = Followed(gw, "/athanor/v1/status?follow=1")
    log = Followed(gw, "/athanor/v1/daemon/logs?follow=1&lines=1", accept="text/plain")
    wait_until(lambda: all(c.unread() > 0 for c in (events, status, log)), 30, "the three streams to begin")
    first = gw.status()["lastEvent"]
    peak = baseline
    try:
        # Real starts and stops first, then the store made unreadable and readable again, many times over: far
        # more events than the slow stream's buffers and its backlog hold.
        for _ in range(3):
            for action in ("stop", "start"):
                code, answer = gw.post(f"/athanor/v1/models/{MODEL}/{action}", b"")
                assert code == 200, answer
        with Connection(port_of(gw)) as trigger:
            for flip in range(STORE_FLIPS):
                flip_store(models, good, trigger)
                if flip % 100 == 0:
                    served(gw)
                    peak = max(peak, daemon_rss(gw))
        served(gw)
        peak = max(peak, daemon_rss(gw))
        held = events.unread()
        last = gw.status()["lastEvent"]
        assert last - first >= 2 * STORE_FLIPS, (first, last)
        assert peak - baseline < RSS_BOUND, f"the daemon grew by {(peak - baseline) / MiB:.0f} MiB"

        # Read at last: the event stream was cut (``lagged``) or delivers up to the newest event, in order.
        data = events.read_until(lambda d: b"event: lagged" in d or f"id: {last}\n".encode() in d)
        assert not events.ended or b"event: lagged" in data, "the event stream ended without a word"
        ids = event_ids(data)
        assert ids and ids == list(range(ids[0], ids[0] + len(ids))), "events missing or out of order"
        assert held < len(data), "the slow reader was never held up: its test proves nothing"
        print(f"slow event stream: {len(ids)} events read, {last - first} emitted, lagged: {b'event: lagged' in data}, "
              f"daemon RSS +{(peak - baseline) / MiB:.1f} MiB")
        if b"event: lagged" in data:
            events.read_until(lambda d: False)
            assert events.ended, "a stream cut off for lagging goes on"
        else:
            assert ids[-1] == last
        # The status feed sends the status as it is now (coalesced: nothing piled up); the log reaches its end.
        assert last_status_event(status.read_until(lambda d: last_status_event(d) == last)) == last
        tail = daemon_log(gw).rstrip("\n").rsplit("\n", 1)[-1].encode()
        assert tail in log.read_until(lambda d: tail in d), "the followed log ended before its last line"
    finally:
        if models.read_bytes() != good:
            with Connection(port_of(gw)) as trigger:
                flip_store(models, good, trigger)
        for stream in (events, status, log):
            stream.close()
    served(gw)


def test_a_slow_reader_of_a_streamed_completion_holds_up_nobody(gw: Gateway):
    before = runtime_work(gw)["tokens_predicted_total"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}],
                       "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    with Connection(port_of(gw), timeout=60, rcvbuf=SMALL_RCVBUF) as slow:
        slow.send(request("POST", "/v1/chat/completions", body))
        # Held: the slow reader's socket is full, with most of the answer still to come (where the rest waits, in
        # the gateway's bounded buffers or in the runtime, which paces generation by what its client takes, is the
        # gateway's business; that others are served meanwhile is what counts).
        wait_until(lambda: slow.unread() >= SMALL_RCVBUF // 2, 30, "the slow reader's socket to fill")
        held = slow.unread()
        for _ in range(3):
            served(gw)
        assert slow.unread() < 4 * SMALL_RCVBUF, "the stream went on although its reader did not read"
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)  # now it reads, and quickly
        answer = slow.read_answer()
    assert answer.status == 200
    assert answer.body.rstrip().endswith(b"data: [DONE]"), answer.body[-300:]
    usage = [json.loads(line[6:])["usage"] for line in answer.body.split(b"\n") if line.startswith(b'data: {"') and
             b'"usage":{' in line]
    assert usage and usage[-1]["completion_tokens"] == STREAM_TOKENS, usage
    assert held < len(answer.body) // 10, "the slow reader was never held up: its test proves nothing"
    assert runtime_work(gw)["tokens_predicted_total"] - before >= STREAM_TOKENS
