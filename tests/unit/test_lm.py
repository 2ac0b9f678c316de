"""The word LM: building it from the CMU Sphinx binary, <unk>, and partial-word scoring.

The ARPA file is checked against pocketsphinx's OWN scoring of the original binary (an
independent implementation), so a reader bug cannot hide behind a test that shares its
code."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("kenlm")
import kenlm  # noqa: E402

from streamasr.artifacts import build_lm, sphinx_lm  # noqa: E402
from streamasr.artifacts.acoustic import VOCABULARY, default_contract  # noqa: E402
from streamasr.core.decoding import DecoderConfig, EndpointConfig, decode_whole  # noqa: E402
from streamasr.core.decoding.lm import PrefixTable, read_arpa_unigrams  # noqa: E402
from streamasr.protocol import final_text  # noqa: E402

SPHINX_UNITS_TO_LOG10 = math.log10(1.0001)


@pytest.fixture(scope="module")
def sphinx():
    return sphinx_lm.read(build_lm.packaged_sphinx_lm())


@pytest.fixture(scope="module")
def arpa(tmp_path_factory) -> Path:
    """The LM `make lm` builds (built here when absent, e.g. outside make)."""
    if build_lm.DEFAULT_OUT.exists():
        return build_lm.DEFAULT_OUT
    out = tmp_path_factory.mktemp("lm") / "en-us.arpa"
    build_lm.build(out)
    return out


def test_reader_reports_the_ngrams_actually_present(sphinx):
    # the header overstates the bigrams by 6 (why Sphinx's own converter aborts)
    assert sphinx.header_counts == [72547, 2051547, 1669625]
    assert sphinx.counts == [72547, 2051541, 1669625]
    assert len(set(sphinx.vocabulary)) == len(sphinx.vocabulary)
    assert "<s>" in sphinx.vocabulary and "</s>" in sphinx.vocabulary
    assert "<unk>" not in sphinx.vocabulary


def test_arpa_scores_equal_pocketsphinx_scores(sphinx, arpa):
    """Random unigrams, and bigrams/trigrams drawn from the file (plus unseen pairs that
    exercise back-off), scored by KenLM on our ARPA and by pocketsphinx on the binary."""
    from pocketsphinx import NGramModel

    ps = NGramModel.readfile(str(build_lm.packaged_sphinx_lm()))
    model = kenlm.Model(str(arpa))
    rng = random.Random(0)
    vocab = [w for w in sphinx.vocabulary if w not in ("<s>", "</s>")]
    cases = [[rng.choice(vocab)] for _ in range(50)]
    for g in sphinx.ngrams:
        for i in rng.sample(range(len(g.prob)), 100):
            cases.append([sphinx.vocabulary[w] for w in g.words[i]])
    cases += [[rng.choice(vocab), rng.choice(vocab), rng.choice(vocab)] for _ in range(50)]
    cases = [c for c in cases if c[-1] != "<s>"]
    for words in cases:
        state, out = kenlm.State(), kenlm.State()
        if words[0] == "<s>":
            model.BeginSentenceWrite(state)
            history = words[1:-1]
        else:
            model.NullContextWrite(state)
            history = words[:-1]
        for w in history:
            model.BaseScore(state, w, out)
            state, out = out, state
        ours = model.BaseScore(state, words[-1], out)
        theirs = ps.prob(list(reversed(words))) * SPHINX_UNITS_TO_LOG10
        assert ours == pytest.approx(theirs, abs=3e-4), words


def test_unknown_words_cost_the_unk_probability(arpa):
    model = kenlm.Model(str(arpa))
    assert "anmistrjondash" not in model
    assert model.score("anmistrjondash", bos=False, eos=False) == pytest.approx(
        build_lm.DEFAULT_UNK_LOG10
    )
    uni = read_arpa_unigrams(arpa)
    assert uni["<unk>"] == build_lm.DEFAULT_UNK_LOG10
    assert len(uni) == 72548


# --- partial-word scoring on a small hand-written LM -----------------------------------
TOY_UNIGRAMS = {
    "<s>": -99.0,
    "</s>": -1.0,
    "<unk>": -5.0,
    "the": -1.0,
    "cat": -1.5,
    "car": -1.2,
    "sat": -1.6,
    "on": -1.1,
    "mat": -1.8,
    "caf\u00e9": -0.1,
}


def write_toy_arpa(path: Path, unigrams=TOY_UNIGRAMS) -> Path:
    # KenLM needs at least one bigram section
    lines = ["\\data\\", f"ngram 1={len(unigrams)}", "ngram 2=1", "", "\\1-grams:"]
    lines += [f"{p:.4f}\t{w}\t0.0000" for w, p in unigrams.items()]
    lines += ["", "\\2-grams:", "-0.3000\t<s>\tthe", "", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_prefix_table_gives_the_best_completion_or_unk():
    table = PrefixTable(TOY_UNIGRAMS, alphabet=frozenset("abcdefghijklmnopqrstuvwxyz'"))
    assert table.lookahead_log10("c") == -1.2  # car beats cat
    assert table.lookahead_log10("cat") == -1.5
    assert table.lookahead_log10("th") == -1.0
    assert table.lookahead_log10("thec") == -5.0  # no word: <unk>
    assert table.lookahead_log10("thec", -0.5) == -7.0  # ... plus a cost per letter
    # "caf\u00e9" cannot be spelled by the model, so it must not make "caf" cheap
    assert table.lookahead_log10("caf") == -5.0
    assert table.lookahead_log10("<s") == -5.0  # markup is not a word


def spelled(text: str, p_space: float, frames_per_char: int = 2) -> np.ndarray:
    """Log-probs that spell ``text``: each character's frames peak at it (0.9), with a
    blank between characters; every space is heard only weakly (``p_space``), the rest
    of that frame going to blank."""
    v = {c: i for i, c in enumerate(VOCABULARY)}
    rows = []
    floor = 1e-4
    for ch in text:
        for _ in range(frames_per_char):
            r = np.full(len(VOCABULARY), floor)
            if ch == " ":
                r[v[" "]], r[0] = p_space, 1 - p_space
            else:
                r[v[ch]] = 0.9
                r[0] = 0.1
            rows.append(r / r.sum())
        blank = np.full(len(VOCABULARY), floor)
        blank[0] = 1.0
        rows.append(blank / blank.sum())
    return np.log(np.array(rows, np.float32))


def test_partial_words_stop_run_on_words(tmp_path):
    """With only completed words scored, hypotheses without spaces pay nothing until the
    end and crowd the spaced ones out of the beam; the look-ahead charges a glued prefix
    the unknown-word cost as soon as it leaves the vocabulary."""
    lm = write_toy_arpa(tmp_path / "toy.arpa")
    contract = default_contract()
    log_probs = spelled("the cat sat on the mat", p_space=0.3)
    no_endpoints = EndpointConfig(endpointing=False)

    def decode(partial: bool) -> str:
        cfg = DecoderConfig(
            decoding="beam",
            beam_size=4,
            lm_path=str(lm),
            lm_alpha=1.0,
            lm_beta=0.0,
            lm_partial_words=partial,
        )
        return final_text(decode_whole(contract, log_probs, cfg, no_endpoints))

    assert (
        final_text(decode_whole(contract, log_probs, DecoderConfig(), no_endpoints))
        == "thecatsatonthemat"
    )
    assert decode(partial=True) == "the cat sat on the mat"
    whole_words_only = decode(partial=False)
    assert len(whole_words_only.split()) < 6, whole_words_only  # words glued together


def test_unknown_words_pay_per_letter(tmp_path):
    """One <unk> must not be cheaper than the real words it swallows."""
    from streamasr.core.decoding.lm import WordLM

    lm = WordLM(
        str(write_toy_arpa(tmp_path / "toy.arpa")), alpha=1.0, beta=0.0, oov_letter_log10=-0.5
    )
    state = lm.begin()
    _, glued = lm._score(state, "thecatsat")
    _, known = lm._score(state, "the")
    assert glued == pytest.approx((-5.0 - 0.5 * 9) * math.log(10))
    assert known == pytest.approx(-0.3 * math.log(10))  # the bigram <s> the


def test_partial_words_do_not_change_lm_free_decoding(tmp_path):
    contract = default_contract()
    log_probs = spelled("the cat sat", p_space=0.6)
    beam = DecoderConfig(decoding="beam", beam_size=4)
    assert final_text(decode_whole(contract, log_probs, beam)) == "the cat sat"
