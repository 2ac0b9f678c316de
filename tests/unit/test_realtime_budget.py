"""The admission limit as a rate (streamasr.core.admission.RealTimeBudget, issue 26): while
the model windows sent on have spent what the limit's streams need at real time, a stream
running ahead of real time is closed if another stream is at real time; nobody else is
touched, and a file sent as fast as the server answers, alone, is never closed for it."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr import protocol
from streamasr.core import admission as adm
from streamasr.core.state import StreamError
from streamasr.pipeline import feature_extractor as fx

LIMIT = 2  # streams: 2 x 2.5 windows of 0.4 s per second
CHUNK_S = 0.4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _step(contract, clock, limit=LIMIT, **kw) -> fx.FeatureExtractorStep:
    return fx.FeatureExtractorStep(
        contract, 30.0, 10.0, 32, admission=adm.Admission(limit), clock=clock, **kw
    )


def _audio(contract, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * contract.sample_rate))).astype(np.float32)


def _send(step, sid: int, flags: int, audio: np.ndarray | None) -> fx.FeatureResult:
    return step.process(fx.FeatureRequest(sid, flags, audio, None, {}))


# -- the budget alone --------------------------------------------------------------------


def test_budget_refills_at_its_rate_up_to_its_burst_and_keeps_one_burst_of_debt():
    clock = FakeClock()
    budget = adm.RealTimeBudget(10.0, burst_s=0.5, clock=clock)  # 10 windows/s, burst 5
    assert not budget.spent()
    budget.spend(5)
    assert budget.spent()
    clock.now += 0.1  # +1 window
    assert not budget.spent()
    budget.spend(100)  # a flood: debt is kept to one burst (5), not 99
    clock.now += 0.5  # +5: back to zero, still spent
    assert budget.spent()
    clock.now += 0.1
    assert not budget.spent()
    clock.now += 60  # a long quiet time refills one burst only
    budget.spend(5)
    assert budget.spent()


def test_the_budget_is_the_limit_in_windows_and_none_without_a_limit():
    assert adm.RealTimeBudget.for_limit(None, CHUNK_S) is None
    budget = adm.RealTimeBudget.for_limit(26, CHUNK_S)
    assert budget is not None and budget.rate == pytest.approx(65.0)
    with pytest.raises(ValueError):
        adm.RealTimeBudget(0.0)


# -- the feature step --------------------------------------------------------------------


def _paced_and_fast(contract, clock, step, paced_s: float = 6.0):
    """A paced stream (1) and, from 1.2 s on, a stream sent as fast as possible (2): the
    paced stream's windows, and the fast stream's closure (or None)."""
    paced = _audio(contract, paced_s, seed=1)
    fast = _audio(contract, 40.0, seed=2)
    n = int(CHUNK_S * contract.sample_rate)
    windows, closed = [], None
    for k, i in enumerate(range(0, len(paced), n)):
        windows.append(_send(step, 1, fx.FLAG_START if i == 0 else 0, paced[i : i + n]).features)
        if k == 3:
            _send(step, 2, fx.FLAG_START, fast[:n])
        if k >= 3 and closed is None:
            for j in range(1, 6):  # five fast chunks per paced chunk
                try:
                    _send(step, 2, 0, fast[(5 * k + j) * n : (5 * k + j + 1) * n])
                except StreamError as exc:
                    closed = (str(exc), step.budget.spent() if step.budget else None)
                    break
        clock.now += CHUNK_S
    windows.append(_send(step, 1, fx.FLAG_END, None).features)
    return windows, closed


def test_a_fast_stream_is_closed_when_the_budget_is_spent_and_the_paced_one_is_untouched(
    contract,
):
    clock = FakeClock()
    step = _step(contract, clock)
    windows, closed = _paced_and_fast(contract, clock, step)
    assert closed is not None, "the fast stream was never closed"
    why, spent = closed
    assert spent, "closed while the budget was not spent"
    assert protocol.LEAD_MARKER in why and adm.LEAD_AT_CAPACITY_KEY in why
    assert f"its {LIMIT} streams" in why and protocol.OFFLINE_MODEL in why
    assert 2 not in step.store and step.lead_closed == 1
    with pytest.raises(StreamError) as later:  # its later requests say why
        _send(step, 2, fx.FLAG_END, _audio(contract, 0.1, seed=3))
    assert str(later.value) == why
    # the paced stream's windows are exactly those it gets alone
    alone_clock = FakeClock()
    alone = _step(contract, alone_clock)
    paced = _audio(contract, 6.0, seed=1)
    n = int(CHUNK_S * contract.sample_rate)
    expect = []
    for i in range(0, len(paced), n):
        expect.append(_send(alone, 1, fx.FLAG_START if i == 0 else 0, paced[i : i + n]).features)
        alone_clock.now += CHUNK_S
    expect.append(_send(alone, 1, fx.FLAG_END, None).features)
    assert len(windows) == len(expect)
    for got, want in zip(windows, expect):
        np.testing.assert_array_equal(got, want)


def test_without_the_check_or_without_a_limit_the_fast_stream_goes_on(contract):
    for kw in ({"max_lead_seconds_at_capacity": None}, {"limit": None}):
        clock = FakeClock()
        step = _step(contract, clock, **kw)
        _, closed = _paced_and_fast(contract, clock, step)
        assert closed is None and step.lead_closed == 0, kw


def test_fast_streams_alone_are_never_closed_for_it(contract):
    """Files sent as fast as the server answers, with nobody at real time: the budget is
    spent, but there is no one to protect."""
    clock = FakeClock()
    step = _step(contract, clock)
    n = int(CHUNK_S * contract.sample_rate)
    audio = _audio(contract, 20.0, seed=4)
    for sid in (1, 2):
        _send(step, sid, fx.FLAG_START, audio[:n])
    for i in range(n, len(audio), n):
        for sid in (1, 2):
            _send(step, sid, 0, audio[i : i + n])
        clock.now += 0.05  # 8x real time
    assert step.budget is not None and step.budget.spent()
    assert step.lead_closed == 0 and {1, 2} <= set(step.store.keys())


def test_a_stream_just_started_does_not_get_a_fast_one_closed(contract):
    """A new stream is not known to be paced until it has been open REALTIME_AFTER_S:
    a file streamed fast is not closed because another client just connected."""
    clock = FakeClock()
    step = _step(contract, clock)
    n = int(CHUNK_S * contract.sample_rate)
    fast = _audio(contract, 20.0, seed=5)
    _send(step, 1, fx.FLAG_START, fast[:n])
    for i in range(n, 10 * n, n):
        _send(step, 1, 0, fast[i : i + n])
    assert step.budget is not None and step.budget.spent()
    _send(step, 2, fx.FLAG_START, fast[:n])
    clock.now += 0.5 * adm.REALTIME_AFTER_S
    for i in range(10 * n, 20 * n, n):
        _send(step, 1, 0, fast[i : i + n])
    assert step.lead_closed == 0
    clock.now += adm.REALTIME_AFTER_S  # now stream 2 has been at real time long enough
    with pytest.raises(StreamError, match=protocol.LEAD_MARKER):
        for i in range(20 * n, 30 * n, n):
            _send(step, 1, 0, fast[i : i + n])
    assert step.lead_closed == 1 and 2 in step.store
