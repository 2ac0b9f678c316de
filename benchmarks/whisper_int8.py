"""Whisper re-decoder float vs int8 graphs (streamasr/artifacts/quantize_whisper.py): WER and CPU.

    python -m benchmarks.whisper_int8 --int8 DIR [--float model_repository/final_pass/1]

In process, no server: each assets/eval clip decoded whole (as a final is) by both
folders' ``WhisperRedecoder`` (one thread), then the clip's second half after a prompt of
the first half's words (as an interim refresh is).  Reports corpus WER, CPU seconds per
clip (``time.process_time``), and the encoder's and one decoder step's CPU time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from streamasr.core.evaluation import load_eval_set, normalize, wer_cer
from streamasr.core.features import silence_frame
from streamasr.core.whisper_redecoder import WhisperRedecoder
from streamasr.protocol.contract import FeatureSpec

log = logging.getLogger("benchmarks.whisper_int8")

FLOAT_DIR = Path("model_repository/final_pass/1")
#: Repeats of the encoder / decoder-step timing (median taken).
TIMING_REPEATS = 5
ENCODER_FRAMES = 1000


def clips() -> tuple[list[np.ndarray], list[str]]:
    from training.whisper import log_mel

    from streamasr_client.audio import load_audio

    items = load_eval_set()
    return [log_mel(load_audio(i.audio_path, 16000)) for i in items], [i.reference for i in items]


def measure(folder: Path, feats: list[np.ndarray], refs: list[str]) -> dict:
    r = WhisperRedecoder(folder, threads=1)
    silence = silence_frame(FeatureSpec())
    t0 = time.process_time()
    whole = [normalize(r.transcribe_many([f], silence)[0].text) for f in feats]
    cpu_whole = (time.process_time() - t0) / len(feats)
    tails, tails_cpu = [], 0.0
    for f in feats:
        half = len(f) // 2
        head = r.transcribe_many([f[:half]], silence)[0].text
        said = normalize(head).split()[:-1]  # the last word may straddle the cut
        t1 = time.process_time()
        (d,) = r.transcribe_many(
            [f[half:]], silence, prompts=[r.encode_prompt(said)], whole_window_retry=False
        )
        tails_cpu += time.process_time() - t1
        tails.append(" ".join(said + normalize(d.text).split()))
    mel = np.zeros((1, ENCODER_FRAMES, 80), np.float32)
    enc = []
    for _ in range(TIMING_REPEATS):
        t1 = time.process_time()
        _, ck, cv = r.enc.run(None, {"mel": mel})
        enc.append(time.process_time() - t1)
    L, B, h, _, dh = ck.shape
    pk = pv = np.zeros((L, B, h, 0, dh), np.float32)
    toks = np.array([[50257, 50362]], np.int64)
    _, pk, pv = r.dec.run(
        None, {"tokens": toks, "cross_k": ck, "cross_v": cv, "past_k": pk, "past_v": pv}
    )
    step = []
    for _ in range(TIMING_REPEATS):
        t1 = time.process_time()
        r.dec.run(
            None,
            {"tokens": toks[:, 1:], "cross_k": ck, "cross_v": cv, "past_k": pk, "past_v": pv},
        )
        step.append(time.process_time() - t1)
    return {
        "folder": str(folder),
        "bytes": sum(
            (folder / g).stat().st_size for g in ("whisper_encoder.onnx", "whisper_decoder.onnx")
        ),
        "wer_whole": round(wer_cer(refs, whole)["wer"], 4),
        "wer_prompted_tail": round(wer_cer(refs, tails)["wer"], 4),
        "cpu_s_per_clip_whole": round(cpu_whole, 3),
        "cpu_s_per_tail": round(tails_cpu / len(feats), 3),
        "encoder_10s_cpu_ms": round(1000 * float(np.median(enc)), 1),
        "decoder_step_cpu_ms": round(1000 * float(np.median(step)), 2),
        "hyps_whole": whole,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.whisper_int8", description=__doc__)
    p.add_argument("--float", dest="float_dir", type=Path, default=FLOAT_DIR)
    p.add_argument("--int8", type=Path, required=True)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    feats, refs = clips()
    out = {"clips": len(feats), "loadavg_start": os.getloadavg()[0]}
    for name, d in (("float", a.float_dir), ("int8", a.int8)):
        out[name] = measure(d, feats, refs)
        log.info("%s: %s", name, {k: v for k, v in out[name].items() if k != "hyps_whole"})
    out["loadavg_end"] = os.getloadavg()[0]
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
