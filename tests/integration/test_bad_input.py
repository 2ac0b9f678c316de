"""Bad input gets a clear error for that stream only: a bystander stream streaming at the
same time over the same gRPC stream keeps its exact transcript, and a stream that sent
one bad chunk keeps its state."""

from __future__ import annotations

import numpy as np
import pytest

from ..helpers import f32, finals_with_words, raw_request, reference_messages

BAD_FIRST_REQUESTS = {
    "wrong dtype": ([("AUDIO", "FP64", [4], np.zeros(4).tobytes())], "data-type"),
    "wrong rank": ([("AUDIO", "FP32", [2, 4], np.zeros(8, np.float32).tobytes())], "shape"),
    "NaN": ([f32([0.0, np.nan, 0.1])], "NaN"),
    "inf": ([f32([0.0, np.inf])], "NaN or infinite"),
    "empty chunk": ([f32([])], "empty audio chunk"),
    "sample-rate mismatch": (
        [f32(np.zeros(160)), ("SAMPLE_RATE", "INT32", [1], np.array([8000], np.int32).tobytes())],
        "does not match the model's 16000 Hz",
    ),
    "both audio inputs": (
        [f32(np.zeros(160)), ("AUDIO_INT16", "INT16", [160], np.zeros(160, np.int16).tobytes())],
        "not both",
    ),
    "giant chunk": ([f32(np.zeros(16000 * 11))], "exceeds the limit"),
}


@pytest.fixture
def bystander(conn, contract, onnx_session, demo_audio):
    """A good stream that is half sent; finish() completes it and checks its transcript."""
    s = conn.open_session()
    chunk = contract.chunk_samples
    half = (len(demo_audio) // 2) // chunk * chunk
    for i in range(0, half, chunk):
        s.send(demo_audio[i : i + chunk])
    expected = finals_with_words(reference_messages(contract, onnx_session, demo_audio))

    def finish():
        for i in range(half, len(demo_audio), chunk):
            s.send(demo_audio[i : i + chunk])
        s.close()
        s.wait(timeout=120)
        assert s.errors == []
        assert finals_with_words(s.messages) == expected

    return finish


@pytest.mark.parametrize("case", sorted(BAD_FIRST_REQUESTS))
def test_bad_first_request_is_rejected_clearly_and_harms_no_one(conn, bystander, case):
    inputs, expected_text = BAD_FIRST_REQUESTS[case]
    bad = conn.open_session()
    raw_request(bad, inputs, start=True)
    bad.wait()
    assert len(bad.errors) == 1
    assert expected_text.lower() in bad.errors[0].lower(), bad.errors[0]
    bystander()


def test_bad_chunk_mid_stream_keeps_the_stream_state(
    conn, contract, onnx_session, demo_audio, bystander
):
    s = conn.open_session()
    chunk = contract.chunk_samples
    for n, i in enumerate(range(0, len(demo_audio), chunk)):
        if n == 3:
            raw_request(s, [f32([np.nan] * 10)], start=False)
            raw_request(
                s, [("AUDIO", "FP32", [2, 2], np.zeros(4, np.float32).tobytes())], start=False
            )
        s.send(demo_audio[i : i + chunk])
    s.close()
    s.wait(timeout=120)
    assert len(s.errors) == 2
    assert finals_with_words(s.messages) == finals_with_words(
        reference_messages(contract, onnx_session, demo_audio)
    )
    bystander()


def test_first_request_without_start_is_rejected(conn, bystander):
    s = conn.open_session()
    raw_request(s, [f32(np.zeros(1600))], start=False)
    s.wait()
    assert len(s.errors) == 1 and "START" in s.errors[0]
    bystander()


def test_zero_sequence_id_is_rejected(conn, bystander):
    s = conn.open_session()
    raw_request(s, [f32(np.zeros(1600))], start=True, sequence_id=0)
    s.wait()
    assert len(s.errors) == 1 and "correlation ID" in s.errors[0], s.errors
    bystander()


def test_unknown_stream_option_is_rejected_at_start(conn, bystander):
    """The client library refuses it before sending; a raw gRPC client that sends it
    anyway is refused by the server, naming it."""
    with pytest.raises(ValueError, match="no_such_option"):
        conn.open_session({"no_such_option": "1"})
    s = conn.open_session()
    raw_request(s, [f32(np.zeros(1600))], start=True, params={"no_such_option": "1"})
    s.wait()
    assert len(s.errors) == 1 and "no_such_option" in s.errors[0]
    bystander()
