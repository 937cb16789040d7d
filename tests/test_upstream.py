"""The lean upstream client against real sockets: every framing a runtime uses, and every way a runtime fails.

The servers here are raw asyncio servers speaking bytes on loopback, so each test controls exactly what the
"runtime" sends and when it hangs up. The real runtimes are exercised through the gateway in test_serving.py.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from athanor.ingress.upstream import (
    BUFFER_HIGH,
    UpstreamClosed,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


def run(handler: Handler, scenario: Callable[[UpstreamPool, int], Awaitable[object]], **settings: Any) -> object:
    async def main() -> object:
        handlers: set[asyncio.Task[None]] = set()

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            await handler(reader, writer)

        server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        pool = UpstreamPool(**settings)
        try:
            return await scenario(pool, server.sockets[0].getsockname()[1])
        finally:
            pool.close()  # the handlers see EOF and finish
            if handlers:
                await asyncio.wait(handlers, timeout=10)
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


async def get(pool: UpstreamPool, port: int, body: bytes = b"{}") -> tuple[int, str, bytes]:
    async with pool.request(port, "POST", "/v1/x?y=1", [("Authorization", "Bearer k")], body) as resp:
        return resp.status, resp.content_type, await resp.read()


def test_content_length_responses_reuse_one_connection():
    connections: list[int] = []
    seen: list[bytes] = []

    async def handler(reader, writer):
        connections.append(1)
        while not reader.at_eof():
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            seen.append(head + body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            await writer.drain()
        writer.close()

    async def scenario(pool, port):
        return [await get(pool, port, b'{"n": %d}' % i) for i in range(3)]

    results = run(handler, scenario)
    assert results == [(200, "application/json", b'{"n": %d}' % i) for i in range(3)]
    assert len(connections) == 1, "keep-alive: one connection for three requests"
    assert seen[0].startswith(b"POST /v1/x?y=1 HTTP/1.1\r\n") and b"Authorization: Bearer k\r\n" in seen[0]
    assert b"Content-Length: 8\r\n" in seen[0]


async def never_called() -> None:
    raise AssertionError("the sink never asked to wait")


def test_chunked_stream_arrives_chunk_by_chunk():
    release = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"8\r\ndata: 1\n\r\n")
        await writer.drain()
        await release.wait()  # the second event only after the client has seen the first
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()

    async def scenario(pool, port):
        got = []

        def sink(chunk: bytes) -> bool:
            got.append(chunk)
            release.set()
            return True

        async with pool.request(port, "POST", "/", [], b"") as resp:
            await resp.relay(sink, never_called)
        return resp.content_type, got

    content_type, chunks = run(handler, scenario)
    assert content_type == "text/event-stream" and chunks == [b"data: 1\n", b"data: 2\n"]


def test_close_delimited_body_is_complete_at_eof_and_says_so():
    """mlx_lm.server answers HTTP/1.0 style: no length, the body ends with the connection."""
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: a\n\ndata: b\n\n")
        await writer.drain()
        writer.close()

    async def scenario(pool, port):
        async with pool.request(port, "POST", "/", [], b"") as resp:
            return resp.close_delimited, await resp.read()

    assert run(handler, scenario) == (True, b"data: a\n\ndata: b\n\n")


@pytest.mark.parametrize("cut", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",         # fewer bytes than announced
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",  # no terminating chunk
    b"HTTP/1.1 200 OK\r\nContent-Le",                                    # headers cut off
    b"",                                                                # nothing at all on a fresh connection
])
def test_a_runtime_dying_mid_response_is_upstream_closed(cut):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(cut)
        await writer.drain()
        writer.transport.abort()

    async def scenario(pool, port):
        with pytest.raises(UpstreamClosed):
            await get(pool, port)
        return True

    assert run(handler, scenario)


def test_garbage_is_upstream_closed():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()

    async def scenario(pool, port):
        with pytest.raises(UpstreamClosed, match="invalid HTTP"):
            await get(pool, port)
        return True

    assert run(handler, scenario)


def echo_until_eof(connections: list[Any], mark: Any = 1) -> Handler:
    """A runtime that answers every request on a connection until the gateway hangs up; each connection adds
    ``mark`` to ``connections``."""
    async def handler(reader, writer):
        connections.append(mark)
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    return handler


def test_a_kept_alive_connection_the_runtime_dropped_while_idle_is_not_used():
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()  # kept alive by the headers, then dropped while idle (a keep-alive timeout)

    async def scenario(pool, port):
        return [await get(pool, port, b"one"), await get(pool, port, b"two")]

    assert run(handler, scenario) == [(200, "", b"one"), (200, "", b"two")]
    assert len(connections) == 2


def read_request_blocking(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += conn.recv(65536)
    return rest


def test_a_drop_that_reached_the_socket_but_not_yet_the_event_loop_is_seen_before_writing():
    """The race of a runtime closing an idle connection just as it is reused: its end of stream is in the socket,
    but the event loop has not read it. Writing the request there would leave it unanswered, and a close before
    any answer cannot be retried (it looks like a runtime that died of the request). The pool must see it first."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    drop = threading.Event()
    served: list[bytes] = []

    def runtime() -> None:  # a thread: it closes the connection while the event loop is blocked
        first, _ = listener.accept()
        served.append(read_request_blocking(first))
        first.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        drop.wait(10)
        first.close()
        second, _ = listener.accept()
        with second:
            served.append(read_request_blocking(second))
            second.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
            second.recv(1)  # until the gateway hangs up

    thread = threading.Thread(target=runtime, daemon=True)
    thread.start()

    async def scenario() -> list[tuple[int, str, bytes]]:
        pool = UpstreamPool()
        try:
            results = [await get(pool, port, b"1")]
            idle = pool._runtimes[("127.0.0.1", port)].idle[0]
            drop.set()
            # Block the event loop until the end of stream is in the socket: the loop cannot have read it.
            readable, _, _ = select.select([idle.transport.get_extra_info("socket").fileno()], [], [], 10)
            assert readable and not idle.closed
            results.append(await get(pool, port, b"2"))
            return results
        finally:
            pool.close()

    try:
        assert asyncio.run(scenario()) == [(200, "", b"one"), (200, "", b"two")]
        assert served == [b"1", b"2"]
    finally:
        thread.join(10)
        listener.close()


