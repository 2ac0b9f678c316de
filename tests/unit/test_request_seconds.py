"""The per-request time histogram (streamasr.triton.backend.edge.RequestSeconds): counted
in the stub, published to Triton as Prometheus histogram series at most once a second
(one pb_utils call per request was the Python steps' top cost)."""

from __future__ import annotations

import sys
import types

import pytest


class FakeCounter:
    def __init__(self) -> None:
        self.value, self.calls = 0.0, 0

    def increment(self, delta: float) -> None:
        self.value += delta
        self.calls += 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def edge(monkeypatch):
    # the python backend's module exists only inside a Triton stub
    monkeypatch.setitem(
        sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils")
    )
    monkeypatch.delitem(sys.modules, "streamasr.triton.backend.edge", raising=False)
    import streamasr.triton.backend as backend
    import streamasr.triton.backend.edge as edge

    yield edge
    # leave no module bound to the stand-in behind
    sys.modules.pop("streamasr.triton.backend.edge", None)
    if getattr(backend, "edge", None) is edge:
        delattr(backend, "edge")


def test_buckets_are_cumulative_and_published_once_per_interval(edge):
    clock = FakeClock()
    buckets = [FakeCounter() for _ in edge.RequestSeconds.LE]
    count, total = FakeCounter(), FakeCounter()
    h = edge.RequestSeconds(buckets, count, total, publish_every_s=1.0, clock=clock)
    h.observe([0.0005, 0.01, 0.3, 9.0])  # le 0.001; le 0.01 (its bound); le 0.5; +Inf only
    assert all(b.calls == 0 for b in buckets) and count.calls == 0  # not yet a second
    clock.now += 1.0
    h.observe([0.002])
    le = dict(zip(edge.RequestSeconds.LE, (b.value for b in buckets)))
    assert le["0.001"] == 1 and le["0.0025"] == 2 and le["0.01"] == 3 and le["0.025"] == 3
    assert le["0.25"] == 3 and le["0.5"] == 4 and le["2.5"] == 4 and le["+Inf"] == 5
    assert count.value == 5 and total.value == pytest.approx(9.3125)
    calls = sum(b.calls for b in buckets) + count.calls + total.calls
    clock.now += 0.5
    h.observe([0.002] * 1000)  # a thousand requests within the interval: no call
    assert sum(b.calls for b in buckets) + count.calls + total.calls == calls
    clock.now += 0.5
    h.observe([])
    assert count.value == 1005 and dict(zip(edge.RequestSeconds.LE, buckets))["0.001"].value == 1
    # only the buckets that changed were sent: 0.0025 and above, plus count and sum
    assert sum(b.calls for b in buckets) + count.calls + total.calls - calls == 11 + 2
