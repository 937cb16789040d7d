"""How often a starting runtime is probed: no fixed floor, a share of the time waited, sparse for long loads."""

from __future__ import annotations

from athanor.controller.readiness import FIRST_DELAY, MAX_DELAY, RELATIVE_DELAY, poll_delay


def test_a_fast_runtime_is_probed_every_few_milliseconds() -> None:
    assert poll_delay(0.0) == FIRST_DELAY <= 0.005
    assert poll_delay(0.05) == FIRST_DELAY


def test_the_delay_stays_a_small_share_of_the_time_waited() -> None:
    for waited in (0.5, 2.0, 10.0, 40.0):
        assert poll_delay(waited) == waited * RELATIVE_DELAY <= waited * 0.02


def test_a_model_that_loads_for_minutes_is_probed_sparsely() -> None:
    assert poll_delay(300.0) == MAX_DELAY >= 1.0



def test_a_runtime_at_an_ipv6_address_is_probed_and_proxied_to(tmp_path) -> None:
    """A pod's address may be IPv6 (a dual-stack cluster): the readiness probe and the upstream pool reach a real
    llama-server listening on ::1, with the brackets its Host header needs."""
    import asyncio
    import socket
    import subprocess
    import time

    from fixtures.tiny_models import write_tiny_llama_gguf

    from athanor.controller.readiness import health_status
    from athanor.ingress.upstream import UpstreamPool
    from athanor.runtimes.launch import find_runtime

    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    server = subprocess.Popen([find_runtime("llama-server"), "-m", str(model), "--host", "::1", "--port", str(port),
                               "-t", "1", "-c", "256"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def scenario() -> tuple[int, bytes]:
        deadline = time.monotonic() + 60
        while await health_status("::1", port, "/health", None, 5) != 200:
            assert server.poll() is None and time.monotonic() < deadline, "llama-server did not come up on ::1"
            await asyncio.sleep(0.05)  # polling a condition with a deadline
        pool = UpstreamPool()
        try:
            async with pool.request(port, "POST", "/v1/completions", [("Content-Type", "application/json")],
                                    b'{"prompt": "hi", "max_tokens": 1}', host="::1") as response:
                return response.status, await response.read()
        finally:
            pool.close()

    try:
        answered, body = asyncio.run(scenario())
    finally:
        server.kill()
        server.wait(30)
    assert answered == 200 and b'"choices"' in body, body
