"""Admission's live guard (streamasr.core.admission.QueueDelayGuard, issue 26): new
streams are refused while the measured queue delay is over its bound."""

from __future__ import annotations

import pytest

from streamasr.core import admission as adm


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_refuses_while_a_recent_delay_is_over_the_bound_and_admits_after_the_window():
    clock = FakeClock()
    guard = adm.QueueDelayGuard(bound_s=0.5, window_s=5.0, clock=clock)
    assert guard.refusal() is None and guard.delay() == 0.0  # nothing measured yet
    guard.observe(0.1)
    assert not guard.over()
    clock.now += 1
    guard.observe(0.9)
    msg = guard.refusal()
    assert msg is not None and msg.startswith(adm.CAPACITY_MARKER)
    assert "900 ms" in msg and "500 ms bound" in msg
    clock.now += 2
    guard.observe(0.05)  # a fast probe does not hide a slow one in the same window
    assert guard.over()
    clock.now += 4  # the 0.9 s measurement is now older than the window
    assert not guard.over() and guard.refusal() is None


def test_a_probe_still_in_flight_counts_with_its_age():
    clock = FakeClock()
    guard = adm.QueueDelayGuard(bound_s=0.5, clock=clock)
    guard.probe_started(clock.now)
    clock.now += 0.4
    assert not guard.over()
    clock.now += 0.2
    assert guard.over(), "unanswered for 0.6 s: the queue is at least that long"
    guard.probe_started(None)
    assert not guard.over()


def test_from_env_bound_off_and_bad_values():
    assert adm.QueueDelayGuard.from_env({}).bound_s == adm.QUEUE_DELAY_BOUND_S
    assert adm.QueueDelayGuard.from_env({adm.ENV_QUEUE_DELAY: "1.5"}).bound_s == 1.5
    assert adm.QueueDelayGuard.from_env({adm.ENV_QUEUE_DELAY: "0"}) is None  # off
    for bad in ("soon", "-1"):
        with pytest.raises(ValueError, match=adm.ENV_QUEUE_DELAY):
            adm.QueueDelayGuard.from_env({adm.ENV_QUEUE_DELAY: bad})
    with pytest.raises(ValueError, match="must be > 0"):
        adm.QueueDelayGuard(bound_s=0)
