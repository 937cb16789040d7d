"""Bearer keys for the ingress and the admin API, read from where the Gateway spec points, never from the spec.

``spec.auth`` names files (one key per line, ``#`` comments) or environment variables of the gateway's process.
Three kinds: API keys (the OpenAI routes), admin keys (the whole admin API) and read-only admin keys (its GETs).
Keys configured but unreadable fail closed: every request is refused, rather than the gateway quietly serving
without the protection its user asked for. The reason, which names the file, goes to the gateway's log, once per
change of the key configuration (``ingress/keycache.py``); a client, who may not have presented any key yet,
learns only that the keys cannot be checked, never the gateway's paths. The CLI reads the admin key the same way,
so ``athanor start`` works wherever the key file is readable by its user.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

@dataclass(frozen=True)
class Keys:
    """The keys of one kind (api, admin or readOnly). ``problem``: why configured keys could not be read (fail
    closed)."""

    keys: frozenset[str] = frozenset()
    configured: bool = False
    problem: str | None = None

    def admits(self, presented: str | None) -> bool:
        if not self.configured:
            return True
        if presented is None or self.problem is not None:
            return False
        candidate = _as_bytes(presented)
        found = False
        for key in self.keys:  # compare with every key, in constant time each: no early exit to time
            found |= hmac.compare_digest(candidate, _as_bytes(key))
        return found


def _as_bytes(text: str) -> bytes:
    """``text`` as bytes for a comparison, whatever it holds. A header with bytes that are not UTF-8 arrives with
    them as lone surrogates (as does such a variable from the environment), which a plain ``encode()`` refuses;
    ``surrogatepass`` encodes every string, and distinct strings to distinct bytes."""
    return text.encode("utf-8", "surrogatepass")


def _read_file(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def load(auth: dict[str, Any], kind: str) -> Keys:
    """``kind`` "api", "admin" or "readOnly": the keys ``auth.<kind>KeyFile`` and ``auth.<kind>KeyEnv`` name."""
    file, env = auth.get(f"{kind}KeyFile"), auth.get(f"{kind}KeyEnv")
    if not file and not env:
        return Keys()
    keys: set[str] = set()
    problems = []
    if file:
        path = Path(file).expanduser()
        try:
            keys |= _read_file(path)
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"the {kind} key file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}")
        else:
            if not keys:
                problems.append(f"the {kind} key file {path} holds no key")
    if env:
        value = os.environ.get(env, "").strip()
        if value:
            keys.add(value)
        elif not file:
            problems.append(f"the environment variable {env} (auth.{kind}KeyEnv) is not set for the gateway")
    if keys:
        problems = []  # one readable source is enough
    return Keys(frozenset(keys), True, "; ".join(problems) or None)


def presented(headers: Any) -> str | None:
    """The key a request presents: ``Authorization: Bearer KEY`` (OpenAI clients) or ``x-api-key: KEY``
    (Anthropic clients)."""
    value = headers.get("Authorization")
    if value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return headers.get("x-api-key")


def admin_key_for_cli(auth: dict[str, Any]) -> str | None:
    """The key the CLI presents to the admin API (the first readable one), or None when none is configured."""
    keys = load(auth, "admin")
    return min(keys.keys) if keys.keys else None
