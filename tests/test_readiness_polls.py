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
