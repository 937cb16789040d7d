"""How often an idle admin stream (the event stream, a followed log) says it is still there, and how long the CLI
waits for a byte of one before it calls the stream dead. Both ends read this one setting, so they agree.

A heartbeat keeps a quiet stream open through proxies that close idle connections, lets the gateway notice a
client that went away (the write fails), and lets a client tell a quiet gateway from a dead one. The interval is
15 s; ``ATHANOR_HEARTBEAT_S`` changes it (for a proxy with a shorter idle limit, and for tests). Stdlib only: the
CLI imports it.
"""

from __future__ import annotations

import math
import os

from athanor.errors import InvalidValueError

HEARTBEAT_ENV = "ATHANOR_HEARTBEAT_S"
DEFAULT_INTERVAL_S = 15.0
MISSED_BEATS = 4  # a client gives up on a stream after this many heartbeats in a row did not come
MIN_READ_TIMEOUT_S = 30.0  # ... but never sooner: a short interval must not make a busy machine look dead
MAX_INTERVAL_S = 3600.0


def interval() -> float:
    """Seconds between heartbeats of an idle stream."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_INTERVAL_S:  # also false for nan
        raise InvalidValueError(f"{HEARTBEAT_ENV}={raw!r}: expected the seconds between heartbeats, a number more "
                                f"than 0 and at most {MAX_INTERVAL_S:.0f}")
    return value


def read_timeout() -> float:
    """Seconds a client waits for the next byte of a stream (data or heartbeat) before it gives the stream up."""
    return max(MISSED_BEATS * interval(), MIN_READ_TIMEOUT_S)
