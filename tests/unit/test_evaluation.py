"""The evaluation set loads, and WER/CER count what they should."""

from __future__ import annotations

import pytest
import soundfile as sf

from streamasr.core.evaluation import load_eval_set, normalize, wer_cer


def test_eval_set_is_real_audio_with_references():
    items = load_eval_set()
    assert len(items) >= 10
    total = 0.0
    for it in items:
        info = sf.info(str(it.audio_path))
        assert info.samplerate == 16000 and info.channels == 1
        assert it.reference and it.reference == normalize(it.reference)
        total += info.duration
    assert total > 40  # seconds of real speech


def test_normalize_spells_numbers_and_drops_punctuation():
    assert (
        normalize("Ask not, what 2 do -- 'tis 1961!")
        == "ask not what two do tis one thousand nine hundred and sixty one"
    )
    assert normalize("Don't   STOP") == "don't stop"


def test_wer_and_cer_count_errors():
    r = wer_cer(["the cat sat", "a b"], ["the cat sat", "a c d"])
    assert r["words"] == 5
    assert r["substitutions"] == 1 and r["insertions"] == 1 and r["deletions"] == 0
    assert r["wer"] == pytest.approx(2 / 5)
    assert 0 < r["cer"] < 1
