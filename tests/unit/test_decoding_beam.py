"""Prefix beam search: prefix sums, streaming state, hotword boosting, word n-gram LM."""

from __future__ import annotations

import random

import numpy as np
import pytest

from streamasr import protocol
from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder, decode_whole
from streamasr.core.decoding.lm import kenlm_available

from ..helpers import (
    BLANK,
    CONTRACT,
    FRAME_S,
    VOCAB,
    decoded_finals,
    path_matrix,
    random_path,
    split_points,
    stream_pieces,
)

BEAM = DecoderConfig(decoding="beam", beam_size=8, beam_top_k=4)
#: Posteriors of the ambiguous frame in the crafted cases: the acoustics slightly
#: prefer "o" over "a".
AMBIGUOUS = {"o": 0.5, "a": 0.4}


def rows(*frames: dict) -> np.ndarray:
    """Log-probs from explicit per-frame posteriors; the remaining mass is spread evenly."""
    V = len(VOCAB)
    out = np.zeros((len(frames), V), np.float32)
    for t, probs in enumerate(frames):
        rest = (1.0 - sum(probs.values())) / (V - len(probs))
        row = np.full(V, rest)
        for sym, p in probs.items():
            row[0 if sym == BLANK else VOCAB.index(sym)] = p
        out[t] = np.log(row)
    return out


def clear(sym: str, p: float = 0.9) -> dict:
    return {sym: p}


def cot_or_cat(prefix: str = "") -> np.ndarray:
    frames = [clear(ch) for ch in prefix]
    frames += [clear("c"), clear("c"), clear(BLANK), AMBIGUOUS, clear(BLANK), clear("t")]
    return rows(*frames)


def final_text(msgs: list[dict]) -> str:
    return " ".join(protocol.transcript(m) for m in msgs if m.get("is_final"))


def test_beam_sums_paths_that_greedy_cannot():
    # Each frame: blank 0.6, "a" 0.4.  Best path = blank blank (0.36); but the label "a"
    # has paths aa, a_, _a totalling 0.64.
    lp = rows({BLANK: 0.6, "a": 0.4 - 1e-6}, {BLANK: 0.6, "a": 0.4 - 1e-6})
    assert final_text(decode_whole(CONTRACT, lp)) == ""
    assert final_text(decode_whole(CONTRACT, lp, BEAM)) == "a"


def test_beam_matches_greedy_on_clear_paths():
    rng = random.Random(3)
    for _ in range(6):
        lp = path_matrix(random_path(rng, 10))
        assert decoded_finals(decode_whole(CONTRACT, lp, BEAM)) == decoded_finals(
            decode_whole(CONTRACT, lp)
        )


def test_beam_streamed_in_pieces_equals_whole():
    rng = random.Random(5)
    endpoint = EndpointConfig(rule3_min_utterance_length=2.0)
    config = DecoderConfig(
        decoding="beam", beam_size=4, beam_top_k=3, hotwords=[("abc", 1.0), ("hij", 2.0)]
    )
    for _ in range(4):
        lp = path_matrix(random_path(rng, 10), peak=0.6)  # less peaky: beams differ
        whole = decode_whole(CONTRACT, lp, config, endpoint)
        for max_piece in (1, 4, 13):
            cuts = split_points(lp.shape[0], rng, max_piece)
            assert decoded_finals(stream_pieces(lp, cuts, config, endpoint)) == decoded_finals(
                whole
            )


def test_beam_collapses_across_boundaries_and_rule3_cuts():
    lp = path_matrix("cc_aaa_tt _aa_a")
    for cut in range(1, lp.shape[0]):
        assert final_text(stream_pieces(lp, [0, cut, lp.shape[0]], BEAM)) == "cat aa"
    endpoint = EndpointConfig(rule3_min_utterance_length=0.2)
    msgs = decode_whole(CONTRACT, path_matrix("abcdeeefg"), BEAM, endpoint)
    assert [protocol.transcript(m) for m in msgs if m.get("is_final")] == ["abcde", "fg"]


def test_beam_interims_show_the_best_beam():
    dec = StreamDecoder(CONTRACT, config=BEAM)
    lp = cot_or_cat()
    assert protocol.transcript(dec.accept(lp[:4])[-1]) == "co"
    assert protocol.transcript(dec.accept(lp[4:])[-1]) == "cot"


def test_beam_word_times_follow_the_alignment():
    msgs = decode_whole(CONTRACT, path_matrix("__hh_ee__ _xyyy_"), BEAM)
    (final,) = [m for m in msgs if m.get("is_final")]
    got = [(w["word"], w["start"], w["end"]) for w in protocol.words(final)]
    want = [("he", 2 * FRAME_S, 7 * FRAME_S), ("xy", 11 * FRAME_S, 15 * FRAME_S)]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [t for g in got for t in g[1:]] == pytest.approx([t for w in want for t in w[1:]])


# -- hotwords --------------------------------------------------------------------------------
def with_hotwords(lp: np.ndarray, hotwords) -> str:
    cfg = DecoderConfig(decoding="beam", beam_size=8, beam_top_k=4, hotwords=hotwords)
    return final_text(decode_whole(CONTRACT, lp, cfg))


def test_hotword_boost_flips_an_ambiguous_word():
    lp = cot_or_cat()
    assert final_text(decode_whole(CONTRACT, lp, BEAM)) == "cot"
    assert with_hotwords(lp, [("cat", 1.0)]) == "cat"


