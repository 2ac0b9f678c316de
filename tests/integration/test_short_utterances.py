"""Two-pass finals of isolated ~1 s words (assets/short/, Asterisk prompts): no word
repeated, and the words the 30 s Whisper window gives (issue 24: the 10 s window said
"two two", "press press" on four of them).  In process, through the served path: the
offline decode with the stream's endpointing, then the final pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamasr import protocol
from streamasr.core.evaluation import normalize
from streamasr.core.two_pass import FinalPass
from streamasr.core.whisper_redecoder import EncoderWindow, WhisperRedecoder
from streamasr.pipeline import ctc_decoder, final_pass, offline_asr
from streamasr.pipeline.common import ConfigError, read_config
from streamasr_client.audio import load_audio

from ..helpers import REPOSITORY

SHORT = Path(__file__).resolve().parents[2] / "assets" / "short"


def clips() -> list[tuple[str, str]]:
    lines = (SHORT / "references.tsv").read_text().splitlines()
    return [tuple(x.split("\t")) for x in lines if x and not x.startswith("#")]  # type: ignore[misc]


def repeated_words(text: str) -> list[str]:
    words = normalize(text).split()
    return [a for a, b in zip(words, words[1:]) if a == b]


@pytest.fixture(scope="module")
def whisper_dir():
    try:
        return final_pass.whisper_dir(read_config(REPOSITORY / "final_pass"))
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


def two_pass_text(contract, onnx_session, audio, fp: FinalPass) -> str:
    defaults = ctc_decoder.build_defaults(read_config(REPOSITORY / "ctc_decoder"))

    def run(features):
        return onnx_session.run([contract.output_name], {contract.input_name: features})[0]

    msgs, utts = offline_asr.transcribe_with_utterances(
        contract, audio, None, run, defaults, {}, 16, 3600, True
    )
    finals = [m for m in fp.process(msgs, utts) if m.get("is_final")]
    assert finals, "the first pass heard nothing"
    assert all(m.get("rescored") for m in finals if protocol.words(m))
    return " ".join(protocol.transcript(m) for m in finals)


def test_repeated_words_are_found():
    assert repeated_words("Two. Two.") == ["two"] and repeated_words("Y Y Y-") == ["y", "y"]
    assert repeated_words("ask not what you can do") == []


def test_short_words_are_not_repeated_and_match_the_30_s_decode(
    contract, onnx_session, whisper_dir
):
    served = FinalPass(contract, WhisperRedecoder(whisper_dir))
    whole = FinalPass(contract, WhisperRedecoder(whisper_dir, window=EncoderWindow.whole()))
    for name, reference in clips():
        audio = load_audio(SHORT / name, contract.sample_rate)
        got = two_pass_text(contract, onnx_session, audio, served)
        assert repeated_words(got) == [], (name, got)
        want = two_pass_text(contract, onnx_session, audio, whole)
        assert normalize(got) == normalize(want), (name, reference)
