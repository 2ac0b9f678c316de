"""WER and final latency on real speech: streaming CTC finals vs Whisper re-decoded finals.

    python -m training.eval_two_pass [--model model_repository/acoustic_model/1/model.onnx]

For each real clip (pocketsphinx test data, never trained on) the audio is streamed in
chunk-sized pieces through ``streamasr.core.features.FeatureStream`` and the exported acoustic
model (onnxruntime).  "Final latency" is the compute time after the last audio sample
arrives until the final text exists: the flush windows + CTC decoding for the one-pass
final; that plus the Whisper re-decode of the utterance's features for the two-pass final.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from streamasr.artifacts import acoustic
from streamasr.core.features import FeatureStream, silence_frame
from streamasr.core.whisper_redecoder import WhisperRedecoder
from streamasr.protocol.contract import ModelContract

from . import train_ctc

log = logging.getLogger("training.eval_two_pass")
ROOT = Path(__file__).resolve().parent.parent


def whisper_text_to_ctc(text: str) -> str:
    from .synth import spell_numbers

    return acoustic.normalise_text(
        spell_numbers(text.replace("Mr.", "mister").replace("Mrs.", "missus"))
    )


def run(model_path: Path, whisper_dir: Path, threads: int = 1) -> dict:
    import jiwer
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    c = ModelContract.from_session(sess)
    redecoder = WhisperRedecoder(whisper_dir, threads=threads)
    sil = silence_frame(c.features)
    refs, one, two, lat1, lat2, audio_s = [], [], [], [], [], 0.0
    for wav, ref in train_ctc.real_speech_set():
        audio = train_ctc.load_audio_16k(wav)
        audio_s += len(audio) / c.sample_rate
        fs = FeatureStream(c)
        lps = []
        for s in range(0, len(audio), c.chunk_samples):  # the stream, chunk by chunk
            w = fs.accept(audio[s : s + c.chunk_samples])
            if w.count:
                lps.append(sess.run(None, {c.input_name: w.features})[0])
        t0 = time.perf_counter()
        w = fs.finish()
        if w.count:
            lps.append(sess.run(None, {c.input_name: w.features})[0])
        lp = np.concatenate(lps).reshape(-1, len(c.vocabulary))
        n_out = -(-fs.windows.total_frames // c.subsampling)
        hyp1 = train_ctc.ctc_greedy(lp[:n_out])
        t1 = time.perf_counter()
        # the redecoder sees the utterance's features (here recomputed whole-file: identical)
        from streamasr.artifacts.whisper import log_mel

        hyp2 = whisper_text_to_ctc(redecoder.transcribe(log_mel(audio), sil))
        t2 = time.perf_counter()
        refs.append(acoustic.normalise_text(ref))
        one.append(hyp1)
        two.append(hyp2)
        lat1.append(t1 - t0)
        lat2.append(t2 - t0)
        log.info("%s\n  REF: %s\n  1-pass: %s\n  2-pass: %s", wav.name, refs[-1], hyp1, hyp2)
    res = {
        "clips": len(refs),
        "words": sum(len(r.split()) for r in refs),
        "audio_seconds": audio_s,
        "one_pass": {
            "wer": jiwer.wer(refs, one),
            "cer": jiwer.cer(refs, one),
            "final_latency_ms_mean": 1000 * float(np.mean(lat1)),
            "final_latency_ms_max": 1000 * float(np.max(lat1)),
        },
        "two_pass": {
            "wer": jiwer.wer(refs, two),
            "cer": jiwer.cer(refs, two),
            "final_latency_ms_mean": 1000 * float(np.mean(lat2)),
            "final_latency_ms_max": 1000 * float(np.max(lat2)),
        },
    }
    return res


def main(argv=None) -> int:
    import json

    p = argparse.ArgumentParser(
        prog="python -m training.eval_two_pass",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=Path,
        default=ROOT / "model_repository" / "acoustic_model" / "1" / "model.onnx",
    )
    p.add_argument(
        "--whisper",
        type=Path,
        default=ROOT / "build" / "whisper_onnx",
        help="directory from python -m streamasr.artifacts.export_whisper",
    )
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    needed = ("whisper_encoder.onnx", "whisper_decoder.onnx", "vocabulary.txt", "config.json")
    if not all((a.whisper / n).exists() for n in needed):
        from streamasr.artifacts.export_whisper import export

        export(a.whisper)
    res = run(a.model, a.whisper, a.threads)
    log.info("result:\n%s", json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
