"""Final-pass step of the `streaming_asr_two_pass` ensemble: finals re-decoded by Whisper.

Stateless: each request carries the decoder step's messages and, for each final with
words, its utterance (:class:`streamasr.two_pass.Utterance`).  Requests without
utterances pass straight through, so interims are not delayed by this step.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..two_pass import FinalPass, Utterance
from .common import ConfigError, ModelConfig, parse_int

log = logging.getLogger("streamasr.final_pass")

#: Files the re-decoder needs, made by ``make whisper`` (python -m training.export_whisper).
WHISPER_FILES = ("whisper_encoder.onnx", "whisper_decoder.onnx", "vocabulary.txt", "config.json")
BUILD_HINT = "build them with `make whisper` (python -m training.export_whisper --out DIR)"


class FinalPassStep:
    def __init__(self, final_pass: FinalPass, whisper_dir: Path):
        self.final_pass = final_pass
        self.whisper_dir = whisper_dir

    def process(self, messages: list[dict], blobs: list[bytes]) -> list[dict]:
        return self.final_pass.process(messages, [Utterance.from_bytes(b) for b in blobs])


def whisper_dir(cfg: ModelConfig) -> Path:
    """Parameter ``whisper_dir`` (relative to the model's folder), default its version
    folder ``1/``; every file of WHISPER_FILES must be there."""
    d = cfg.repository / cfg.param("whisper_dir", "1")
    missing = [f for f in WHISPER_FILES if not (d / f).is_file()]
    if missing:
        raise ConfigError(
            f"model {cfg.name!r}: Whisper re-decoder files {missing} missing in {d}: {BUILD_HINT}"
        )
    return d


def build_step(cfg: ModelConfig, gpu: bool = False) -> FinalPassStep:
    from ..rescore import WhisperRescorer

    d = whisper_dir(cfg)
    threads = parse_int("intra_op_thread_count", cfg.param("intra_op_thread_count", "1"), 0)
    contract = cfg.contract()
    try:
        fp = FinalPass(contract, WhisperRescorer(d, threads=threads, gpu=gpu))
    except ValueError as exc:
        raise ConfigError(f"model {cfg.name!r}: {exc}") from None
    return FinalPassStep(fp, d)
