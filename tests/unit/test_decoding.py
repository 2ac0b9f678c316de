"""Stream decoder: greedy CTC, streaming parity, endpointing, finals, word timings.

No server: synthetic log-prob matrices whose argmax path is known frame by frame.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamasr import protocol
from streamasr.core.decoding import (
    DecoderConfig,
    EndpointConfig,
    StreamDecoder,
    decode_whole,
    results_schema_doc,
)
from streamasr.protocol import final_text

from ..helpers import (
    BLANK,
    CONTRACT,
    FRAME_S,
    PEAK,
    RULE1_FRAMES,
    RULE2_FRAMES,
    VOCAB,
    decoded_finals,
    make_contract,
    path_matrix,
    random_path,
    split_points,
    stream_pieces,
)


# -- greedy decoding -------------------------------------------------------------------------
def test_repeats_collapse_and_blanks_separate():
    msgs = decode_whole(CONTRACT, path_matrix("cc_aaa_tt _aa_a"))
    assert final_text(msgs) == "cat aa"


@pytest.mark.parametrize("cut", range(1, 15))
def test_collapse_across_request_boundaries(cut):
    lp = path_matrix("cc_aaa_tt _aa_a")
    msgs = stream_pieces(lp, [0, cut, lp.shape[0]])
    assert final_text(msgs) == "cat aa"


def test_streamed_in_pieces_of_any_size_equals_whole():
    rng = random.Random(7)
    endpoint = EndpointConfig(rule3_min_utterance_length=3.0)  # rule 3 fires too
    for trial in range(12):
        lp = path_matrix(random_path(rng, 12))
        whole = decode_whole(CONTRACT, lp, endpoint=endpoint)
        assert sum(m["type"] == "Results" and m["is_final"] for m in whole) >= 2
        for max_piece in (1, 2, 5, 17, 64):
            msgs = stream_pieces(lp, split_points(lp.shape[0], rng, max_piece), endpoint=endpoint)
            assert decoded_finals(msgs) == decoded_finals(whole), (trial, max_piece)


def test_accept_returns_one_interim_last_and_accepts_empty_requests():
    dec = StreamDecoder(CONTRACT)
    msgs = dec.accept(np.zeros((0, len(VOCAB)), np.float32))
    assert [m["is_final"] for m in msgs] == [False]
    assert protocol.transcript(msgs[0]) == ""
    msgs = dec.accept(path_matrix("hh_i"))
    assert len(msgs) == 1 and not msgs[0]["is_final"]
    assert protocol.transcript(msgs[0]) == "hi"
    assert msgs[0]["duration"] == pytest.approx(4 * FRAME_S)
    assert dec.keepalive() == []
    assert dec.frames_decoded == 4


def test_bad_log_probs_are_rejected():
    dec = StreamDecoder(CONTRACT)
    with pytest.raises(ValueError, match=r"\[T, 29\]"):
        dec.accept(np.zeros((3, 5), np.float32))
    bad = path_matrix("ab")
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dec.accept(bad)


# -- word timings and confidence -----------------------------------------------------------
def test_word_times_are_frame_indices_times_frame_seconds():
    #        0123456789012345
    path = "__hh_ee__ _xyyy_"
    msgs = decode_whole(CONTRACT, path_matrix(path))
    (final,) = [m for m in msgs if m["type"] == "Results" and m["is_final"]]
    words = protocol.words(final)
    assert [w["word"] for w in words] == ["he", "xy"]
    # "he": first token h at frame 2, last token e ends at frame 6 -> end = frame 7
    assert words[0]["start"] == pytest.approx(2 * FRAME_S)
    assert words[0]["end"] == pytest.approx(7 * FRAME_S)
    # "xy": x at frame 11, y spans frames 12-14 -> end = frame 15
    assert words[1]["start"] == pytest.approx(11 * FRAME_S)
    assert words[1]["end"] == pytest.approx(15 * FRAME_S)
    assert final["start"] == 0.0
    assert final["duration"] == pytest.approx(len(path) * FRAME_S)
    for w in words:
        assert w["confidence"] == pytest.approx(PEAK, abs=1e-4)
    assert final["channel"]["alternatives"][0]["confidence"] == pytest.approx(PEAK, abs=1e-4)


def test_time_offset_shifts_every_time():
    path = "__hh_ee__"
    base = decode_whole(CONTRACT, path_matrix(path))
    shifted = decode_whole(CONTRACT, path_matrix(path), DecoderConfig(time_offset=10.0))
    w0, w1 = protocol.words(base[-2])[0], protocol.words(shifted[-2])[0]
    assert w1["start"] == pytest.approx(w0["start"] + 10.0)
    assert w1["end"] == pytest.approx(w0["end"] + 10.0)
    assert shifted[-2]["start"] == pytest.approx(10.0)


def test_word_confidence_is_mean_of_token_peaks_and_utterance_mean_of_words():
    lp = path_matrix("ab_ c")
    vocab = list(VOCAB)
    # frame 0 ('a') peak 0.6, frame 1 ('b') 0.8, frame 4 ('c') 0.5
    for t, tok, p in ((0, "a", 0.6), (1, "b", 0.8), (4, "c", 0.5)):
        row = np.full(len(vocab), (1 - p) / (len(vocab) - 1))
        row[vocab.index(tok)] = p
        lp[t] = np.log(row)
    final = [m for m in decode_whole(CONTRACT, lp) if m.get("is_final")][0]
    ab, c = protocol.words(final)
    assert ab["confidence"] == pytest.approx(0.7, abs=1e-4)
    assert c["confidence"] == pytest.approx(0.5, abs=1e-4)
    assert final["channel"]["alternatives"][0]["confidence"] == pytest.approx(0.6, abs=1e-4)


def test_sentencepiece_words():
    sp = make_contract(
        ("<b>", "\u2581he", "llo", "\u2581wor", "ld", "\u2581", "x"), word_boundary="sentencepiece"
    )
    path = ["\u2581he", "llo", BLANK, "\u2581wor", "\u2581wor", "ld", BLANK, "\u2581", "x"]
    msgs = decode_whole(sp, path_matrix(path, sp))
    final = [m for m in msgs if m.get("is_final")][0]
    assert protocol.transcript(final) == "hello world x"
    times = [t for w in protocol.words(final) for t in (w["start"], w["end"])]
    assert times == pytest.approx(
        [0.0, 2 * FRAME_S, 3 * FRAME_S, 6 * FRAME_S, 7 * FRAME_S, 9 * FRAME_S]
    )


# -- endpointing ---------------------------------------------------------------------------
def _endpoint_finals(gap: int) -> tuple[list[dict], list[dict]]:
    lp = path_matrix("hi" + BLANK * gap + "yo")
    msgs = decode_whole(CONTRACT, lp)
    return msgs, [m for m in msgs if m["type"] == "Results" and m["is_final"]]


def test_endpoint_fires_after_rule2_silence():
    msgs, fin = _endpoint_finals(RULE2_FRAMES)
    assert [protocol.transcript(m) for m in fin] == ["hi", "yo"]
    assert fin[0]["speech_final"] is True and fin[0]["from_finalize"] is False
    # the final covers the word and exactly 1.2 s of silence after it
    assert fin[0]["duration"] == pytest.approx((2 + RULE2_FRAMES) * FRAME_S)
    assert fin[1]["start"] == pytest.approx((2 + RULE2_FRAMES) * FRAME_S)
    assert fin[1]["speech_final"] is False  # flushed by close(), not a pause
    assert protocol.words(fin[1])[0]["start"] == pytest.approx((2 + RULE2_FRAMES) * FRAME_S)


@pytest.mark.parametrize("gap", [1, 10, RULE2_FRAMES - 1])
def test_no_endpoint_within_shorter_gaps(gap):
    msgs, fin = _endpoint_finals(gap)
    assert [protocol.transcript(m) for m in fin] == ["hiyo"]


def test_endpoint_fires_in_the_request_that_completes_the_silence():
    lp = path_matrix("hi" + BLANK * (RULE2_FRAMES + 10))
    dec = StreamDecoder(CONTRACT)
    first = dec.accept(lp[: 2 + RULE2_FRAMES - 1])
    assert [m["is_final"] for m in first] == [False]
    second = dec.accept(lp[2 + RULE2_FRAMES - 1 :])
    assert [(m["type"], m.get("is_final")) for m in second] == [
        ("Results", True),
        ("UtteranceEnd", None),
        ("Results", False),
    ]
    assert second[0]["speech_final"] is True
    assert protocol.transcript(second[2]) == ""
    assert second[2]["start"] == pytest.approx((2 + RULE2_FRAMES) * FRAME_S)


def test_rule2_threshold_is_configurable():
    endpoint = EndpointConfig.from_parameters({"rule2_min_trailing_silence": "0.4"})
    msgs = decode_whole(CONTRACT, path_matrix("hi" + BLANK * 10 + "yo"), endpoint=endpoint)
    assert [protocol.transcript(m) for m in msgs if m.get("is_final")] == ["hi", "yo"]
    off = EndpointConfig(endpointing=False)
    msgs = decode_whole(CONTRACT, path_matrix("hi" + BLANK * 100 + "yo"), endpoint=off)
    assert [protocol.transcript(m) for m in msgs if m.get("is_final")] == ["hiyo"]


def test_rule1_resets_silently_and_times_keep_counting():
    lp = path_matrix(BLANK * (RULE1_FRAMES + 5) + "ok")
    msgs = decode_whole(CONTRACT, lp)
    fin = [m for m in msgs if m["type"] == "Results" and m["is_final"]]
    assert [protocol.transcript(m) for m in fin] == ["ok"]
    assert fin[0]["start"] == pytest.approx(RULE1_FRAMES * FRAME_S)
    assert protocol.words(fin[0])[0]["start"] == pytest.approx((RULE1_FRAMES + 5) * FRAME_S)
    with_empty = decode_whole(CONTRACT, lp, endpoint=EndpointConfig(empty_finals=True))
    fin = [m for m in with_empty if m["type"] == "Results" and m["is_final"]]
    assert [protocol.transcript(m) for m in fin] == ["", "ok"]
    assert fin[0]["speech_final"] is True


def test_rule3_cuts_long_utterances_without_duplicating_a_straddling_token():
    endpoint = EndpointConfig(rule3_min_utterance_length=0.2)  # 5 frames
    msgs = decode_whole(CONTRACT, path_matrix("abcdeeefg"), endpoint=endpoint)
    fin = [m for m in msgs if m["type"] == "Results" and m["is_final"]]
    # cut after frame 4 (inside the held "eee"): e belongs to the first utterance only
    assert [protocol.transcript(m) for m in fin] == ["abcde", "fg"]
    assert [m["speech_final"] for m in fin] == [False, False]
    assert protocol.words(fin[0])[0]["end"] == pytest.approx(5 * FRAME_S)


# -- finals never change ---------------------------------------------------------------------
def test_finals_are_never_revised():
    rng = random.Random(11)
    for _ in range(5):
        lp = path_matrix(random_path(rng, 15))
        msgs = stream_pieces(lp, split_points(lp.shape[0], rng, 9))
        finalized_until = 0.0
        for m in msgs:
            if m["type"] != "Results":
                continue
            assert m["start"] >= finalized_until - 1e-9
            for w in protocol.words(m):
                assert w["start"] >= finalized_until - 1e-9
            if m["is_final"]:
                finalized_until = m["start"] + m["duration"]
        assert final_text(msgs) == final_text(decode_whole(CONTRACT, lp))


def test_interim_after_final_holds_only_the_new_utterance():
    dec = StreamDecoder(CONTRACT)
    msgs = dec.accept(path_matrix("one" + BLANK * RULE2_FRAMES + "tw"))
    assert [protocol.transcript(m) for m in msgs if m["type"] == "Results"] == ["one", "tw"]
    more = dec.accept(path_matrix("o"))
    assert protocol.transcript(more[-1]) == "two"


# -- finalize / close / UtteranceEnd ---------------------------------------------------------
def test_finalize_flushes_the_open_utterance():
    dec = StreamDecoder(CONTRACT)
    dec.accept(path_matrix("hel"))
    (fin,) = dec.finalize()
    assert fin["is_final"] and fin["from_finalize"] and not fin["speech_final"]
    assert protocol.transcript(fin) == "hel"
    nxt = dec.accept(path_matrix("_lo"))
    assert protocol.transcript(nxt[-1]) == "lo"  # "hel" is not repeated
    assert nxt[-1]["start"] == pytest.approx(3 * FRAME_S)
    (again,) = dec.finalize()
    assert protocol.transcript(again) == "lo"
    (empty,) = dec.finalize()
    assert empty["from_finalize"] and protocol.transcript(empty) == ""


def test_close_flushes_then_stops():
    dec = StreamDecoder(CONTRACT)
    dec.accept(path_matrix("hey"))
    msgs = dec.close()
    assert [m["type"] for m in msgs] == ["Results", "UtteranceEnd"]
    assert msgs[0]["is_final"] and not msgs[0]["from_finalize"]
    assert msgs[1]["last_word_end"] == pytest.approx(3 * FRAME_S)
    assert dec.close() == []
    with pytest.raises(RuntimeError):
        dec.accept(path_matrix("a"))


def test_close_with_nothing_open_sends_no_empty_final():
    dec = StreamDecoder(CONTRACT)
    dec.accept(path_matrix("hi" + BLANK * RULE2_FRAMES))
    assert dec.close() == []  # final and UtteranceEnd were already sent


def test_utterance_end_after_silence_and_not_when_speech_resumes():
    endpoint = EndpointConfig(utterance_end=2.0)  # 50 frames
    dec = StreamDecoder(CONTRACT, endpoint=endpoint)
    msgs = dec.accept(path_matrix("hi" + BLANK * 49))
    assert [m["type"] for m in msgs] == ["Results", "Results"]  # final + interim
    msgs = dec.accept(path_matrix(BLANK))
    assert msgs[0] == {"type": "UtteranceEnd", "last_word_end": pytest.approx(2 * FRAME_S)}
    # speech resumes before the gap: the owed UtteranceEnd is dropped
    dec = StreamDecoder(CONTRACT, endpoint=endpoint)
    msgs = dec.accept(path_matrix("hi" + BLANK * 40 + "yo" + BLANK * 20))
    assert all(m["type"] == "Results" for m in msgs)


def test_schema_doc_documents_every_field():
    msgs = decode_whole(CONTRACT, path_matrix("hi"))
    fields = set()
    for m in msgs:
        fields |= set(m)
        if m["type"] == "Results":
            alt = m["channel"]["alternatives"][0]
            fields |= set(alt) | set(protocol.words(m)[0])
    for f in fields:
        assert f"`{f}" in results_schema_doc or f".{f}`" in results_schema_doc, f