def test_a_connection_idle_longer_than_the_reuse_limit_is_not_reused():
    """Runtimes close idle connections on a timer of their own (llama-server after 5 s): the pool lets go of
    them first, so a request never meets that close."""
    connections: list[int] = []

    async def scenario(pool, port):
        return [await get(pool, port, b"one"), await get(pool, port, b"two")]

    assert run(echo_until_eof(connections), scenario, reuse_idle_s=0) == [(200, "", b"one"), (200, "", b"two")]
    assert len(connections) == 2


@pytest.mark.parametrize("hang_up", ["close", "abort"])
def test_a_request_the_runtime_read_on_a_kept_alive_connection_is_never_sent_twice(hang_up):
    """The runtime read the request and died of it (close: the kernel's FIN; abort: a reset). From the gateway
    this looks like an idle drop, but it was not: the request fails once, and is not sent again."""
    requests: list[bytes] = []

    async def handler(reader, writer):
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            requests.append(body)
            if body == b"fatal":
                getattr(writer.transport, hang_up)()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def scenario(pool, port):
        assert await get(pool, port, b"fine") == (200, "", b"fine")
        with pytest.raises(UpstreamClosed) as failure:
            await get(pool, port, b"fatal")
        return requests, str(failure.value)

    requests, message = run(handler, scenario)
    assert requests == [b"fine", b"fatal"], "the request the runtime had read was sent again"
    assert "without answering" in message


