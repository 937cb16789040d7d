"""HTTP/1.1 conformance of the gateway's port, over raw sockets (issue 17, reliability suite: bad input).

Keep-alive, HTTP/1.0's close, ``Expect: 100-continue`` (the interim answer, or a refusal without it), and request
smuggling: each ambiguous framing is refused with a 400 and the connection closed, and nothing of it reaches the
runtime: neither the gateway's request count nor the runtime's own work counters (llama-server ``--metrics``: tokens
read and generated) move.
Nothing gives a 5xx or a traceback. Only what is seen from outside is asserted: these tests are the gate for any
server that replaces the ``/v1`` hot path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fixtures.raw_http import Answer, Connection, PeerClosed, request
from fixtures.serving import Gateway
from fixtures.shared_gateway import (
    assert_settled,
    BODY_LIMIT,
    answer_problem,
    completion,
    gateway_requests,
    port_of,
    runtime_work,
    shared_gateway,
)

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with shared_gateway(tmp_path_factory.mktemp("http-conformance")) as gateway:
        status, body = gateway.post(CHAT, completion())  # the runtime loaded once, before any case
        assert status == 200, body
        yield gateway


@pytest.fixture(autouse=True)
def no_traceback(gw: Gateway) -> Iterator[None]:
    yield
    assert_settled(gw)


def checked(answer: Answer, path: str = CHAT, method: str = "POST") -> Answer:
    problem = answer_problem(path, method, answer.status, answer.body)
    assert problem is None, problem
    return answer


def completed(answer: Answer, stream: bool = False) -> None:
    assert answer.status == 200, (answer.status, answer.body[:300])
    if stream:
        assert answer.body.rstrip().endswith(b"data: [DONE]"), answer.body[-300:]
    else:
        assert answer.json()["choices"], answer.body[:300]

# ---------------------------------------------------------------------------------------------- connections


def test_a_kept_alive_connection_carries_several_requests(gw: Gateway):
    with Connection(port_of(gw)) as conn:
        conn.send(request("GET", "/health"))
        first = conn.read_answer("GET")
        assert first.status == 200 and not first.closes, first
        conn.send(request("POST", CHAT, completion()))
        second = conn.read_answer()
        completed(second)
        assert not second.closes, second.headers
        conn.send(request("POST", CHAT, completion(stream=True)))
        completed(conn.read_answer(), stream=True)
        conn.send(request("GET", "/v1/models"))
        assert conn.read_answer("GET").status == 200


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_http_1_0_request_without_keep_alive_is_answered_then_closed(gw: Gateway, stream: bool):
    """HTTP/1.0 has no chunked coding: a stream comes close-delimited, and either way the connection ends."""
    with Connection(port_of(gw)) as conn:
        conn.send(request("POST", CHAT, completion(stream=stream), version="HTTP/1.0"))
        answer = conn.read_answer()
        completed(answer, stream)
        assert "chunked" not in (answer.header("transfer-encoding") or ""), answer.headers
        assert conn.closed_by_peer(), "an HTTP/1.0 connection without keep-alive stays open"


def test_expect_100_continue_gets_the_interim_answer_before_the_body(gw: Gateway):
    body = completion()
    with Connection(port_of(gw)) as conn:
        conn.send(request("POST", CHAT, None, {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                               "Expect": "100-continue"}))
        interim = conn.read_answer()
        assert interim.status == 100, interim
        conn.send(body)
        completed(conn.read_answer())
        # The connection goes on: the interim answer was not the answer.
        conn.send(request("GET", "/health"))
        assert conn.read_answer("GET").status == 200


@pytest.mark.parametrize("headers, status", [
    ({"Content-Length": str(BODY_LIMIT + 1)}, 413),
    ({"Content-Length": "64", "Host": "evil.example"}, 403),
    ({"Content-Length": "64", "Expect": "something-else"}, 417),
], ids=["over the body limit", "a foreign host", "an unknown expectation"])
def test_a_refused_expect_100_continue_gets_the_final_status_without_100(gw: Gateway, headers: dict[str, str],
                                                                         status: int):
    before = gateway_requests(gw), runtime_work(gw)
    lines = {"Content-Type": "application/json", "Expect": "100-continue", **headers}
    host = lines.pop("Host", "127.0.0.1")
    head = "".join(f"{k}: {v}\r\n" for k, v in lines.items())
    with Connection(port_of(gw)) as conn:
        conn.send(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode())
        answer = checked(conn.read_answer())
        assert answer.status == status, (answer.status, answer.body)
    assert (gateway_requests(gw), runtime_work(gw)) == before, "the refused request reached the runtime"

# ---------------------------------------------------------------------------------------------- smuggling

SMUGGLED = request("POST", CHAT, completion())  # what each attempt hides after its own framing
BODY = completion()
HEAD = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


ATTEMPTS = {
    # Content-Length says the body is the empty chunked terminator; chunked says it ends there: the rest is "next".
    "Content-Length and Transfer-Encoding": HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            b"0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding and Content-Length": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                                            + _chunk(BODY) + b"0\r\n\r\n" + SMUGGLED,
    "two differing Content-Lengths": HEAD + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                                     % (len(BODY), len(BODY) + len(SMUGGLED)) + BODY + SMUGGLED,
    "a Content-Length list": HEAD + b"Content-Length: %d, %d\r\n\r\n" % (len(BODY), len(BODY) + len(SMUGGLED))
                             + BODY + SMUGGLED,
    "a folded header": HEAD + b"Content-Length: %d\r\nX-Folded: a\r\n b\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
    "a folded Transfer-Encoding": HEAD + b"Content-Length: %d\r\nTransfer-Encoding:\r\n chunked\r\n\r\n" % len(BODY)
                                  + BODY + SMUGGLED,
    "a folded Content-Length": HEAD + b"X-A: b\r\nContent-Length:\r\n %d\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
    "a chunk size that is not hex": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY + b"\r\n0\r\n\r\n"
                                    + SMUGGLED,
    "a negative chunk size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n-5\r\n" + BODY + b"\r\n0\r\n\r\n" + SMUGGLED,
    "a chunk size that overflows": HEAD + b"Transfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 + b"\r\n" + BODY
                                   + b"\r\n0\r\n\r\n" + SMUGGLED,
    "a 0x chunk size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"
                       + SMUGGLED,
    "a chunk longer than its size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (len(BODY) - 20) + BODY
                                    + b"\r\n0\r\n\r\n" + SMUGGLED,
    "bare LF in the chunks": HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\n" % len(BODY) + BODY + b"\n0\n\n"
                             + SMUGGLED,
    "bare LF ending the headers": (b"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Length: %d\n\n"
                                   % len(BODY) + BODY + SMUGGLED),
    "bare LF after a header": HEAD + b"Content-Length: %d\nX-A: b\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
    "bare CR after a header": HEAD + b"Content-Length: %d\rX-A: b\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
    "an unknown transfer coding": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n" + _chunk(BODY) + b"0\r\n\r\n"
                                  + SMUGGLED,
    "chunked not last": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n" + _chunk(BODY) + b"0\r\n\r\n"
                        + SMUGGLED,
    "Transfer-Encoding twice": HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                               + _chunk(BODY) + b"0\r\n\r\n" + SMUGGLED,
    "a space before the colon": HEAD + b"Transfer-Encoding : chunked\r\nContent-Length: %d\r\n\r\n" % len(BODY)
                                + BODY + SMUGGLED,
    "a Content-Length with a sign": HEAD + b"Content-Length: +%d\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
}


@pytest.mark.parametrize("raw", list(ATTEMPTS.values()), ids=list(ATTEMPTS))
def test_a_smuggling_attempt_is_refused_and_closes_the_connection(gw: Gateway, raw: bytes):
    before = gateway_requests(gw), runtime_work(gw)
    with Connection(port_of(gw), timeout=15) as conn:
        conn.send(raw)
        answer = checked(conn.read_answer())
        assert answer.status == 400, (answer.status, answer.body[:300])
        try:
            rest = conn.read_to_end()
        except TimeoutError:
            pytest.fail("the connection stayed open after a refused framing")
        assert not rest, f"a second answer on the connection: {rest[:300]!r}"
    assert (gateway_requests(gw), runtime_work(gw)) == before, "something of the attempt reached the runtime"


def test_the_runtime_counters_see_a_request_that_is_forwarded(gw: Gateway):
    """The counters the smuggling tests watch do move for one request that gets through (so their silence above
    means something)."""
    before = gateway_requests(gw), runtime_work(gw)["tokens_predicted_total"]
    with Connection(port_of(gw)) as conn:
        conn.send(SMUGGLED)
        completed(conn.read_answer())
    after = gateway_requests(gw), runtime_work(gw)["tokens_predicted_total"]
    assert after[0] == before[0] + 1 and after[1] > before[1], (before, after)


def test_a_body_cut_short_by_the_client_reaches_nobody(gw: Gateway):
    """Content-Length promises more than comes before the client hangs up: nothing is forwarded."""
    before = gateway_requests(gw), runtime_work(gw)
    with Connection(port_of(gw)) as conn:
        conn.send(HEAD + b"Content-Length: %d\r\n\r\n" % (len(BODY) + 10) + BODY)
        conn.sock.shutdown(1)  # SHUT_WR: the client is done sending
        try:
            rest = conn.read_to_end()
        except (PeerClosed, TimeoutError):
            rest = b""
    if rest:
        status = int(rest.split(b" ", 2)[1])
        assert 400 <= status < 500, rest[:300]
    assert (gateway_requests(gw), runtime_work(gw)) == before, json.dumps(before)
