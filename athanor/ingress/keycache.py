"""The keys of one Gateway spec, for the request path: re-read when the spec or a key file changes, the files
looked at at most once a second (``RECHECK_S``). What keys are and where they come from: ``athanor/auth.py``.

Apart from ``auth.py`` so that it can be compiled with the rest of the request path (``athanor/native.py``):
every request asks whether the keys are fresh.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Final

from athanor.auth import Keys, load

_monotonic: Final = time.monotonic  # compiled, a C static: ``time.monotonic`` is a module lookup per call

log = logging.getLogger("athanor.auth")

RECHECK_S: Final = 1.0  # how often a key file's mtime is looked at: a rotated key counts within a second


class KeyCache:
    """The keys of one Gateway spec, re-read when a key file changes (checked at most once a second)."""

    def __init__(self) -> None:
        self._auth: dict[str, Any] | None = None
        self._stamp: object = None
        self._checked = 0.0
        self.api = Keys()
        self.admin = Keys()
        self.read_only = Keys()  # admin keys that grant GETs only

    def refresh(self, auth: dict[str, Any]) -> None:
        now = _monotonic()
        if auth is self._auth and now - self._checked < RECHECK_S:
            return
        self._checked = now
        stamp = (repr(sorted(auth.items())),
                 *(_mtime(auth.get(k)) for k in ("apiKeyFile", "adminKeyFile", "readOnlyKeyFile")))
        if auth is self._auth and stamp == self._stamp:
            return
        self._auth, self._stamp = auth, stamp
        self.api, self.admin, self.read_only = load(auth, "api"), load(auth, "admin"), load(auth, "readOnly")
        for keys in (self.api, self.admin, self.read_only):
            if keys.problem:  # the client is told only that keys cannot be checked: the why is for the log
                log.error("every request that needs this key is refused: %s", keys.problem)


def _mtime(file: str | None) -> object:
    if not file:
        return None
    try:
        st = Path(file).expanduser().stat()
    except OSError as exc:
        return exc.errno
    return (st.st_ino, st.st_mtime_ns, st.st_size)