def test_nothing_listening_is_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused

        async def scenario():
            pool = UpstreamPool()
            with pytest.raises(UpstreamUnreachable, match=f"127.0.0.1:{port}"):
                await get(pool, port)

        asyncio.run(scenario())


def test_leaving_early_closes_the_connection_so_the_runtime_stops():
    closed = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # returns at EOF: the gateway hung up
        closed.set()

    async def scenario(pool, port):
        first = asyncio.Event()

        async def stream() -> None:
            async with pool.request(port, "POST", "/", [], b"") as resp:
                await resp.relay(lambda chunk: first.set() or True, never_called)

        streaming = asyncio.ensure_future(stream())
        await first.wait()
        streaming.cancel()  # a client that went away after the first token: its handler is cancelled
        with pytest.raises(asyncio.CancelledError):
            await streaming
        await asyncio.wait_for(closed.wait(), 10)
        return True

    assert run(handler, scenario)


def test_a_slow_reader_pauses_the_runtime_instead_of_buffering_everything():
    total = BUFFER_HIGH * 16
    sent = [0]

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"x" * 65536
        while sent[0] < total:
            writer.write(block)
            await writer.drain()  # blocks once the gateway stops reading and the socket buffers fill
            sent[0] += len(block)

    async def scenario(pool, port):
        async with pool.request(port, "POST", "/", [], b"") as resp:
            connection = resp._connection
            deadline = asyncio.get_running_loop().time() + 10
            while not connection._paused:  # nobody reads: the client must stop reading from the runtime
                assert asyncio.get_running_loop().time() < deadline, "reading never paused"
                await asyncio.sleep(0.01)
            buffered_at_pause = connection._buffered
            body = await resp.read()
        return buffered_at_pause, len(body), sent[0]

    buffered, received, sent_total = run(handler, scenario)
    assert BUFFER_HIGH < buffered < BUFFER_HIGH + 2**20, "paused just past the high-water mark"
    assert received == sent_total == total, "and resumed: the whole body arrives"


