"""One client must never hurt another (issue 12), against a REAL tritonserver: stream ids
of another type, requests lost in flight, out-of-order parking in the decoder, and a
broken shared gRPC stream.  Each attack runs beside a bystander stream whose finals must
equal a whole-file decode."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from streamasr_client.stream import AsrError

from ..helpers import (
    PARKED_PER_STREAM,
    PARKED_TOTAL,
    REORDER_TIMEOUT_S,
    Bystander,
    f32,
    finals_with_words,
    metric,
    publish_metrics,
    raw_request,
    reference_messages,
)


@pytest.fixture
def iconn(iso_server):
    c = iso_server.connect()
    yield c
    c.close()


@pytest.fixture(scope="module")
def audio(demo_audio, contract):
    return demo_audio[: 12 * contract.sample_rate]


@pytest.fixture(scope="module")
def expected(contract, onnx_session, audio):
    return finals_with_words(reference_messages(contract, onnx_session, audio))


# -- 2. stream ids -----------------------------------------------------------------------
def test_string_id_of_a_live_stream_cannot_replace_it(iso_server, iconn, contract, audio, expected):
    live = Bystander(iconn, contract, audio, expected)
    live.s.wait()  # its START has been served: integer id N is live
    with iso_server.connect() as other:
        dup = other.open_session()
        raw_request(
            dup,
            [f32(np.zeros(contract.chunk_samples))],
            start=True,
            sequence_id=str(live.s.sequence_id),
        )
        dup.wait()
        assert len(dup.errors) == 1 and "already open" in dup.errors[0], dup.errors
    live.finish()  # the victim's transcript is whole


@pytest.mark.parametrize("bad_id", ["abc", "-5", "0x10", " 7", str(2**64)])
def test_invalid_string_id_is_refused_clearly_and_keeps_no_state(iso_server, iconn, bad_id):
    publish_metrics(iso_server)
    before = metric(iso_server, "streamasr_open_streams", iso_server.model("feature_extractor"))
    s = iconn.open_session()
    raw_request(s, [f32(np.zeros(1600))], start=True, sequence_id=bad_id)
    s.wait()
    assert len(s.errors) == 1, s.errors
    assert "sequence id" in s.errors[0] and repr(bad_id) in s.errors[0], s.errors[0]
    assert "invalid literal" not in s.errors[0]
    publish_metrics(iso_server)
    assert (
        metric(iso_server, "streamasr_open_streams", iso_server.model("feature_extractor"))
        == before
    )


# -- 3 + 4. the decoder's reorder buffer, called directly ----------------------------------
class Decoder:
    """Direct requests to ``ctc_decoder`` (its STEP_INFO is client input too)."""

    def __init__(self, server, contract):
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.model = server.model("ctc_decoder")
        self.c = contract
        self.frames = contract.chunk_frames // contract.subsampling

    def send(self, stream: int, seq: int, windows: int = 1, end: bool = False):
        lp = np.full((windows, self.frames, len(self.c.vocabulary)), -20.0, np.float32)
        lp[:, :, self.c.blank_id] = 0.0
        info = {
            "stream": stream,
            "seq": seq,
            "start": seq == 0,
            "end": end,
            "windows": windows,
            "valid_outputs": [self.frames] * windows,
        }
        inputs = [
            grpcclient.InferInput("LOG_PROBS", list(lp.shape), "FP32"),
            grpcclient.InferInput("STEP_INFO", [1], "BYTES"),
        ]
        inputs[0].set_data_from_numpy(lp)
        inputs[1].set_data_from_numpy(np.array([json.dumps(info).encode()], np.object_))
        try:
            r = self.client.infer(self.model, inputs)
        except grpcclient.InferenceServerException as exc:
            return None, exc.message()
        return [json.loads(m) for m in r.as_numpy("RESULTS")], None

    def bytes_per_window(self) -> int:
        return self.frames * len(self.c.vocabulary) * 4


def test_a_lost_request_fails_the_stream_loudly_instead_of_answering_empty(iso_server, contract):
    d = Decoder(iso_server, contract)
    sid = 7_000_000_001
    assert d.send(sid, 0)[1] is None
    # request 1 is "lost" (cancelled between steps); the next ones overtake it and wait
    assert d.send(sid, 2) == ([], None)
    assert d.send(sid, 3) == ([], None)
    time.sleep(REORDER_TIMEOUT_S + 0.5)  # waiting out the configured reorder timeout
    msgs, err = d.send(sid, 4)
    assert err is not None and "request 1 " in err and str(sid) in err, (msgs, err)
    msgs, err = d.send(sid, 5, end=True)  # END too: never "OK, empty"
    assert err is not None and "request 1 " in err, (msgs, err)


def test_parking_is_bounded_per_stream_and_in_total(iso_server, iconn, contract, audio, expected):
    bystander = Bystander(iconn, contract, audio, expected)
    d = Decoder(iso_server, contract)
    # a request of ~300 kB, parked behind a gap at seq 1
    windows = (300 << 10) // d.bytes_per_window()
    size = windows * d.bytes_per_window()
    sid = 7_000_000_100
    assert d.send(sid, 0)[1] is None
    errors = []
    for seq in range(2, 2 + PARKED_PER_STREAM // size + 2):
        _, err = d.send(sid, seq, windows)
        if err:
            errors.append((seq, err))
    assert errors, "a stream parked more than its byte budget"
    first_seq, first = errors[0]
    assert (first_seq - 2) * size <= PARKED_PER_STREAM and "parked" in first, errors
    # many streams each under their own budget: the total budget holds
    refused = []
    for k in range(PARKED_TOTAL // (3 * size) + 2):
        s = 7_000_000_200 + k
        assert d.send(s, 0)[1] is None
        for seq in (2, 3, 4):
            _, err = d.send(s, seq, windows)
            if err:
                refused.append(err)
    assert refused and all("parked" in e for e in refused), refused
    bystander.finish()


# -- 1. a broken shared gRPC stream ------------------------------------------------------
def test_broken_stream_fails_only_sessions_with_requests_in_flight(
    iso_server, contract, audio, expected
):
    conn = iso_server.connect()
    try:
        good = [Bystander(conn, contract, audio, expected) for _ in range(2)]
        for b in good:
            b.s.wait(timeout=180)  # nothing of theirs in flight
        busy = conn.open_session()
        # 100 s of audio: seconds of model work, so requests are surely still in flight
        # when the stream breaks (with 30 x 1 s a fast server had answered them all)
        for _ in range(10):
            busy.send(np.zeros(10 * contract.sample_rate, np.float32))
        assert busy.pending > 0
        conn.cancel_stream()  # the shared stream breaks under them
        with pytest.raises(AsrError, match="in flight"):
            busy.wait(timeout=30)
        with pytest.raises(AsrError):
            busy.send(np.zeros(160, np.float32))
        for b in good:  # carried on over a new stream, exactly
            b.finish()
    finally:
        conn.close()


def test_oversized_request_is_refused_without_breaking_the_stream(
    iso_server, contract, audio, expected
):
    conn = iso_server.connect(max_message_bytes=1 << 20)
    try:
        good = Bystander(conn, contract, audio, expected)
        bad = conn.open_session()
        with pytest.raises(AsrError, match="larger than"):
            bad.send(np.zeros(1 << 20, np.float32))
        good.finish()
    finally:
        conn.close()
