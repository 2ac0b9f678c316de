"""One stream's backlog is bounded (issue 14): the server closes a stream whose audio runs
further ahead of real time than ``max_lead_seconds`` (no hole in anyone's audio, nobody
else disturbed), and AsrConnection keeps its sessions within that limit and within
``max_pending`` unanswered requests, so its own clients are never closed for it.

The server tests use a repository copy whose limit is ``LEAD_S`` seconds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from streamasr import protocol
from streamasr.core.state import StreamError
from streamasr.pipeline import feature_extractor as fx
from streamasr_client.stream import AsrError, Session

from ..helpers import ADMISSION_LIMIT, LEAD_S, finals_with_words, reference_messages


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _chunk(sid: int, flags: int, seconds: float, contract) -> fx.FeatureRequest:
    audio = np.zeros(int(seconds * contract.sample_rate), np.float32) if seconds else None
    return fx.FeatureRequest(sid, flags, audio, None, {})


# -- units (no server) ---------------------------------------------------------------------


def test_a_stream_running_ahead_of_real_time_is_closed_and_says_why(contract):
    clock = FakeClock()
    step = fx.FeatureExtractorStep(contract, 30.0, 10.0, 32, max_lead_seconds=LEAD_S, clock=clock)
    step.process(_chunk(1, fx.FLAG_START, 1.0, contract))
    step.process(_chunk(2, fx.FLAG_START, 1.0, contract))
    step.process(_chunk(1, 0, 2.0, contract))  # 3 s of audio at t=0: exactly at the limit
    with pytest.raises(StreamError, match=protocol.LEAD_MARKER) as closed:
        step.process(_chunk(1, 0, 0.5, contract))
    why = str(closed.value)
    assert f"{protocol.MAX_LEAD_PARAMETER} ({LEAD_S:g} s)" in why and "3.5 s" in why
    assert 1 not in step.store and step.lead_closed == 1
    # every later request of it, END included, gets the same reason (not "unknown stream")
    for flags in (0, fx.FLAG_END):
        with pytest.raises(StreamError) as later:
            step.process(_chunk(1, flags, 0.1, contract))
        assert str(later.value) == why
    # the other stream, sent at real time, goes on; 10 s later it may run 3 s ahead again
    for _ in range(10):
        clock.now += 1.0
        step.process(_chunk(2, 0, 1.0, contract))
    step.process(_chunk(2, 0, LEAD_S - 1.0, contract))
    step.process(_chunk(2, fx.FLAG_END, 0.0, contract))
    # the closed id can be started again, as a new stream
    step.process(_chunk(1, fx.FLAG_START, 1.0, contract))
    assert 1 in step.store and step.lead_closed == 1


def test_no_lead_limit_takes_any_amount_ahead(contract):
    step = fx.FeatureExtractorStep(
        contract, 30.0, 10.0, 32, max_lead_seconds=None, clock=FakeClock()
    )
    step.process(_chunk(1, fx.FLAG_START, 10.0, contract))
    for _ in range(30):
        step.process(_chunk(1, 0, 10.0, contract))
    assert step.lead_closed == 0


class _FakeConnection:
    """What a Session needs of its connection; answers never come."""

    model = protocol.STREAM_MODEL

    def __init__(self, max_pending: int | None, max_lead: float | None, pace: bool = True):
        self.max_pending = max_pending
        self.send_timeout_s = 0.2
        self.pace = pace
        self.max_lead = max_lead
        self.submitted: list = []

    def _check_size(self, req) -> None:
        pass

    def _submit(self, req) -> None:
        self.submitted.append(req)

    def _on_reader_thread(self) -> bool:
        return False

    def _pacing_rate(self) -> int | None:
        return 16000 if self.pace else None

    def max_lead_seconds(self) -> float | None:
        return self.max_lead


def test_a_session_waits_for_room_then_says_the_server_is_not_keeping_up():
    conn = _FakeConnection(max_pending=2, max_lead=None)
    s = Session(conn, 7, {})  # type: ignore[arg-type]
    s.send(np.zeros(160, np.float32))
    s.send(np.zeros(160, np.float32))
    with pytest.raises(AsrError, match=r"2 requests unanswered for 0.2 s \(limit 2\)"):
        s.send(np.zeros(160, np.float32))
    assert len(conn.submitted) == 2 and s.sent == 2
    s.close()  # a request without audio is not held back: END frees the server's state
    assert len(conn.submitted) == 3


def test_send_delay_keeps_a_session_within_the_servers_lead():
    conn = _FakeConnection(max_pending=None, max_lead=120.0)
    s = Session(conn, 7, {})  # type: ignore[arg-type]
    assert s.send_delay(16000) == 0.0  # nothing sent yet: the START is not held back
    s.send(np.zeros(16000 * 100, np.float32))  # 100 s at once
    # allowed: 120 - LEAD_MARGIN_S ahead; 20 s more is 5 s too far (less the time passed)
    assert 4.9 < s.send_delay(16000 * 20) <= 5.0
    assert s.send_delay(16000 * 15) == 0.0
    conn.max_lead = None  # no limit on the server
    assert s.send_delay(16000 * 1000) == 0.0
    conn.max_lead, conn.pace = 120.0, False  # pacing turned off
    assert s.send_delay(16000 * 1000) == 0.0


# -- a real server with a short lead -------------------------------------------------------


def test_server_closes_a_flooding_stream_and_keeps_its_neighbour_exact(
    lead_server, contract, onnx_session, demo_audio
):
    clip = demo_audio[: 8 * contract.sample_rate]
    expected = finals_with_words(reference_messages(contract, onnx_session, clip))
    chunk = contract.chunk_samples
    with (
        lead_server.connect(pace=False) as flood_conn,
        lead_server.connect() as conn,
    ):
        assert conn.max_lead_seconds() == LEAD_S  # read from the server's own config
        good = conn.open_session()
        flood = flood_conn.open_session()
        t0 = time.monotonic()
        for i in range(0, 4 * len(clip), chunk):  # 32 s of audio as fast as it goes
            flood.send(np.tile(clip, 4)[i : i + chunk])
            if i < len(clip):
                good.send(clip[i : i + chunk])
        flood.close()
        good.close()
        flood.wait(timeout=120)
        good.wait(timeout=120)
        elapsed = time.monotonic() - t0
    # the good stream was paced to the limit: it ran at most LEAD_S ahead of real time
    assert elapsed >= len(clip) / contract.sample_rate - LEAD_S
    assert good.errors == [] and finals_with_words(good.messages) == expected
    assert flood.errors, "the flooding stream was not closed"
    why = flood.errors[0]
    assert protocol.LEAD_MARKER in why and f"({LEAD_S:g} s)" in why
    assert all(e == why for e in flood.errors)  # every later request told the same reason
    # no results after the closure: nothing was taken after a refused chunk (no hole)
    first_error = next(i for i, m in enumerate(flood.messages) if m["type"] == "Error")
    assert all(m["type"] == "Error" for m in flood.messages[first_error:])


def test_a_paced_session_longer_than_the_lead_is_never_closed(
    lead_server, contract, onnx_session, demo_audio
):
    clip = demo_audio[: 6 * contract.sample_rate]
    expected = finals_with_words(reference_messages(contract, onnx_session, clip))
    with lead_server.connect() as conn:
        s = conn.open_session()
        for i in range(0, len(clip), contract.chunk_samples):
            s.send(clip[i : i + contract.chunk_samples])
        s.close()
        s.wait(timeout=120)
    assert s.errors == [] and finals_with_words(s.messages) == expected


# -- a real server at capacity (the admission limit as a rate, issue 26) -------------------


def _send_until_refused(session: Session, audio: np.ndarray, chunk: int) -> None:
    """A client sending a file as fast as the server answers, until it is told to stop."""
    for j in range(0, len(audio), chunk):
        if session.errors:
            return
        try:
            session.send(audio[j : j + chunk])
        except AsrError:
            return


def test_at_capacity_a_fast_stream_is_closed_and_the_real_time_one_stays_exact(
    limited_server, contract, onnx_session, demo_audio
):
    """Limit ADMISSION_LIMIT streams = that many seconds of model windows per second: a
    stream sent as fast as the server answers, beside one sent at real time, spends it
    and is closed past max_lead_seconds_at_capacity; the real-time one keeps its exact
    transcript.  (The same flood alone is never closed for it: tests/unit.)"""
    from streamasr.core import admission

    clip = demo_audio[: 5 * contract.sample_rate]
    expected = finals_with_words(reference_messages(contract, onnx_session, clip))
    chunk = contract.chunk_samples
    chunk_s = chunk / contract.sample_rate
    flood_audio = np.tile(clip, 8)  # 40 s
    with limited_server.connect() as conn, limited_server.connect(pace=False) as flood_conn:
        paced = conn.open_session()
        flood = None
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(clip), chunk)):
            # a live client: chunk k leaves once its audio has been spoken
            time.sleep(max(0.0, t0 + k * chunk_s - time.monotonic()))
            paced.send(clip[i : i + chunk])
            if flood is None and time.monotonic() - t0 > admission.REALTIME_AFTER_S + 0.5:
                flood = flood_conn.open_session()
                sender = threading.Thread(
                    target=_send_until_refused, args=(flood, flood_audio, chunk), daemon=True
                )
                sender.start()
        paced.close()
        paced.wait(timeout=60)
        assert flood is not None
        sender.join(timeout=60)
        flood.close()
        flood.wait(timeout=60)
    assert paced.errors == [] and finals_with_words(paced.messages) == expected
    assert flood.errors, "the fast stream was not closed"
    why = flood.errors[0]
    assert protocol.LEAD_MARKER in why and admission.LEAD_AT_CAPACITY_KEY in why
    assert f"its {ADMISSION_LIMIT} streams" in why
    # closed within a few seconds of its audio, long before max_lead_seconds (120 s)
    answered = sum(1 for m in flood.messages if m["type"] != "Error")
    assert answered * chunk_s < 20.0
