"""Voice-activity endpointing (streamasr/core/vad.py): endpoints where the speaker
stopped, the same however a stream is cut, flushed at once, and streamed = offline."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr.core.decoding import EndpointConfig, StreamDecoder
from streamasr.core.features import FeatureStream, join_windows, whole_file_windows
from streamasr.core.state import StreamError
from streamasr.core.vad import FRAME_SAMPLES, VAD_SAMPLE_RATE, VadEndpointer, silence_frames
from streamasr.pipeline.feature_extractor import stream_vad

#: demo.wav: five sentences, four pauses of 1.8-2.0 s between them (assets/demo.txt).
DEMO_PAUSES = 4
ENDPOINT_MS = 300


def cuts(n: int, seed: int, sizes=(320, 1600, 6400, 7000)) -> list[tuple[int, int]]:
    """Uneven request boundaries over n samples: 20 ms, 100 ms, a chunk, odd sizes."""
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < n:
        step = int(rng.choice(sizes)) + int(rng.integers(0, 3))
        out.append((i, min(n, i + step)))
        i += step
    return out


def test_endpoints_fall_in_the_pauses_and_ignore_how_the_audio_is_cut(demo_audio):
    whole = VadEndpointer(ENDPOINT_MS).accept(demo_audio)
    assert len(whole) == DEMO_PAUSES
    assert all(e % FRAME_SAMPLES == 0 for e in whole)
    for seed in range(3):
        v = VadEndpointer(ENDPOINT_MS)
        streamed = [e for a, b in cuts(len(demo_audio), seed) for e in v.accept(demo_audio[a:b])]
        assert streamed == whole
    # each endpoint follows silence: the audio just before it is quieter than speech
    rms = float(np.sqrt(np.mean(demo_audio**2)))
    for e in whole:
        quiet = demo_audio[e - silence_frames(ENDPOINT_MS) * FRAME_SAMPLES + FRAME_SAMPLES : e]
        assert float(np.sqrt(np.mean(quiet**2))) < rms / 3


def test_a_longer_endpointing_waits_longer_and_silence_alone_never_ends_anything(demo_audio):
    short = VadEndpointer(ENDPOINT_MS).accept(demo_audio)
    longer = VadEndpointer(1000).accept(demo_audio)
    assert len(longer) == len(short)
    for a, b in zip(short, longer):
        assert b - a == pytest.approx(0.7 * VAD_SAMPLE_RATE, abs=2 * FRAME_SAMPLES)
    assert VadEndpointer(ENDPOINT_MS).accept(np.zeros(5 * VAD_SAMPLE_RATE, np.float32)) == []


def test_windows_with_endpoints_are_the_same_streamed_or_whole(contract, demo_audio):
    whole = whole_file_windows(contract, demo_audio, VadEndpointer(ENDPOINT_MS))
    assert len(whole.endpoints) == DEMO_PAUSES
    plain = whole_file_windows(contract, demo_audio)
    # the flushes add short windows: every output frame is still there exactly once
    assert int(whole.valid_outputs.sum()) == int(plain.valid_outputs.sum())
    assert whole.count > plain.count
    for seed in range(2):
        fs = FeatureStream(contract, VadEndpointer(ENDPOINT_MS))
        parts = [fs.accept(demo_audio[a:b]) for a, b in cuts(len(demo_audio), seed)]
        streamed = join_windows([*parts, fs.finish()])
        assert streamed.endpoints == whole.endpoints
        assert np.array_equal(streamed.valid_outputs, whole.valid_outputs)
        assert np.array_equal(streamed.features, whole.features)


def test_an_endpoint_is_flushed_in_the_request_that_completes_it(contract, demo_audio):
    """The request whose audio completes the endpoint's VAD frame carries every output
    frame up to the endpoint: nothing waits for the next chunk's right context."""
    fs = FeatureStream(contract, VadEndpointer(ENDPOINT_MS))
    step = contract.sample_rate // 50  # 20 ms requests
    outputs = 0
    for i in range(0, len(demo_audio), step):
        w = fs.accept(demo_audio[i : i + step])
        outputs += int(w.valid_outputs.sum())
        for e in w.endpoints:
            assert e == outputs  # every frame before the endpoint is out
            end_sample = e * contract.subsampling * contract.features.hop_length
            assert i + step - end_sample < contract.features.n_fft + FRAME_SAMPLES


def test_the_decoder_finalizes_at_each_endpoint(contract, onnx_session, demo_audio):
    w = whole_file_windows(contract, demo_audio, VadEndpointer(ENDPOINT_MS))
    lp = w.stream_log_probs(
        onnx_session.run([contract.output_name], {contract.input_name: w.features})[0]
    )
    dec = StreamDecoder(contract, endpoint=EndpointConfig(endpointing=ENDPOINT_MS))
    finals = [m for m in dec.accept(lp, w.endpoints) + dec.close() if m.get("is_final")]
    assert len(finals) == DEMO_PAUSES + 1
    assert [m["speech_final"] for m in finals] == [True] * DEMO_PAUSES + [False]
    fs = contract.output_frame_seconds
    for m, e in zip(finals, w.endpoints):
        assert m["start"] + m["duration"] == pytest.approx(e * fs)
        assert m["channel"]["alternatives"][0]["words"]
    # the same endpoints given request by request
    dec2 = StreamDecoder(contract, endpoint=EndpointConfig(endpointing=ENDPOINT_MS))
    msgs, at = [], 0
    for n in (7, 50, 1, 200, 33, len(lp)):
        block = lp[at : at + n]
        ends = [e for e in w.endpoints if at <= e <= at + len(block) and e > 0]
        msgs += dec2.accept(block, ends)
        at += len(block)
    msgs += dec2.close()
    assert [m for m in msgs if m.get("is_final")] == finals


def test_endpoints_outside_the_request_are_refused(contract):
    dec = StreamDecoder(contract)
    v = len(contract.vocabulary)
    with pytest.raises(ValueError, match="endpoints"):
        dec.accept(np.zeros((3, v), np.float32), [4])


def test_endpointing_off_or_another_sample_rate_runs_no_detector(contract):
    assert isinstance(stream_vad(contract, {}), VadEndpointer)
    assert stream_vad(contract, {"endpointing": "false"}) is None
    assert stream_vad(contract, {"endpointing": 0}) is None
    assert stream_vad(contract, {"endpointing": "500"}).need == silence_frames(500)
    with pytest.raises(StreamError, match="endpointing"):
        stream_vad(contract, {"endpointing": "soon"})
    with pytest.raises(ValueError, match="16000 Hz"):
        VadEndpointer(ENDPOINT_MS, sample_rate=8000)
