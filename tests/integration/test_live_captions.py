"""Live-caption semantics through the real server: finals are never revised, Finalize
flushes without closing, word timings agree with a forced alignment of the same logits,
endpoints fire in silence, a hotword changes what the decoder hears."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr.core.alignment import word_spans
from streamasr.core.features import whole_file_windows

from ..helpers import stream


def results(msgs):
    return [m for m in msgs if m.get("type") == "Results"]


def text_of(m) -> str:
    return m["channel"]["alternatives"][0]["transcript"]


def test_finals_are_never_revised(conn, contract, demo_audio):
    s = stream(conn, demo_audio, contract.chunk_samples)
    s.wait()
    last_final_end = 0.0
    for m in results(s.messages):
        words = m["channel"]["alternatives"][0]["words"]
        # nothing after a final may re-cover the time that final settled
        assert all(w["start"] >= last_final_end - 1e-6 for w in words), m
        if m["is_final"]:
            last_final_end = max([last_final_end] + [w["end"] for w in words])


def test_finalize_flushes_the_open_utterance_and_the_stream_goes_on(conn, contract, demo_audio):
    chunk = contract.chunk_samples
    cut = (len(demo_audio) // 3) // chunk * chunk
    # endpointing off: only Finalize and END may produce finals
    s = conn.open_session({"endpointing": "false"})
    for i in range(0, cut, chunk):
        s.send(demo_audio[i : i + chunk])
    s.wait()
    interim_before = s.interim
    s.finalize()
    s.wait()
    flushed = s.finals
    assert len(flushed) == 1 and flushed[0]["from_finalize"] and not flushed[0]["speech_final"]
    assert text_of(flushed[0]) == interim_before
    for i in range(cut, len(demo_audio), chunk):
        s.send(demo_audio[i : i + chunk])
    s.close()
    s.wait()
    assert s.errors == []
    assert len(s.finals) >= 2 and not s.finals[-1]["from_finalize"]


# Greedy decoding's alignment IS the best path; the prefix beam search keeps, per prefix,
# the alignment of its most probable contribution frame by frame (search.py), which can
# end a token a frame or two away from the single best path of the same text.
@pytest.mark.parametrize("decoding, tolerance_frames", [("greedy", 1), ("beam", 3)])
def test_word_times_match_a_forced_alignment_of_the_same_logits(
    conn, contract, onnx_session, demo_audio, decoding, tolerance_frames
):
    s = stream(
        conn, demo_audio, contract.chunk_samples, {"endpointing": "false", "decoding": decoding}
    )
    s.wait()
    (final,) = s.finals
    text = text_of(final)
    if not text:
        pytest.fail("the model decoded nothing from the demo recording")
    windows = whole_file_windows(contract, demo_audio)
    lp = onnx_session.run([contract.output_name], {contract.input_name: windows.features})[0]
    frames = windows.stream_log_probs(lp)
    aligned = word_spans(frames, text, contract.vocabulary, contract.blank_id)
    step = contract.output_frame_seconds
    got = final["channel"]["alternatives"][0]["words"]
    assert [w["word"] for w in got] == [w for w, _, _ in aligned]
    tol = tolerance_frames * step + 1e-6
    for w, (_, first, end) in zip(got, aligned):
        assert abs(w["start"] - first * step) <= tol, (w, first * step)
        assert abs(w["end"] - end * step) <= tol, (w, end * step)


def test_endpoint_fires_in_inserted_silence_and_not_inside_speech(conn, contract, demo_audio):
    rate = contract.sample_rate
    speech = demo_audio[: 4 * rate]
    silence_s = 2.0
    audio = np.concatenate([speech, np.zeros(int(silence_s * rate), np.float32), speech])
    s = stream(conn, audio, contract.chunk_samples)
    s.wait()
    endpoints = [m for m in s.finals if m["speech_final"]]
    assert endpoints, "no endpoint in 2 s of silence"
    first = endpoints[0]
    words = first["channel"]["alternatives"][0]["words"]
    # the endpoint closes the first speech segment: its words end before the silence
    # ends, and it was not cut inside the first segment's speech
    assert words and words[-1]["end"] <= len(speech) / rate + silence_s
    assert first["start"] + first["duration"] >= len(speech) / rate - 0.5


def test_hotword_boost_recovers_a_misrecognised_word(conn, contract, demo_audio):
    """The first 3 s say "... had then leisure to ..."; the bundled model hears "leser"
    unless the stream boosts "leisure"."""
    clip = demo_audio[: 3 * contract.sample_rate]
    plain = stream(conn, clip, contract.chunk_samples, {"decoding": "beam"})
    boosted = stream(
        conn, clip, contract.chunk_samples, {"decoding": "beam", "hotwords": "leisure:3"}
    )
    plain.wait()
    boosted.wait()
    assert plain.errors == [] and boosted.errors == []
    assert "leisure" not in plain.transcript.split()
    assert "leisure" in boosted.transcript.split()
