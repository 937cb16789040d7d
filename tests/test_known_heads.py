"""Heads parsed once (``athanor/ingress/heads.py``): a head seen before is not parsed again, and nothing a client or
a runtime can send is read differently for it.

The front door's side runs its real ``Connection`` on a real event loop with a transport that keeps what is written
(so each test can cut the bytes into reads exactly where it wants and see whether the memo was used); the pool's
side talks to a raw asyncio server on loopback that sends each answer cut into the writes the test chooses. What
a client sees of the whole gateway, the same heads first parsed and then known, is in the HTTP conformance and
fuzz suites, whose module-wide gateway has seen their heads before most of their cases.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from athanor.ingress.heads import MAX_REMEMBERED, HeadMemo, length_key, number_at
from athanor.ingress.proxy import REQUEST_SKIP_BYTES
from athanor.ingress.upstream import UpstreamClosed, UpstreamPool, _Connection, _RuntimeConnections
from athanor.ingress.wire import Front, Request
from fixtures.transports import KeptTransport

# ---------------------------------------------------------------------------------------------- the key


@pytest.mark.parametrize("head, value", [
    (b"POST /v1/x HTTP/1.1\r\nHost: h\r\nContent-Length: 12\r\nA: b", b"12"),
    (b"POST /v1/x HTTP/1.1\r\ncontent-length: 7\r\nA: b", b"7"),
    (b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 0", b"0"),
])
def test_the_key_is_the_head_without_the_length_s_value(head: bytes, value: bytes):
    key, found, length = length_key(head + b"\r\n\r\n{}", len(head))
    assert (found, length) == (value, int(value))
    assert key == head.replace(b": " + value, b": ", 1)
    other = head.replace(b": " + value, b": 345", 1)
    assert length_key(other + b"\r\n\r\n", len(other))[0] == key  # another length, the same key


@pytest.mark.parametrize("head", [
    b"POST /v1/x HTTP/1.1\r\nHost: h",  # no length
    b"POST /v1/x HTTP/1.1\r\nContent-Length: +5",  # what llhttp refuses
    b"POST /v1/x HTTP/1.1\r\nContent-Length: 5, 6",
    b"POST /v1/x HTTP/1.1\r\nContent-Length: 5 ",
    b"POST /v1/x HTTP/1.1\r\nContent-Length: ",
    b"POST /v1/x HTTP/1.1\r\nContent-Length:\r\n 5",  # folded
    b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\nX: y",  # a bare LF ends nothing
    b"POST /v1/x HTTP/1.1\r\nContent-Length: 1234567890123456",  # more digits than any body
    b"POST /v1/x HTTP/1.1\r\nCONTENT-LENGTH: 5",  # a spelling that is parsed every time
])
def test_a_head_whose_length_is_not_plain_digits_has_no_key(head: bytes):
    assert length_key(head + b"\r\n\r\n", len(head)) is None


def _length_key_by_searches(data: bytes, end: int) -> tuple[bytes, bytes, int] | None:
    """``length_key`` as it was written before ``number_at`` (a search for the line's end, ``isdigit``, ``int``): the
    reference the hand-read value must agree with."""
    for line in (b"\r\nContent-Length: ", b"\r\ncontent-length: "):
        at = data.find(line)
        if 0 <= at < end:
            start = at + len(line)
            stop = data.find(b"\r", start)
            value = data[start:stop]
            if len(value) > 15 or not value.isdigit():
                return None
            return data[:start] + data[stop:end], value, int(value)
    return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"\r\nContent-Length: ", b"\r\ncontent-length: ", b"0", b"7", b"12345678",
                                 b" ", b"+", b",", b"\n", b"\r\n", b"\r\nHost: h", b"\xd9", b"-"]), max_size=8))
def test_the_length_read_by_hand_agrees_with_searches_and_int(parts: list[bytes]):
    head = b"POST /v1/x HTTP/1.1" + b"".join(parts)
    if b"\r\n\r\n" in head:
        return
    data = head + b"\r\n\r\n{}"
    assert length_key(data, len(head)) == _length_key_by_searches(data, len(head))


@pytest.mark.parametrize("data, at, expected", [
    (b"12ab", 0, (12, 2)), (b"x", 0, (0, 0)), (b"", 0, (0, 0)), (b"a0099", 1, (99, 5)),
    (b"12345678901234567890123", 0, (12345678901234567890123, 23)), (b"9/", 0, (9, 1)), (b"9:", 0, (9, 1)),
])
def test_number_at_reads_ascii_digits_only(data: bytes, at: int, expected: tuple[int, int]):
    assert number_at(data, at) == expected


def test_a_length_in_the_body_is_not_the_head_s():
    head = b"POST /v1/x HTTP/1.1\r\nHost: h"
    data = head + b"\r\n\r\n\r\nContent-Length: 5\r\n"
    assert length_key(data, len(head)) is None


def test_the_memo_is_bounded():
    memo: HeadMemo[int] = HeadMemo()
    for i in range(MAX_REMEMBERED * 2 + 1):
        memo.remember(b"%d" % i, i)
        assert len(memo) <= MAX_REMEMBERED
    assert memo.get(b"%d" % (MAX_REMEMBERED * 2)) == MAX_REMEMBERED * 2

# ---------------------------------------------------------------------------------------------- the front door


Seen = tuple[str, str, bytes, bytes | None, bytes, list[tuple[bytes, bytes]]]


def front_door(scenario: Callable[[Front, Any], Awaitable[None]]) -> None:
    """``scenario(front, send)``: ``send(reads)`` feeds one new connection those reads and returns what the handler
    saw of each request it answered (method, target, body, Content-Length, forwarded lines, raw headers)."""

    async def main() -> None:
        seen: asyncio.Queue[Seen] = asyncio.Queue()

        async def echo(request: Request) -> None:
            seen.put_nowait((request.method, request.target, request.body, request.fields.get(b"content-length"),
                             request.forward, request.raw_headers))
            await request.respond(200, [], request.body)

        async def relay(request: Request) -> None:
            raise AssertionError(f"relayed: {request.method} {request.target}")

        front = Front(echo, relay, max_body=lambda: 1000, expect=lambda request: None,
                      error_body=lambda *args: b'{"error": {}}', cors=lambda request: [],
                      forward_skip=REQUEST_SKIP_BYTES)

        async def send(reads: list[bytes], *, one_by_one: bool = False,
                       before: Callable[[int], None] | None = None) -> list[Seen]:
            """``one_by_one``: each read once the one before was answered (so each starts a message);
            ``before(n)`` runs before read ``n`` is fed."""
            connection = front()
            connection.connection_made(KeptTransport())  # type: ignore[arg-type]
            answers = []
            for n, data in enumerate(reads):
                if before is not None:
                    before(n)
                connection.data_received(data)
                if one_by_one:
                    answers.append(await asyncio.wait_for(seen.get(), 10))
            if not one_by_one:
                answers = [await asyncio.wait_for(seen.get(), 10) for _ in range(sum(r.count(b"POST") for r in reads))]
            connection.connection_lost(None)
            return answers

        try:
            await scenario(front, send)
        finally:
            front.close()

    asyncio.run(main())


async def until(condition: Callable[[], object]) -> None:
    """Let the connection's task run until ``condition()`` holds (for at most 10 s)."""
    async def turns() -> None:
        while not condition():
            await asyncio.sleep(0)  # one turn of the loop: the task writes its answer in a few

    await asyncio.wait_for(turns(), 10)


HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: t/1\r\nX-Passed: on\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nAuthorization: Bearer k\r\n\r\n")


def post(body: bytes, head: bytes = HEAD) -> bytes:
    return head % len(body) + body


def test_a_known_head_reads_as_the_parsed_one_did_with_its_own_length_and_body():
    async def scenario(front: Front, send: Callable[[list[bytes]], Awaitable[list[Seen]]]) -> None:
        (parsed,) = await send([post(b'{"a": 1}')])
        assert len(front.heads) == 1
        (known,) = await send([post(b'{"a": 12345}')])
        assert len(front.heads) == 1  # the same key: not parsed and remembered again
        assert parsed[:3] == ("POST", "/v1/chat/completions", b'{"a": 1}') and parsed[3] == b"8"
        assert known[:3] == ("POST", "/v1/chat/completions", b'{"a": 12345}') and known[3] == b"12"
        assert known[4] == parsed[4] == b"User-Agent: t/1\r\nX-Passed: on\r\n"  # no length, type or key passed on
        assert dict(known[5])[b"Content-Length"] == b"12" and known[5][:-2] == parsed[5][:-2]

    front_door(scenario)


@pytest.mark.parametrize("cut", ["after the head", "inside the body", "one byte at a time"])
def test_a_body_that_comes_in_later_reads_after_a_known_head(cut: str):
    body = b'{"messages": "' + b"x" * 50 + b'"}'
    data = post(body)
    head_end = data.index(b"\r\n\r\n") + 4
    reads = {"after the head": [data[:head_end], data[head_end:]],
             "inside the body": [data[:head_end + 10], data[head_end + 10:head_end + 11], data[head_end + 11:]],
             "one byte at a time": [data[:head_end], *[data[i:i + 1] for i in range(head_end, len(data))]]}[cut]

    async def scenario(front: Front, send: Callable[[list[bytes]], Awaitable[list[Seen]]]) -> None:
        await send([post(b"{}")])
        (seen,) = await send(reads)
        assert seen[2] == body

    front_door(scenario)


def test_a_connection_s_last_head_is_taken_by_its_bytes_and_any_other_head_is_looked_up():
    """A connection repeats its last head (``KnownHeads._last``): with the memo emptied, the same head with another
    length still reads as parsed; a head that differs anywhere else, before the length or after it, is parsed."""
    async def scenario(front: Front, send: Any) -> None:
        other_after = HEAD.replace(b"Bearer k", b"Bearer q")
        other_before = HEAD.replace(b"t/1", b"t/2")
        reads = [post(b"{}"), post(b'{"n": 1}')]  # parsed and remembered, then found in the memo
        _, second = await send(reads, one_by_one=True)

        def before(n: int) -> None:
            if n == 2:
                front.heads.clear()

        seen = await send([*reads, post(b'{"n": 1}'), post(b'{"n": 4444}'), post(b'{"n": 5}', other_after),
                           post(b'{"n": 6}', other_before)], one_by_one=True, before=before)
        assert [s[2] for s in seen] == [b"{}", b'{"n": 1}', b'{"n": 1}', b'{"n": 4444}', b'{"n": 5}', b'{"n": 6}']
        assert [s[3] for s in seen] == [b"2", b"8", b"8", b"11", b"8", b"8"]
        assert seen[2] == second  # by the last head: what the parse made
        assert seen[3][4] == second[4] and seen[3][5][:-2] == second[5][:-2]  # the same lines, but the length
        assert dict(seen[4][5])[b"Authorization"] == b"Bearer q" and dict(seen[5][5])[b"User-Agent"] == b"t/2"
        assert len(front.heads) == 2  # the memo emptied, then the two other heads parsed into it; the last one not

    front_door(scenario)


def test_requests_pipelined_after_a_known_head_are_each_answered_in_order():
    async def scenario(front: Front, send: Callable[[list[bytes]], Awaitable[list[Seen]]]) -> None:
        await send([post(b"{}")])
        seen = await send([post(b'{"n": 1}') + post(b'{"n": 22}') + post(b'{"n": 333}')])
        assert [s[2] for s in seen] == [b'{"n": 1}', b'{"n": 22}', b'{"n": 333}']

    front_door(scenario)


@pytest.mark.parametrize("variant", [
    b"Content-Length: %d\r\nContent-Length: 99\r\n",  # two of them: what llhttp refuses
    b"Content-Length: +%d\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n",
])
def test_a_smuggling_attempt_on_a_remembered_head_is_still_refused(variant: bytes):
    """The head a smuggling attempt differs in never matches a remembered one: llhttp reads it, and refuses it."""
    head = HEAD.replace(b"Content-Length: %d\r\n", variant)

    async def scenario(front: Front, send: Callable[[list[bytes]], Awaitable[list[Seen]]]) -> None:
        await send([post(b"{}")])
        connection = front()
        transport = KeptTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(head % 2 + b"{}" + post(b"{}"))
        await until(lambda: transport.closed)  # the refusal is written by the connection's task
        answer = b"".join(transport.written)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.count(b"HTTP/1.1") == 1, answer  # nothing after the attempt was read as a request

    front_door(scenario)


def test_a_head_with_expect_or_a_body_too_large_is_never_taken_for_a_known_one():
    async def scenario(front: Front, send: Callable[[list[bytes]], Awaitable[list[Seen]]]) -> None:
        await send([HEAD.replace(b"X-Passed: on\r\n", b"Expect: 100-continue\r\n") % 2 + b"{}"])
        assert len(front.heads) == 0  # Expect: answered with more than the head says
        await send([post(b"{}")])
        connection = front()
        transport = KeptTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(post(b"x" * 1001))  # the limit is 1000: known head, refused all the same
        await until(lambda: transport.written)
        assert transport.written[0].startswith(b"HTTP/1.1 413 "), transport.written

    front_door(scenario)

# ---------------------------------------------------------------------------------------------- the pool


ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nServer: r\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


def answered_with(writes: Callable[[bytes], list[bytes]], bodies: list[bytes]) -> tuple[list[bytes | Exception], int]:
    """The bodies the pool read, one request after another on one kept-alive connection, from a runtime that sends
    its answer to the i-th request, ``bodies[i]``, as the writes ``writes(answer)`` gives (each one drained); and
    how many heads the pool remembered."""

    async def main() -> tuple[list[bytes | Exception], int]:
        async def runtime(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for body in bodies:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                for part in writes(ANSWER_HEAD % len(body) + body):
                    writer.write(part)
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(runtime, "127.0.0.1", 0)
        pool = UpstreamPool()
        port = server.sockets[0].getsockname()[1]
        got: list[bytes | Exception] = []
        try:
            for _ in bodies:
                try:
                    async with pool.request(port, "POST", "/v1/x", [], b"{}") as resp:
                        got.append(await resp.read())
                except UpstreamClosed as exc:
                    got.append(exc)
            return got, len(pool._runtimes[("127.0.0.1", port)].heads)
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


BODIES = [b'{"n": 1}', b'{"n": 22}', b'{"n": 4444}', b"", b'{"n": 55555}']


def test_a_runtime_s_answers_over_a_socket_read_the_same_once_their_head_is_known():
    got, remembered = answered_with(lambda answer: [answer], BODIES)
    assert got == BODIES and remembered == 1


def read_by_the_pool(answers: list[list[bytes]]) -> tuple[list[tuple[int, bytes, bytes]], int]:
    """(status, passed-on header lines, body) of each answer, one after another on one connection whose reads are
    exactly ``answers[i]``; and how many heads the pool remembered."""
    return asyncio.run(_read_by_the_pool(answers))


async def _read_by_the_pool(answers: list[list[bytes]]) -> tuple[list[tuple[int, bytes, bytes]], int]:
    runtime = _RuntimeConnections(("127.0.0.1", 1), 1, 4, None)
    connection = _Connection(runtime)
    connection.connection_made(KeptTransport())  # type: ignore[arg-type]
    read = []
    for reads in answers:
        done: list[_Connection] = []
        connection.send_now(b"POST /v1/x HTTP/1.1\r\n\r\n", b"", None, done.append)
        for data in reads:
            assert not done, "complete before its last read"
            connection.data_received(data)
        assert done and connection.error is None and connection.reusable, connection.error
        response = connection.response
        assert response is not None
        read.append((response.status, response.passed_on, b"".join(connection.take_all())))
        assert dict(response.headers)[b"Content-Length"] == b"%d" % len(read[-1][2])
    return read, len(runtime.heads)


def _cut(answer: bytes, *at: int) -> list[bytes]:
    """``answer`` cut at these offsets from the end of its head."""
    body = answer.index(b"\r\n\r\n") + 4
    cuts = [0, *[body + a for a in at], len(answer)]
    return [answer[i:j] for i, j in zip(cuts, cuts[1:]) if answer[i:j]]


@pytest.mark.parametrize("cut", [
    lambda answer: [answer],
    lambda answer: _cut(answer, 0),
    lambda answer: _cut(answer, 2),
    lambda answer: _cut(answer, 0, 1, 2, 3),
], ids=["whole", "head, then body", "head and some body, then the rest", "head, then the body in pieces"])
def test_a_runtime_s_answers_read_the_same_once_their_head_is_known(cut: Callable[[bytes], list[bytes]]):
    answers = [ANSWER_HEAD % len(body) + body for body in BODIES]
    read, remembered = read_by_the_pool([[answers[0]], *[cut(a) for a in answers[1:]]])
    assert [body for _, _, body in read] == BODIES
    assert {(status, passed_on) for status, passed_on, _ in read} == {
        (200, b"Server: r\r\nContent-Type: application/json\r\n")}
    assert remembered == 1


def test_an_answer_with_another_framing_on_a_known_head_is_read_by_llhttp():
    """A head that differs from the remembered one by a second length is llhttp's to judge: it refuses it."""
    bad = ANSWER_HEAD.replace(b"Content-Length: %d\r\n", b"Content-Length: %d\r\nContent-Length: 1\r\n")

    def writes(answer: bytes) -> list[bytes]:
        if answer.endswith(b"bad"):
            return [bad % 3 + b"bad"]
        return [answer]

    got, remembered = answered_with(writes, [b"{}", b"bad", b"{}"])
    assert got[0] == b"{}" and isinstance(got[1], UpstreamClosed) and got[2] == b"{}", got
    assert remembered == 1


# ---------------------------------------------------------------------------------------------- the guard


def judged(specs: list[dict[str, Any] | str], head: bytes = HEAD, target: bytes = b"/v1/chat/completions",
           listen: str = "127.0.0.1:8080") -> tuple[list[tuple[int, str] | None], int]:
    """The guard's answer to one request with ``head`` under each gateway spec in turn (the head remembered by the
    front door from the first on), and how many admissions the guard remembers at the end. A spec is kept as one
    dict while it does not change, as the controller keeps it; a str in ``specs`` rebinds the guard to that
    address instead."""
    from athanor import catalog
    from athanor.ingress.guard import Guard

    head = head.replace(b"/v1/chat/completions", target)
    answers: list[tuple[int, str] | None] = []
    remembered = []

    async def main() -> None:
        requests: list[Request] = []

        async def keep(request: Request) -> None:
            requests.append(request)
            await request.respond(200, [], b"")

        front = Front(keep, keep, max_body=lambda: 1000, expect=lambda request: None,
                      error_body=lambda *args: b"{}", cors=lambda request: [], forward_skip=REQUEST_SKIP_BYTES)
        guard = Guard(listen)
        gateway: dict[str, Any] = {}
        applied: object = None
        for spec in specs:
            if isinstance(spec, str):
                guard.rebind(spec)
                continue
            if spec != applied:
                applied, gateway = spec, catalog.gateway_spec({"gateway": {"spec": spec}})
            connection = front()
            connection.connection_made(KeptTransport())  # type: ignore[arg-type]
            connection.data_received(head % 2 + b"{}")
            await until(lambda: len(requests) == len(answers) + 1)
            answers.append(guard.refusal(requests[-1], guard.policy(gateway), gateway["auth"]))
            connection.connection_lost(None)
        front.close()
        remembered.append(len(guard._admitted))
        assert requests[-1].head_key is not None  # the head was remembered: the later answers could come from there

    asyncio.run(main())
    return answers, remembered[0]


def test_an_admission_remembered_by_its_head_ends_when_the_api_keys_change(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    other = tmp_path / "other"
    other.write_text("someone-else\n")
    answers, remembered = judged([{"auth": {"apiKeyFile": str(keys)}}, {"auth": {"apiKeyFile": str(keys)}},
                                  {"auth": {"apiKeyFile": str(other)}}, {"auth": {"apiKeyFile": str(keys)}}])
    assert answers[:2] == [None, None] and remembered == 1
    assert answers[2] is not None and answers[2][0] == 401, answers  # the head presents k, no longer a key
    assert answers[3] is None


def test_an_admission_remembered_by_its_head_ends_when_the_host_is_no_longer_served():
    head = HEAD.replace(b"Host: 127.0.0.1:8080", b"Host: models.example")
    answers, _ = judged([{"allowedHosts": ["models.example"]}, {"allowedHosts": ["models.example"]},
                         {"allowedHosts": []}], head)
    assert answers[:2] == [None, None]
    assert answers[2] is not None and answers[2][0] == 403, answers


def test_an_admission_remembered_by_its_head_ends_when_the_gateway_listens_elsewhere():
    """The same spec, the same keys: only the addresses the gateway listens on (whose names it serves) change."""
    head = HEAD.replace(b"Host: 127.0.0.1:8080", b"Host: box.lan:8080")
    answers, remembered = judged([{}, {}, "127.0.0.1:8080", {}], head, listen="box.lan:8080")
    assert answers[:2] == [None, None] and remembered == 0  # the rebind forgot it
    assert answers[2] is not None and answers[2][0] == 403, answers


def test_the_admin_api_is_judged_on_every_request():
    """Its admission depends on the peer's address too: never taken from the head."""
    from athanor.ollama.exchange import OllamaExchange

    answers, remembered = judged([{}, {}], target=b"/athanor/v1/apply")
    assert answers == [None, None] and remembered == 0  # a loopback peer, no admin key configured: not remembered
    assert OllamaExchange.head_key is None  # a stand-in whose route is not its head's is judged every time
