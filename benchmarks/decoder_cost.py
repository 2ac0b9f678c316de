"""Cost of each decoding option on real logits, in process: greedy, prefix beam search,
beam + hotwords (and beam + word LM when kenlm and an LM file are given).

    python -m benchmarks.decoder_cost [--audio assets/demo.wav] [--lm file.arpa]

Prints and returns seconds of decoder CPU per second of audio (real-time factor) and
the transcript of each, so the cost is read beside what it buys.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from streamasr.core.decoding import DecoderConfig, EndpointConfig, decode_whole
from streamasr.core.features import whole_file_windows
from streamasr.protocol import final_text
from streamasr.protocol.contract import ModelContract

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "model_repository" / "acoustic_model" / "1" / "model.onnx"
DEMO = ROOT / "assets" / "demo.wav"


def stream_log_probs(model: Path, audio: np.ndarray) -> tuple[ModelContract, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    c = ModelContract.from_session(sess)
    w = whole_file_windows(c, audio)
    lp = sess.run([c.output_name], {c.input_name: w.features})[0]
    return c, w.stream_log_probs(lp)


def measure(contract, frames, options: dict, repeats: int = 3) -> dict:
    cfg = DecoderConfig.from_parameters(options)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        msgs = decode_whole(contract, frames, cfg, EndpointConfig())
        best = min(best, time.process_time() - t0)
    seconds = len(frames) * contract.output_frame_seconds
    return {
        "options": options,
        "cpu_s": round(best, 4),
        "rtf": round(best / seconds, 5),
        "transcript": final_text(msgs),
    }


def run(audio_path: Path = DEMO, lm: Path | None = None, hotwords: str = "") -> list[dict]:
    import onnxruntime as ort

    from streamasr_client.audio import load_audio

    rate = ModelContract.from_session(
        ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    ).sample_rate
    contract, frames = stream_log_probs(MODEL, load_audio(audio_path, rate))
    words = hotwords or ",".join(
        sorted(
            set(
                w
                for w in (
                    audio_path.with_suffix(".txt").read_text().lower().split()
                    if audio_path.with_suffix(".txt").exists()
                    else []
                )
                if len(w) > 6
            )
        )[:3]
    )
    cases = [
        {"decoding": "greedy"},
        {"decoding": "beam", "beam_size": "8"},
        {"decoding": "beam", "beam_size": "16"},
    ]
    if words:
        cases.append({"decoding": "beam", "beam_size": "8", "hotwords": words})
    if lm:
        cases.append({"decoding": "beam", "beam_size": "8", "lm_path": str(lm)})
        served = {"decoding": "beam", "beam_size": "16", "lm_path": str(lm)}
        cases.append(served)  # the served default (ctc_decoder/config.pbtxt)
        cases.append({**served, "beam_min_token_logp": "-1000"})  # without token pruning
    return [measure(contract, frames, c) for c in cases]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--audio", type=Path, default=DEMO)
    p.add_argument("--lm", type=Path, default=None, help="ARPA/KenLM word LM (needs kenlm)")
    p.add_argument("--hotwords", default="", help="default: long words of the reference")
    a = p.parse_args(argv)
    for row in run(a.audio, a.lm, a.hotwords):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
