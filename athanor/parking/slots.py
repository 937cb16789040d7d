"""llama-server's slot API, as parking uses it: which slots hold a conversation, save one, restore one, erase one.

``GET /slots`` lists every slot; one that served a task and still holds its tokens reports them as
``n_prompt_tokens`` (its prompt and what it generated: what a save writes). A slot moved into the RAM prompt cache by
``--cache-idle-slots`` reports none, and so does a slot restored since the start and not used since (its file, kept,
is restored again next time). Only those are saved: saving an empty
slot has crashed llama-server (llama.cpp #14434). Each call carries the runtime's secret like any request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from athanor.addresses import authority
from athanor.runtimes.secret import secret_headers
from athanor.runtimes.launch import LaunchSpec


class SlotError(Exception):
    """The runtime refused or failed a slot action; the message is its own reason when it gave one."""


@dataclass(frozen=True)
class SlotResult:
    slot: int
    tokens: int  # n_saved / n_restored
    size: int  # n_written / n_read
    milliseconds: float


async def occupied(session: aiohttp.ClientSession, launch: LaunchSpec, timeout: float) -> list[tuple[int, int]]:
    """(slot id, prompt tokens) of every idle slot that holds a conversation."""
    body = await _call(session, "GET", launch, "/slots", None, timeout)
    if not isinstance(body, list):
        raise SlotError(f"GET /slots answered {type(body).__name__}, not a list")
    return [(int(s["id"]), int(s["n_prompt_tokens"])) for s in body
            if isinstance(s, dict) and int(s.get("n_prompt_tokens") or 0) > 0 and not s.get("is_processing")]


async def act(session: aiohttp.ClientSession, launch: LaunchSpec, slot: int, action: str, filename: str | None,
              timeout: float) -> SlotResult:
    """``POST /slots/{slot}?action=save|restore|erase``."""
    body = {"filename": filename} if filename is not None else {}
    answer = await _call(session, "POST", launch, f"/slots/{slot}?action={action}", body, timeout)
    if not isinstance(answer, dict):
        raise SlotError(f"{action} answered {type(answer).__name__}, not an object")
    timings = answer.get("timings") or {}
    return SlotResult(slot, int(answer.get(f"n_{action}d") or 0),  # n_saved, n_restored, n_erased
                      int(answer.get("n_written") or answer.get("n_read") or 0),
                      float(timings.get(f"{action}_ms") or 0.0))


async def _call(session: aiohttp.ClientSession, method: str, launch: LaunchSpec, path: str,
                body: dict[str, Any] | None, timeout: float) -> Any:
    try:
        async with session.request(method, f"http://{authority(launch.host, launch.port)}{path}", json=body,
                                   headers=secret_headers(launch.secret),
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise SlotError(f"HTTP {resp.status}: {_reason(text)}")
            return json.loads(text)
    except TimeoutError as exc:
        raise SlotError(f"no answer in {timeout:g} s") from exc
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise SlotError(f"{type(exc).__name__}: {exc}") from exc


def _reason(text: str) -> str:
    try:
        error = json.loads(text)["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return text[:200].strip() or "no details"
