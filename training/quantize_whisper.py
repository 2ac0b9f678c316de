"""int8 Whisper graphs for the re-decoder: onnxruntime dynamic quantization.

    python -m training.quantize_whisper --src model_repository/final_pass/1 --out DIR
    (`make whisper` runs it in place after training.export_whisper)

Writes ``whisper_encoder.onnx`` / ``whisper_decoder.onnx`` with int8 MatMul weights
(activations quantized per call, ``onnxruntime.quantization.quantize_dynamic``) and
copies ``vocabulary.txt`` / ``config.json`` beside them, so DIR is a complete re-decoder
folder (``WhisperRedecoder(DIR)``).  ``benchmarks/whisper_int8.py`` measures WER and
CPU of both folders on assets/eval.  Only MatMul is quantized: the token-embedding
Gather and the encoder's convolutions stay float (they are a small share of the time).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

GRAPHS = ("whisper_encoder.onnx", "whisper_decoder.onnx")
COPIED = ("vocabulary.txt", "config.json")
#: Operators whose weights become int8.
QUANTIZED_OPS = ["MatMul"]


def quantize(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    for name in GRAPHS:
        log.info("quantizing %s", name)
        # written beside, then renamed: ``out`` may be ``src`` (in place), and a graph may
        # be a hard link shared with another checkout, which must keep its bytes
        tmp = out / f".{name}.int8"
        quantize_dynamic(
            src / name, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS
        )
        os.replace(tmp, out / name)
    for name in COPIED:
        if (src / name).resolve() != (out / name).resolve():
            shutil.copyfile(src / name, out / name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.quantize_whisper", description=__doc__)
    p.add_argument("--src", type=Path, required=True, help="folder with the float graphs")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quantize(a.src, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
