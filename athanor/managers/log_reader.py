"""Following a runtime's log file: the text appended since the last read, across copytruncate rotations.

One reader serves both followers, the admin API's log stream (which calls it in a thread, off the loop) and
``athanor logs -f`` when no gateway runs, so the two cannot disagree about rotations or half-written characters.
A rotation (``logs.rotate``) empties the file in place: a file shorter than what was read was rotated, and reading
starts over at its beginning.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

from athanor.managers import logs

POLL_S = 0.25  # how often a follower looks at the file when nothing new was there
READ_LIMIT = 2**20  # bytes per read: a burst of log is sent in pieces, not held whole
_START_TRIES = 5


class LogReader:
    """New text of one log file, from where the last read ended. Not thread-safe: one reader, one follower."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        # A character split between two reads is decoded once its last byte is there; bad bytes become U+FFFD.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def start(self, lines: int) -> list[str]:
        """The last ``lines`` lines of the file as it is now, and reading goes on right after them: a line written
        meanwhile is neither lost nor shown twice. (The tail is read again if the file grew while it was read; a
        log that never pauses gets the risk of a line shown twice after a few tries.)"""
        for _ in range(_START_TRIES):
            before = self._size()
            head = logs.tail(self.path, lines)
            if self._size() == before:
                break
        self.offset = before
        return head

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self) -> str:
        """The text written since the last read ('' when nothing was); a missing file has none yet."""
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:  # rotated: emptied in place, then written again
                    self.offset = 0
                    self._decoder.reset()
                fh.seek(self.offset)
                data = fh.read(READ_LIMIT)
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        return self._decoder.decode(data)
