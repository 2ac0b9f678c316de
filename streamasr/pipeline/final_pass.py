"""Final-pass step of the `streaming_asr_two_pass` ensemble: finals re-decoded by Whisper.

Each request carries the decoder step's messages and, for each final with words (and
each due Whisper interim), its utterance (:class:`streamasr.core.two_pass.Utterance`).
Requests without utterances pass straight through.  The Triton adapter is decoupled: it
answers requests without a final to re-decode at once and re-decodes the rest in batches
(:meth:`streamasr.core.two_pass.FinalPass.answer_many`); Whisper interim refreshes go out
later as their own responses (:meth:`streamasr.core.two_pass.FinalPass.refresh_many`).
The only state is the Whisper interims' agreement per stream, so the model runs as ONE
instance (batching, not instances, is how it scales).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from streamasr.core.two_pass import FINAL, FinalPass, Utterance
from streamasr.core.whisper_redecoder import INT8_GRAPHS, SUPPORT_FILES, graph_files
from streamasr.pipeline.common import ConfigError, ModelConfig, parse_int, stream_idle_timeout

if TYPE_CHECKING:
    from streamasr.core.whisper_redecoder import EncoderWindow

log = logging.getLogger("streamasr.final_pass")

#: Files the re-decoder needs, made by ``make whisper`` (python -m streamasr.artifacts.export_whisper).
WHISPER_FILES = (*graph_files(), *SUPPORT_FILES)
BUILD_HINT = (
    "build them with `make whisper` (python -m streamasr.artifacts.export_whisper --out DIR)"
)


class FinalPassStep:
    def __init__(self, final_pass: FinalPass, whisper_dir: Path):
        self.final_pass = final_pass
        self.whisper_dir = whisper_dir

    @staticmethod
    def parse(blobs: list[bytes]) -> list[Utterance]:
        return [Utterance.from_bytes(b) for b in blobs]

    @staticmethod
    def needs_decode(utterances: list[Utterance]) -> bool:
        """Whether answering takes a Whisper re-decode: a final's (an interim's refresh
        is sent later, on its own)."""
        return any(u.kind == FINAL for u in utterances)


#: Parameter ``final_graphs``: the Whisper graphs finals are re-decoded with.  ``int8``
#: (streamasr/artifacts/quantize_whisper.py) takes about half the CPU of ``float`` per
#: utterance but goes one utterance per call (activations are quantized per call, so a
#: batch could change a final's text); ``float`` batches the finals that queued together
#: (several streams' finals in one encoder call and decoder loop).  Measured in
#: benchmarks/results/finals/README.md.
FLOAT, INT8 = "float", "int8"
FINAL_GRAPHS = (FLOAT, INT8)
DEFAULT_FINAL_GRAPHS = INT8


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


def encoder_window(cfg: ModelConfig) -> "EncoderWindow":
    """Parameters ``encoder_min_frames`` / ``encoder_bucket_frames`` (defaults:
    :class:`streamasr.core.whisper_redecoder.EncoderWindow`); ``encoder_min_frames`` 3000 restores the
    whole-30-s decode."""
    from streamasr.core.whisper_redecoder import EncoderWindow

    base = EncoderWindow()
    try:
        return EncoderWindow(
            min_frames=parse_int(
                "encoder_min_frames", cfg.param("encoder_min_frames", str(base.min_frames)), 0
            ),
            tail_frames=parse_int(
                "encoder_tail_frames", cfg.param("encoder_tail_frames", str(base.tail_frames)), 0
            ),
            bucket_frames=parse_int(
                "encoder_bucket_frames",
                cfg.param("encoder_bucket_frames", str(base.bucket_frames)),
                2,
            ),
        )
    except ValueError as exc:
        raise ConfigError(f"model {cfg.name!r}: {exc}") from None


def build_step(cfg: ModelConfig, gpu: bool = False) -> FinalPassStep:
    from streamasr.core.whisper_redecoder import WhisperRedecoder

    int8_files = graph_files(INT8_GRAPHS)

    d = whisper_dir(cfg)
    threads = parse_int("intra_op_thread_count", cfg.param("intra_op_thread_count", "1"), 0)
    # one encoder call / decoder loop takes at most this many utterances (a batch of
    # requests may carry more)
    max_batch = parse_int(
        "max_utterances_per_call",
        cfg.param("max_utterances_per_call", str(int(cfg.raw.get("max_batch_size") or 1))),
        1,
    )
    contract = cfg.contract()
    window = encoder_window(cfg)
    graphs = cfg.param("final_graphs", DEFAULT_FINAL_GRAPHS)
    if graphs not in FINAL_GRAPHS:
        raise ConfigError(
            f"model {cfg.name!r}: final_graphs must be one of {list(FINAL_GRAPHS)}, got {graphs!r}"
        )
    have_int8 = all((d / f).is_file() for f in int8_files)
    if graphs == INT8 and not have_int8:
        raise ConfigError(
            f"model {cfg.name!r}: final_graphs {INT8} needs {list(int8_files)} in {d}: {BUILD_HINT}"
        )
    try:
        int8 = None
        if have_int8:
            int8 = WhisperRedecoder(
                d, threads=threads, gpu=gpu, window=window, max_batch=max_batch, graphs=INT8_GRAPHS
            )
        else:
            log.info("no int8 Whisper graphs in %s: interim refreshes use the float ones", d)
        if graphs == INT8:
            assert int8 is not None
            # one utterance per call, on the refreshes' sessions
            finals = int8.one_per_call()
        else:
            finals = WhisperRedecoder(
                d, threads=threads, gpu=gpu, window=window, max_batch=max_batch
            )
        log.info("finals re-decoded with the %s Whisper graphs", graphs)
        fp = FinalPass(
            contract,
            finals,
            interim_ttl_s=stream_idle_timeout(cfg),
            refresh_redecoder=int8,
        )
    except ValueError as exc:
        raise ConfigError(f"model {cfg.name!r}: {exc}") from None
    return FinalPassStep(fp, d)
