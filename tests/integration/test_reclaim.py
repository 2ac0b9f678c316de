"""Abandoned streams (no END) are reclaimed after the idle timeout: Triton never tells a
model about them, so the steps sweep their own state by TTL."""

from __future__ import annotations

import time

import numpy as np

from ..helpers import TTL_S, all_reclaimed, metric, poll, reclaimed_now


def test_abandoned_streams_are_reclaimed_and_then_told_expired(short_ttl_server):

    n = 20
    # The server is shared: start from nothing open, count reclaims from here.
    since = reclaimed_now(short_ttl_server)
    poll(
        lambda: all_reclaimed(short_ttl_server, since, 0),
        10 * TTL_S,
        "streams of earlier tests to be reclaimed",
    )
    since = reclaimed_now(short_ttl_server)
    with short_ttl_server.connect() as conn:
        rate = conn.contract().sample_rate
        sessions = [conn.open_session() for _ in range(n)]
        for s in sessions:
            s.send(np.zeros(rate // 2, np.float32))
        for s in sessions:
            s.wait()
            assert s.errors == []
        for model in ("feature_extractor", "ctc_decoder"):
            assert (
                metric(short_ttl_server, "streamasr_open_streams", short_ttl_server.model(model))
                == n
            )
        # Swept on the steps' timers with no traffic at all; the metrics are published
        # when a model next runs, so a one-request stream makes both steps report.
        poll(
            lambda: all_reclaimed(short_ttl_server, since, n),
            10 * TTL_S,
            "the abandoned streams to be reclaimed",
        )
        probe = conn.open_session()
        probe.send(np.zeros(rate // 2, np.float32))
        probe.wait()
        assert probe.errors == []
        for model in ("feature_extractor", "ctc_decoder"):
            assert (
                metric(short_ttl_server, "streamasr_open_streams", short_ttl_server.model(model))
                == 1
            )
            assert (
                metric(
                    short_ttl_server,
                    "streamasr_reclaimed_streams_total",
                    short_ttl_server.model(model),
                )
                - since[model]
                >= n
            )
        # Still inside Triton's own idle window: our step answers "expired".
        late = sessions[0]
        late.send(np.zeros(rate // 2, np.float32))
        late.wait()
        assert len(late.errors) == 1 and "expired" in late.errors[0], late.errors


def test_keepalive_keeps_a_silent_stream_open(short_ttl_server):

    with short_ttl_server.connect() as conn:
        rate = conn.contract().sample_rate
        kept = conn.open_session()
        dropped = conn.open_session()
        for s in (kept, dropped):
            s.send(np.zeros(rate // 4, np.float32))
        deadline = time.monotonic() + 3 * TTL_S  # well past the TTL, in Triton's window
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