def test_a_relay_whose_reader_lags_pauses_the_runtime_until_it_drained():
    """A streamed body goes to its sink as it comes; a sink whose client cannot take more stops the reading from
    the runtime (which then blocks in its own writes) until the client drained."""
    total = BUFFER_HIGH * 16
    block = b"x" * 65536

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(total // len(block)):
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def scenario(pool, port):
        received = [0]
        lagging = [True]
        at_drain: list[tuple[bool, int]] = []  # (reading paused, bytes handed over while the client lagged)

        def sink(chunk: bytes) -> bool:
            received[0] += len(chunk)
            return not lagging[0]

        async with pool.request(port, "POST", "/", [], b"") as resp:
            connection = resp._connection

            async def drain() -> None:
                before = received[0]
                for _ in range(50):  # loop turns in which a connection still read would be handed more
                    await asyncio.sleep(0)
                at_drain.append((connection.held, received[0] - before))
                lagging[0] = False  # the client caught up

            await resp.relay(sink, drain)
        return at_drain, received[0], connection.held

    at_drain, received, held_after = run(handler, scenario)
    assert at_drain and at_drain[0] == (True, 0), "reading from the runtime was paused while the client lagged"
    assert received == total and not held_after, "and resumed: the whole body arrived"


def test_a_stream_that_ends_while_its_reader_lags_leaves_its_connection_reading_for_the_next_request():
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")  # the whole stream in one write, kept alive
            await writer.drain()

    async def scenario(pool, port):
        got: list[bytes] = []

        async def drain() -> None:
            pass  # the client caught up at once

        async with pool.request(port, "POST", "/", [], b"") as resp:
            await resp.relay(lambda chunk: got.append(chunk) or False, drain)  # a client that always lags
        return got, await asyncio.wait_for(get(pool, port, b"next"), 10)

    got, answer = run(handler, scenario)
    assert got == [b"one", b"two"] and answer == (200, "", b"onetwo")
    assert connections == [1], "the second request went on the same connection, which was read again"


def test_header_bytes_a_client_sent_reach_the_runtime_unchanged():
    """aiohttp hands the gateway header values decoded as UTF-8 with surrogateescape, invalid bytes included."""
    seen: list[bytes] = []

    async def handler(reader, writer):
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def scenario(pool, port):
        value = b"caf\xc3\xa9 \xff".decode("utf-8", "surrogateescape")
        async with pool.request(port, "POST", "/", [("X-Note", value)], b"") as resp:
            return resp.status, await resp.read()

    assert run(handler, scenario) == (204, b"")
    assert b"X-Note: caf\xc3\xa9 \xff\r\n" in seen[0]


def test_a_client_gone_before_the_answer_closes_the_connection():
    """Cancelled while the runtime works on the request (no header yet): the connection is closed, so the runtime
    stops generating for nobody, and its place is free again."""
    asked = asyncio.Event()
    hung_up = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        asked.set()  # the runtime works on it and never answers
        await reader.read()
        hung_up.set()

    async def scenario(pool, port):
        call = asyncio.ensure_future(get(pool, port, b"two"))
        await asyncio.wait_for(asked.wait(), 10)
        call.cancel()  # the client went away
        await asyncio.wait_for(hung_up.wait(), 10)
        return pool._runtimes[("127.0.0.1", port)].open

    assert run(handler, scenario) == 0


def test_at_most_limit_connections_and_the_rest_wait_in_order():
    gate = asyncio.Event()
    two_arrived = asyncio.Event()
    open_now = [0]
    most = [0]
    arrived: list[bytes] = []
    order: list[bytes] = []

    async def handler(reader, writer):
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            while True:
                try:
                    _, body = await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                arrived.append(body)
                if len(arrived) == 2:
                    two_arrived.set()
                await gate.wait()
                order.append(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        finally:
            open_now[0] -= 1

    async def scenario(pool, port):
        async def one(i):
            async with pool.request(port, "POST", "/", [], b"%d" % i, limit=2) as resp:
                return await resp.read()

        calls = [asyncio.ensure_future(one(i)) for i in range(8)]  # tasks start, and queue, in this order
        await asyncio.wait_for(two_arrived.wait(), 10)
        gate.set()
        return await asyncio.gather(*calls)

    assert run(handler, scenario) == [b"%d" % i for i in range(8)]
    assert most[0] == 2 and len(arrived) == 8
    assert order[2:] == [b"%d" % i for i in range(2, 8)], "the waiting requests went out in order"


def test_a_runtime_that_sends_nothing_times_out():
    async def handler(reader, writer):
        await read_request(reader)
        await reader.read()  # never answers; returns when the client hangs up

    async def scenario(port):
        pool = UpstreamPool(idle_timeout=0.2)
        try:
            with pytest.raises(UpstreamTimeout, match="sent nothing for 0.2 s"):
                await get(pool, port)
        finally:
            pool.close()

    async def main():
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with server:
            await scenario(server.sockets[0].getsockname()[1])

    asyncio.run(main())


def test_a_new_runtime_on_the_same_port_gets_new_connections():
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def scenario(pool, port):
        for incarnation in (1, 1, 2):
            async with pool.request(port, "POST", "/", [], b"x", incarnation=incarnation) as resp:
                await resp.read()
        return len(connections)

    assert run(handler, scenario) == 2


def test_a_request_whose_kept_alive_connection_was_dropped_keeps_its_place():
    served: list[bytes] = []
    first = [True]

    async def handler(reader, writer):
        dropping = first[0]
        first[0] = False
        while True:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            served.append(body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if dropping:  # the first connection is dropped once idle
                writer.close()
                return

    async def scenario(pool, port):
        async def one(body):
            async with pool.request(port, "POST", "/", [], body, limit=1) as resp:
                return await resp.read()

        await one(b"one")
        two = asyncio.ensure_future(one(b"two"))  # finds the kept-alive connection dropped: opens one in its place
        three = asyncio.ensure_future(one(b"three"))  # waits: the limit is one connection
        return await asyncio.gather(two, three)

    assert run(handler, scenario) == [b"two", b"three"]
    assert served == [b"one", b"two", b"three"], "the request on a new connection went before the one queued behind it"


def test_a_runtime_s_socket_is_used_and_a_missing_one_falls_back_to_its_port(tmp_path):
    """Where the runtime also listens on a Unix socket the pool connects there; a socket that is gone (its file
    removed under a running runtime) does not fail the request: the port serves the same."""
    seen: list[str] = []
    path = str(tmp_path / "rt.sock")

    async def scenario(pool, port):
        unix = await asyncio.start_unix_server(echo_until_eof(seen, "socket"), path)
        try:
            async with pool.request(port, "POST", "/v1/x", [], b"one", socket=path) as resp:
                first = await resp.read()
            pool.close()
            gone = UpstreamPool()  # a fresh pool: it must connect anew
            try:
                missing = str(tmp_path / "gone.sock")
                async with gone.request(port, "POST", "/v1/x", [], b"two", socket=missing) as resp:
                    second = await resp.read()
                async with gone.request(port, "POST", "/v1/x", [], b"three", socket=missing) as resp:
                    third = await resp.read()
            finally:
                gone.close()
            return first, second, third
        finally:
            unix.close()
            await unix.wait_closed()

    assert run(echo_until_eof(seen, "port"), scenario) == (b"one", b"two", b"three")
    assert seen == ["socket", "port"], "one connection each: the socket's, then the port's kept alive"


def closes_after(limit: int, connections: list[int]) -> Handler:
    """A runtime that keeps a connection alive for ``limit`` requests and ends it after the last one's answer, as
    cpp-httplib does (llama-server: 100); ``limit=1`` ends every connection after its answer (an HTTP/1.0
    server). Each connection adds 1 to ``connections``."""
    async def handler(reader, writer):
        connections.append(1)
        for served in range(1, limit + 1):
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            last = b"Connection: close\r\n" if served == limit else b""
            writer.write(b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%s" % (last, len(body), body))
            await writer.drain()
        writer.close()

    return handler


def test_a_connection_the_runtime_ends_at_its_request_limit_is_replaced_before_the_next_request():
    """The next request finds a connection open and waiting (the callbacks' fast lane takes only such), instead
    of waiting for one to be made."""
    connections: list[int] = []

    async def scenario(pool, port):
        answers = [await get(pool, port, b"%d" % i) for i in range(3)]
        await pool.settled()
        assert len(connections) == 2, "the runtime ended the first connection, and one was opened in its place"
        taken = pool.take_idle(port, "POST", "/v1/x", [], b"4")
        assert taken is not None, "the next request needs no connection made first"
        connection, head = taken
        assert connection.exchanges == 0
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        connection.send_now(head, b"4", None, lambda c: done.set_result(b"".join(c.take_all())))
        answers.append(await done)
        pool.finish_now(connection)
        return answers, len(connections)

    answers, opened = run(closes_after(3, connections), scenario)
    assert answers == [(200, "", b"0"), (200, "", b"1"), (200, "", b"2"), b"4"]
    assert opened == 2, "the connection opened ahead carried the fourth request"


def test_a_connection_the_runtime_ends_after_an_event_stream_is_replaced():
    """llama-server's streams say Keep-Alive, and then it ends the connection: the next request finds another."""
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nKeep-Alive: timeout=5, max=100\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario(pool, port):
        async with pool.request(port, "POST", "/v1/x", [], b"{}") as resp:
            streamed = await resp.read()
        await pool.settled()
        taken = pool.take_idle(port, "POST", "/v1/x", [], b"{}")
        if taken is not None:
            pool.finish_now(taken[0])  # unused: closed
        return streamed, len(connections), taken is not None

    assert run(handler, scenario) == (b"data: 1\n\ndata: [DONE]\n\n", 2, True)


def test_no_connection_is_opened_ahead_for_a_runtime_that_ends_every_connection():
    """An HTTP/1.0-style server may serve one connection at a time: an idle one opened ahead would hold it."""
    connections: list[int] = []

    async def scenario(pool, port):
        answers = []
        for i in range(3):
            answers.append(await get(pool, port, b"%d" % i))
            await pool.settled()
            assert len(connections) == i + 1, "a connection per request, opened by the request"
        return answers

    assert run(closes_after(1, connections), scenario) == [(200, "", b"0"), (200, "", b"1"), (200, "", b"2")]


def test_a_connection_ended_by_a_failed_answer_is_not_replaced():
    """Only an answer the runtime completed and then ended its connection after counts: a runtime that breaks
    off an answer may be dying, and the next request finds out for itself."""
    connections: list[int] = []

    async def handler(reader, writer):
        connections.append(1)
        for cut in (False, True):
            await read_request(reader)
            if cut:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # and hangs up
                await writer.drain()
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def scenario(pool, port):
        assert await get(pool, port) == (200, "", b"ok")
        with pytest.raises(UpstreamClosed):
            await get(pool, port)
        await pool.settled()
        return len(connections)

    assert run(handler, scenario) == 1


def test_a_connection_closed_because_its_client_left_is_not_replaced():
    """The fast lane closes the runtime's connection when its client leaves before the answer: the gateway ended
    that one, not the runtime."""
    connections: list[int] = []
    held = asyncio.Event()

    async def handler(reader, writer):
        connections.append(1)
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await read_request(reader)  # and never answers
        held.set()
        await reader.read()

    async def scenario(pool, port):
        assert await get(pool, port, b"one") == (200, "", b"one")
        taken = pool.take_idle(port, "POST", "/v1/x", [], b"two")
        assert taken is not None
        connection, head = taken
        connection.send_now(head, b"two", None, lambda c: None)
        await held.wait()
        pool.finish_now(connection)  # its client went away
        await pool.settled()
        return len(connections), connection.closed

    assert run(handler, scenario) == (1, True)


def test_a_real_llama_server_s_hundredth_request_and_its_streams_leave_a_connection_open(llama_server, tmp_path):
    """llama-server ends a kept-alive connection after 100 requests (cpp-httplib's limit), and every connection
    after an event stream."""
    from fixtures.tiny_models import write_tiny_llama_gguf

    _, url, _ = llama_server(write_tiny_llama_gguf(tmp_path / "m.gguf", context_length=256))
    port = int(url.rsplit(":", 1)[1])

    async def main() -> tuple[list[int], int]:
        pool = UpstreamPool()
        try:
            statuses = []
            for _ in range(100):
                async with pool.request(port, "GET", "/health", [], b"") as resp:
                    await resp.read()
                    statuses.append(resp.status)
            await pool.settled()
            taken = pool.take_idle(port, "GET", "/health", [], b"")
            assert taken is not None, "a connection open and waiting after the runtime ended the first"
            connection, _ = taken
            assert connection.exchanges == 0, "opened in place of the one the runtime ended"
            pool.finish_now(connection)  # unused: closed
            stream = b'{"prompt": "hi", "max_tokens": 2, "stream": true}'
            async with pool.request(port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                                    stream) as resp:
                events = await resp.read()
                statuses.append(resp.status)
            assert events.rstrip().endswith(b"data: [DONE]"), events
            await pool.settled()
            taken = pool.take_idle(port, "GET", "/health", [], b"")
            assert taken is not None, "a connection open and waiting after the runtime ended the stream's"
            connection, _ = taken
            assert connection.exchanges == 0
            pool.finish_now(connection)
            return statuses, pool._runtimes[("127.0.0.1", port)].open
        finally:
            pool.close()

    statuses, still_open = asyncio.run(main())
    assert statuses == [200] * 101
    assert still_open == 0
