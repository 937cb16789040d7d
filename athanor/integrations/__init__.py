"""Clients kept in step with the gateway: what they all need to know about it, and one module per client.

Every client reaches the gateway the same way: its address (``gateway_url``) and, when the Gateway's ``auth``
names one, a key that clients read from where the gateway reads it (``KeySource``). A key is never copied into
a client's file or printed: clients are told where to find it.

    pi.py    pi, the terminal coding agent: an ``athanor`` provider in pi's models.json (``athanor sync pi``)
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any

from athanor import catalog


def gateway_url(doc: dict[str, Any]) -> str:
    """``http://host:port`` a client on this machine uses: a wildcard listen address becomes loopback."""
    from athanor.addresses import authority, loopback_for, parse_listen

    host, port = parse_listen(catalog.gateway_spec(doc)["listen"])
    return f"http://{authority(loopback_for(host) or host, port)}"


@dataclass(frozen=True)
class KeySource:
    """Where a client finds a key the gateway accepts: an environment variable, or the first key in a file (one
    per line, ``#`` comments and blank lines skipped). ``env`` wins when the Gateway names both."""

    env: str | None = None
    file: str | None = None

    def shell(self) -> str:
        """A POSIX shell expansion of the key, to write inside double quotes."""
        if self.env:
            return f"${self.env}"
        return f"$({self.file_command()})"

    def file_command(self) -> str:
        """A POSIX shell command printing the file's first key (BSD and GNU sed alike)."""
        assert self.file is not None
        return (r"sed -n -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' -e 's/^[[:space:]]*//' "
                rf"-e 's/[[:space:]]*$//' -e p -e q {shlex.quote(self.file)}")


def key_source(doc: dict[str, Any]) -> KeySource | None:
    """Where clients read the gateway's key, or None when the gateway asks for none."""
    auth = catalog.gateway_spec(doc).get("auth") or {}
    if auth.get("apiKeyEnv"):
        return KeySource(env=auth["apiKeyEnv"])
    if auth.get("apiKeyFile"):
        return KeySource(file=os.path.abspath(os.path.expanduser(auth["apiKeyFile"])))
    return None
