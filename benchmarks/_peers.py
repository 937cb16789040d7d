"""The peers athanor is measured against, on the same llama-server binary and the same tiny GGUFs.

- direct: llama-server started by the benchmark with the exact command line athanor gave its own runtime (its
  flags, a key file and a slot directory of its own), on another port: the limit every proxy is a ratio of;
- router: llama.cpp's router mode, the same binary with ``--models-dir DIR --models-max 1`` and the same flags
  for its instances (without the key and the slot directory, which are athanor's own);
- LiteLLM's proxy: ``_litellm.py``.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _gateway import free_port, stop_group, wait_answering

# Flags athanor sets per start that name this model or this start: replaced or dropped for a peer.
_PER_START = {"--model", "--alias", "--host", "--port", "--api-key-file", "--slot-save-path"}


@dataclass(frozen=True)
class Direct:
    url: str  # http://127.0.0.1:PORT
    pid: int
    key: str = field(repr=False)  # the runtime answers this bearer alone, as athanor's does its secret

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def shared_flags(argv_line: str) -> list[str]:
    """The llama-server flags of athanor's command line ``argv_line`` (its runtime's start line) that do not
    name the model or the start: context, batch, slots, threads, HTTP threads, flash attention, GPU layers."""
    argv = shlex.split(argv_line)[1:]
    flags: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _PER_START:
            skip = True
        else:
            flags.append(arg)
    return flags


@contextlib.contextmanager
def direct_server(binary: str, gguf: Path, alias: str, flags: list[str], workdir: Path) -> Iterator[Direct]:
    """llama-server on ``gguf`` with athanor's ``flags``, its own key file and slot directory, under ``workdir``;
    its process group is stopped at the end."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    key_file = workdir / f"{alias}.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    (workdir / "slots").mkdir(exist_ok=True)
    port = free_port()
    argv = [binary, "--model", str(gguf), "--alias", alias, "--host", "127.0.0.1", "--port", str(port), *flags,
            "--api-key-file", str(key_file), "--slot-save-path", str(workdir / "slots")]
    with open(workdir / f"{alias}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(url + "/health", proc, f"the direct llama-server ({alias})", timeout=60)
        yield Direct(url, proc.pid, key)
    finally:
        stop_group(proc)
