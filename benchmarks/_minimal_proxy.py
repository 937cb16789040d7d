"""The least a reverse proxy written in Python can cost on athanor's stack: a reference, not a product.

    python benchmarks/_minimal_proxy.py LISTEN_PORT UPSTREAM_PORT

uvloop, llhttp (``httptools``) both ways, kept-alive upstream connections, and nothing else: no task per request
(everything happens in the protocols' callbacks), no JSON, no routing, no metrics, no error handling beyond
dropping a connection the runtime closed. A request's header lines go on as they came (less Host, framing and
Connection), so a client's Authorization reaches the runtime. It makes the same four socket system calls per
request as the gateway (read the request, write it on, read the answer, write it back).

What it shows: the gateway's CPU per request against this is the price of everything athanor does per request
(the admission guard, the model's name from the body, leases, metrics, telemetry, retries, the coroutines),
where the issue's minimal aiohttp app, which proxies nothing, mixes that price with the cost of proxying itself.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

REQUEST_SKIP = (b"host", b"content-length", b"connection", b"transfer-encoding")
RESPONSE_SKIP = (b"content-length", b"connection", b"keep-alive", b"transfer-encoding")


class Upstream(asyncio.Protocol):
    """One kept-alive connection to the runtime, carrying one request at a time."""

    def __init__(self, idle: list[Upstream]):
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.lines: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)
        if self.client is not None:  # it died with a request on it: the client's connection ends too
            self.client.close()

    def send(self, client: Client, data: bytes) -> None:
        assert self.transport is not None
        self.client, self.lines, self.body = client, [], []
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in RESPONSE_SKIP:
            self.lines.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if self.parser.should_keep_alive():
            self.idle.append(self)
        elif self.transport is not None:
            self.transport.close()
        if client is not None:
            client.answer(self.parser.get_status_code(), b"".join(self.lines), b"".join(self.body))


class Client(asyncio.Protocol):
    """One client connection; each complete request goes out on an idle upstream connection, or a new one."""

    def __init__(self, upstream_port: int, idle: list[Upstream]):
        self.upstream_port, self.idle = upstream_port, idle
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.lines: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.lines, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in REQUEST_SKIP:
            self.lines.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        data = b"%b %b HTTP/1.1\r\nHost: 127.0.0.1\r\n%bContent-Length: %d\r\n\r\n%b" % (
            self.parser.get_method(), self.url, b"".join(self.lines), len(body), body)
        while self.idle:
            upstream = self.idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                upstream.send(self, data)
                return
        asyncio.ensure_future(self._connect(data))

    async def _connect(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(self.idle), "127.0.0.1", self.upstream_port)
        upstream.send(self, data)

    def answer(self, status: int, lines: bytes, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %d X\r\n%bContent-Length: %d\r\n\r\n%b" % (status, lines, len(body), body))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def main(listen_port: int, upstream_port: int) -> None:
    idle: list[Upstream] = []
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(upstream_port, idle), "127.0.0.1", listen_port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
