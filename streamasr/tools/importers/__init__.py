"""Bring your own model: turn a trained CTC model into a contract-conforming acoustic
model ONNX (and, if asked, a model repository that serves it).

    python -m streamasr.tools.importers wav2vec2 SOURCE -o model.onnx [--repository DIR]
    python -m streamasr.tools.importers ctc-onnx MODEL.onnx --tokens tokens.txt -o model.onnx ...

Kinds: ``wav2vec2`` (Hugging Face Wav2Vec2ForCTC-style, raw waveform in; see
:mod:`.wav2vec2`) and ``ctc-onnx`` (a NeMo/icefall-style log-mel CTC ONNX plus a tokens
file; see :mod:`.ctc_onnx`).  docs/byo-model.md has the details and limitations.
"""

from __future__ import annotations

import sys

from streamasr.tools.importers.common import ImporterError

KINDS = ("wav2vec2", "ctc-onnx")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(__doc__, file=sys.stderr)
        print(
            f"usage: python -m streamasr.tools.importers {{{','.join(KINDS)}}} ... "
            "(--help after the kind for its options)",
            file=sys.stderr,
        )
        return 2
    kind, rest = argv[0], argv[1:]
    try:
        if kind == "wav2vec2":
            from streamasr.tools.importers.wav2vec2 import main as run
        else:
            from streamasr.tools.importers.ctc_onnx import main as run
        return run(rest)
    except ImporterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


__all__ = ["main", "KINDS", "ImporterError"]
