"""int8 Whisper graphs for finals and interim refreshes: onnxruntime dynamic quantization.

    python -m streamasr.artifacts.quantize_whisper --dir model_repository/final_pass/1
    (`make whisper` runs it after training.export_whisper)

Writes ``whisper_encoder.int8.onnx`` / ``whisper_decoder.int8.onnx`` beside the float
graphs, with int8 MatMul weights (activations quantized per call,
``onnxruntime.quantization.quantize_dynamic``); ``final_pass`` uses them for interim
refreshes (``WhisperRedecoder(dir, graphs=INT8_GRAPHS)``) and, by default, for finals
one utterance per call: per-call activation scales make a row's text depend on its batch.
``--out`` writes a complete folder with the int8 graphs under the float names instead (for
``benchmarks/whisper_int8.py``, which measures WER and CPU of two folders).  Only MatMul
is quantized: the token-embedding Gather and the encoder's convolutions stay float.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from streamasr.core.whisper_redecoder import INT8_GRAPHS, SUPPORT_FILES, graph_files

log = logging.getLogger(__name__)

#: Operators whose weights become int8.
QUANTIZED_OPS = ["MatMul"]


def quantize(src: Path, out: Path, suffix: str = "") -> None:
    """``src``'s graphs int8 into ``out`` as ``whisper_*{suffix}.onnx`` (plus the
    vocabulary and config when ``out`` is another folder)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    for name, target_name in zip(graph_files(), graph_files(suffix)):
        target = out / target_name
        log.info("quantizing %s -> %s", name, target)
        # written beside, then renamed: a target may be a hard link shared with another
        # checkout, which must keep its bytes
        tmp = target.with_name(f".{target.name}.tmp")
        quantize_dynamic(
            src / name, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS
        )
        os.replace(tmp, target)
    if out.resolve() != src.resolve():
        for name in SUPPORT_FILES:
            shutil.copyfile(src / name, out / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m streamasr.artifacts.quantize_whisper", description=__doc__
    )
    p.add_argument("--dir", type=Path, required=True, help="folder with the float graphs")
    p.add_argument(
        "--out", type=Path, help="write a separate folder (int8 graphs under the float names)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.out:
        quantize(a.dir, a.out)
    else:
        quantize(a.dir, a.dir, INT8_GRAPHS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
