"""Abandoned streams (no END) are reclaimed after the idle timeout: Triton never tells a
model about them, so the steps sweep their own state by TTL."""
from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import pytest

from .conftest import copy_repository, start_server

TTL_S = 2.0
TRITON_IDLE_US = 10_000_000


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("short_ttl")
    repo = copy_repository(
        root / "repo",
        {"feature_extractor": {"stream_idle_timeout_s": str(TTL_S)},
         "ctc_decoder": {"stream_idle_timeout_s": str(TTL_S)}},
        idle_us={"feature_extractor": TRITON_IDLE_US})
    srv = start_server(repo, root / "tritonserver.log")
    yield srv
    srv.stop()


def metric(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(
        f"http://{server.config.host}:{server.config.metrics_port}/metrics", timeout=10
    ).read().decode()
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
    assert m, f"{name} for {model} not in metrics"
    return float(m.group(1))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_abandoned_streams_are_reclaimed_and_then_told_expired(short_ttl_server):
    from streamasr_client.stream import AsrConnection

    n = 20
    with AsrConnection(short_ttl_server.grpc_url) as conn:
        rate = conn.contract().sample_rate
        sessions = [conn.open_session() for _ in range(n)]
        for s in sessions:
            s.send(np.zeros(rate // 2, np.float32))
        for s in sessions:
            s.wait()
            assert s.errors == []
        for model in ("feature_extractor", "ctc_decoder"):
            assert metric(short_ttl_server, "streamasr_open_streams", model) == n
        # Swept on the steps' timers with no traffic at all; the metrics are published
        # when a model next runs, so one new stream makes both steps report.
        time.sleep(2 * TTL_S)
        probe = conn.open_session()
        probe.send(np.zeros(rate // 2, np.float32))
        probe.wait()
        assert probe.errors == []
        for model in ("feature_extractor", "ctc_decoder"):
            assert metric(short_ttl_server, "streamasr_open_streams", model) == 1
            assert metric(short_ttl_server, "streamasr_reclaimed_streams_total", model) >= n
        # Still inside Triton's own idle window: our step answers "expired".
        late = sessions[0]
        late.send(np.zeros(rate // 2, np.float32))
        late.wait()
        assert len(late.errors) == 1 and "expired" in late.errors[0], late.errors


def test_keepalive_keeps_a_silent_stream_open(short_ttl_server):
    from streamasr_client.stream import AsrConnection

    with AsrConnection(short_ttl_server.grpc_url) as conn:
        rate = conn.contract().sample_rate
        kept = conn.open_session()
        dropped = conn.open_session()
        for s in (kept, dropped):
            s.send(np.zeros(rate // 4, np.float32))
        deadline = time.monotonic() + 3 * TTL_S        # well past the TTL, in Triton's window
        while time.monotonic() < deadline:
            kept.keepalive()
            time.sleep(TTL_S / 4)
        for s in (kept, dropped):
            s.send(np.zeros(rate // 4, np.float32))
            s.wait()
        assert kept.errors == []
        assert len(dropped.errors) == 1 and "expired" in dropped.errors[0]
        kept.close()
        kept.wait()
        assert kept.errors == []
