"""Streamed completions as a client sees them: time to the first token and tokens per second.

The tokens of a stream are the runtime's own count (``usage.completion_tokens`` of its last chunk; a chunk count
where there is none: llama-server holds back the bytes of an incomplete UTF-8 character, so chunks can be fewer
than tokens); the first token is the first chunk with a choice. ``ignore_eos`` makes every stream run to
``max_tokens``, so both sides generate the same work.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Streamed:
    ttft: float  # seconds to the first token
    tokens: int
    elapsed: float  # seconds to the end of the stream


def body(model: str, tokens: int) -> dict[str, object]:
    return {"model": model, "prompt": "hi", "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}


async def stream_once(session: aiohttp.ClientSession, url: str, request: dict[str, object],
                      headers: dict[str, str] | None = None) -> Streamed:
    started = time.perf_counter()
    first = 0.0
    chunks = 0
    usage = None
    async with session.post(url, json=request, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.read())[:300]!r}")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                chunks += 1
                if not first:
                    first = time.perf_counter() - started
    tokens = usage if usage is not None else chunks
    return Streamed(first, tokens, time.perf_counter() - started)


@dataclass(frozen=True)
class Burst:
    streams: int
    tokens: int  # counted, all streams
    wall: float  # seconds from the first request to the end of the last stream
    ttfts: tuple[float, ...]  # seconds, one per stream

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    @property
    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts)


async def burst(session: aiohttp.ClientSession, url: str, request: dict[str, object], streams: int,
                headers: dict[str, str] | None = None) -> Burst:
    """``streams`` concurrent streams; RuntimeError if one fails or comes back short (the runtime's slots or
    context could not hold it)."""
    started = time.perf_counter()
    try:
        results = await asyncio.gather(*(stream_once(session, url, request, headers) for _ in range(streams)))
    except aiohttp.ClientError as exc:
        raise RuntimeError(f"{url}: {streams} concurrent streams: {exc!r}") from exc
    wall = time.perf_counter() - started
    expected = request["max_tokens"]
    short = [r.tokens for r in results if r.tokens != expected]
    if short:
        raise RuntimeError(f"{url}: {len(short)} of {len(results)} streams were not {expected} tokens: {short[:5]}")
    return Burst(streams, sum(r.tokens for r in results), wall, tuple(r.ttft for r in results))


def combined(bursts: list[Burst]) -> Burst:
    """Bursts run one after another as one: their tokens over their summed wall time, all their first tokens."""
    return Burst(bursts[0].streams, sum(b.tokens for b in bursts), sum(b.wall for b in bursts),
                 tuple(t for b in bursts for t in b.ttfts))
