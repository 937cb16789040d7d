"""Runtime ports: allocated once, outside the ephemeral range, and a busy port is named rather than waited on."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from athanor.errors import AthanorError
from athanor.ports import DEFAULT_RANGE, allocate_port, port_holder, port_is_free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's ephemeral port range")
def test_default_range_lies_below_the_ephemeral_ports():
    """Outgoing connections take their source ports from the ephemeral range: a runtime port inside it can be
    taken at any moment (it happened: mlx_lm.server then failed to bind and hung without exiting)."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert DEFAULT_RANGE[1] < low
    assert DEFAULT_RANGE[1] < 49152, "below macOS's ephemeral range too"


def test_a_listening_port_is_busy_and_its_holder_named():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port, reuse_address=True)
        assert port_holder(port).startswith(f"pid {os.getpid()} (")
    assert port_is_free(port, reuse_address=True)


def test_a_stopped_server_s_time_wait_does_not_count_as_busy_for_a_runtime():
    """A runtime binds with SO_REUSEADDR, so the check it gets does too: a restart right after a stop must pass."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
        client.close()
    assert port_is_free(port, reuse_address=True)


def test_allocation_skips_held_and_busy_ports():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        with pytest.raises(AthanorError, match="widen spec.portRange"):
            allocate_port(set(), busy, busy)  # something else listens there
    with pytest.raises(AthanorError, match="1 held by models"):
        allocate_port({busy}, busy, busy)  # free now, but a model holds it
    assert allocate_port(set(), busy, busy) == busy