def test_hotword_needs_enough_boost():
    # "cat" wins only if 3 tokens x boost exceed ln(0.5 / 0.4) (about 0.22)
    assert with_hotwords(cot_or_cat(), [("cat", 0.05)]) == "cot"


def test_unrelated_or_uncompleted_hotwords_change_nothing():
    lp = cot_or_cat()
    assert with_hotwords(lp, [("dog", 5.0)]) == "cot"
    # "cab" matches "ca" (a partial bonus that favours "ca" while the prefix grows) but is
    # never completed, so the bonus is taken back and "cot" still wins.
    assert with_hotwords(lp, [("cab", 5.0)]) == "cot"
    # ... and the interims show the bonus being applied, then removed (a boost whose
    # partial bonus, 2 x 1.0, beats the acoustic margin but not a missing clear "t")
    dec = StreamDecoder(
        CONTRACT,
        config=DecoderConfig(decoding="beam", beam_size=8, beam_top_k=4, hotwords=[("cab", 1.0)]),
    )
    assert protocol.transcript(dec.accept(lp[:4])[-1]) == "ca"
    assert protocol.transcript(dec.accept(lp[4:])[-1]) == "cot"


def test_hotwords_do_not_change_clear_speech():
    # Each path frame: 0.9 vs 0.0036 for any other token, so dropping or inventing one
    # token costs ~5.5 nats; hotword bonuses below that (3 x 1.0) must not alter the text.
    rng = random.Random(9)
    for _ in range(4):
        lp = path_matrix(random_path(rng, 8))
        plain = decoded_finals(decode_whole(CONTRACT, lp, BEAM))
        assert (
            decoded_finals(
                decode_whole(
                    CONTRACT,
                    lp,
                    DecoderConfig(
                        decoding="beam",
                        beam_size=8,
                        beam_top_k=4,
                        hotwords=[("abc", 1.0), ("jihg", 1.0)],
                    ),
                )
            )
            == plain
        )


def test_hotword_option_from_stream_parameters():
    cfg = DecoderConfig.from_parameters({"decoding": "beam", "hotwords": "cat:1.0"})
    assert final_text(decode_whole(CONTRACT, cot_or_cat(), cfg)) == "cat"


# -- word n-gram LM --------------------------------------------------------------------------
ARPA = """\\data\\
ngram 1=6
ngram 2=2

\\1-grams:
-99\t<s>\t-0.5
-0.5\t</s>\t0
-0.6\tthe\t-0.3
-1.0\tcat\t0
-1.0\tcot\t0
-2.0\t<unk>\t0

\\2-grams:
-0.2\t<s> the
-0.1\tthe cat

\\end\\
"""


@pytest.mark.skipif(not kenlm_available(), reason="the optional kenlm module is not installed")
def test_word_lm_prefers_the_likely_word(tmp_path):
    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(ARPA)
    lp = cot_or_cat("the ")
    assert final_text(decode_whole(CONTRACT, lp, BEAM)) == "the cot"
    cfg = DecoderConfig.from_parameters(
        {"decoding": "beam", "lm_path": str(arpa), "lm_alpha": "1.0", "lm_beta": "0"}
    )
    assert final_text(decode_whole(CONTRACT, lp, cfg)) == "the cat"
    # the LM also runs when the stream arrives in pieces
    assert final_text(stream_pieces(lp, [0, 3, 5, 9, lp.shape[0]], cfg)) == "the cat"
    # a weak LM does not overrule the acoustics
    weak = DecoderConfig(decoding="beam", lm_path=str(arpa), lm_alpha=0.01, lm_beta=0.0)
    assert final_text(decode_whole(CONTRACT, lp, weak)) == "the cot"


@pytest.mark.skipif(not kenlm_available(), reason="the optional kenlm module is not installed")
def test_greedy_streams_opt_out_of_the_servers_lm(tmp_path):
    """The server's default LM belongs to the beam search: a stream that picks greedy
    decodes exactly as greedy without any LM (it used to be refused)."""
    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(ARPA)
    lp = path_matrix("hh_i")
    with_lm = decode_whole(CONTRACT, lp, DecoderConfig(lm_path=str(arpa)))
    assert with_lm == decode_whole(CONTRACT, lp, DecoderConfig())


def test_impossible_tokens_are_never_chosen():
    lp = path_matrix("hh_i")
    lp[:, VOCAB.index("z")] = -np.inf  # e.g. a masked token
    for cfg in (DecoderConfig(), BEAM):
        assert final_text(decode_whole(CONTRACT, lp, cfg)) == "hi"


def test_sentencepiece_beam_and_hotword_tokenisation():
    from streamasr.core.decoding.text import TokenText

    from ..helpers import make_contract

    sp = make_contract(
        ("<b>", "\u2581he", "llo", "\u2581wor", "ld", "\u2581", "x", "o"),
        word_boundary="sentencepiece",
    )
    text = TokenText(sp)
    v = list(sp.vocabulary)
    assert text.encode("hello world") == tuple(
        v.index(t) for t in ("\u2581he", "llo", "\u2581wor", "ld")
    )
    assert text.encode("x") == (v.index("\u2581"), v.index("x"))
    path = ["\u2581he", "llo", BLANK, "\u2581wor", "ld", BLANK, "\u2581", "x"]
    msgs = decode_whole(
        sp, path_matrix(path, sp), DecoderConfig(decoding="beam", hotwords=[("world", 1.0)])
    )
    assert final_text(msgs) == "hello world x"
