"""The Whisper re-decode's accuracy and CPU by encoder window (streamasr.core.whisper_redecoder).

    python -m benchmarks.encoder_window [--windows NAME,...] [--out FILE.json]

Each utterance is decoded once per window policy, one thread, exactly as ``final_pass``
does (``WhisperRedecoder._decode_group`` + the ``degenerate`` guard + the 30 s fallback):
``assets/eval`` (11 clips), the Asterisk test prompts (``python -m training.asterisk``;
skipped when not built) and 15-30 s concatenations of both.  Reports WER/CER per set
with and without the guard, WER by utterance length, fallbacks and CPU seconds per
utterance.  The table in docs/accuracy.md comes from this.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from streamasr.core.evaluation import load_eval_set, normalize, wer_cer
from streamasr.core.features import silence_frame
from streamasr.core.whisper_redecoder import (
    WINDOW_FRAMES,
    EncoderWindow,
    WhisperRedecoder,
    degenerate,
)
from streamasr.protocol.contract import FeatureSpec

ROOT = Path(__file__).resolve().parent.parent
WHISPER_DIR = ROOT / "model_repository" / "final_pass" / "1"
ASTERISK_TEST = ROOT / "build" / "asterisk" / "test.jsonl"
WINDOWS = {
    "whole30s": EncoderWindow.whole(),
    "min0_b2": EncoderWindow(0, 0, 2, short_frames=0),
    "min0_tail50": EncoderWindow(0, 50, 2, short_frames=0),
    "min300_b100": EncoderWindow(300, 0, 100, short_frames=0),
    "min500_b250": EncoderWindow(500, 0, 250, short_frames=0),
    "min1000_b500": EncoderWindow(1000, 0, 500, short_frames=0),
    "min1500_b500": EncoderWindow(1500, 0, 500, short_frames=0),
    "served": EncoderWindow(),  # min1000_b500, and the whole 30 s for <= 2 s
}
LENGTH_BUCKETS_S = ((0, 2), (2, 5), (5, 10), (10, 30.01))


def utterances() -> dict[tuple[str, str], tuple[np.ndarray, str]]:
    """(set, name) -> (log-mel frames as the server computes them, reference)."""
    from streamasr.artifacts.whisper import log_mel
    from training.train_ctc import load_audio_16k, read_manifest

    items = [(i.name, i.audio_path, i.reference) for i in load_eval_set()]
    ast = (
        [(Path(p).stem, p, t) for p, t in read_manifest(ASTERISK_TEST)]
        if ASTERISK_TEST.exists()
        else []
    )
    longs = [
        (
            "lib-all",
            [x[1] for x in items if x[0].startswith("librivox")],
            " ".join(x[2] for x in items if x[0].startswith("librivox")),
        )
    ]
    rest, k = list(ast), 0
    while rest and k < 6:  # ~15-25 s groups of consecutive prompts
        group, dur = [], 0.0
        while rest and dur < 15 + 2 * k:
            g = rest.pop(0)
            group.append(g)
            dur += len(load_audio_16k(g[1])) / 16000
        longs.append((f"asterisk-long{k}", [g[1] for g in group], " ".join(g[2] for g in group)))
        k += 1
    out = {}
    for n, p, t in items:
        out[("eval", n)] = (log_mel(load_audio_16k(p)), t)
    for n, p, t in ast:
        out[("asterisk", n)] = (log_mel(load_audio_16k(p)), t)
    for n, ps, t in longs:
        out[("long", n)] = (log_mel(np.concatenate([load_audio_16k(p) for p in ps])), t)
    return {k: v for k, v in out.items() if len(v[0]) <= WINDOW_FRAMES}


def measure(window: EncoderWindow, data) -> dict:
    r = WhisperRedecoder(WHISPER_DIR, threads=1, window=window)
    silence = silence_frame(FeatureSpec())
    got = {}
    for key, (f, _) in data.items():
        frames = r.window.frames_for(len(f))
        t0 = time.process_time()
        ((text, toks, stopped),) = r._decode_group([f], frames, silence)
        why = degenerate(toks, text, len(f), stopped) if frames < WINDOW_FRAMES else None
        final = text
        if why:
            ((final, _, _),) = r._decode_group([f], WINDOW_FRAMES, silence)
        got[key] = {
            "raw": normalize(text),
            "text": normalize(final),
            "why": why,
            "cpu": time.process_time() - t0,
            "frames": len(f),
        }

    def agg(keys):
        refs = [data[k][1] for k in keys]
        w = wer_cer(refs, [got[k]["text"] for k in keys])
        w0 = wer_cer(refs, [got[k]["raw"] for k in keys])
        return {
            "n": len(keys),
            "wer": round(100 * w["wer"], 1),
            "cer": round(100 * w["cer"], 1),
            "wer_no_guard": round(100 * w0["wer"], 1),
            "fallbacks": sum(1 for k in keys if got[k]["why"]),
            "cpu_mean_s": round(sum(got[k]["cpu"] for k in keys) / len(keys), 3),
        }

    row = {
        s: agg([k for k in data if k[0] == s])
        for s in ("eval", "asterisk", "long")
        if any(k[0] == s for k in data)
    }
    for lo, hi in LENGTH_BUCKETS_S:
        keys = [k for k in data if lo * 100 <= got[k]["frames"] < hi * 100]
        if keys:
            row[f"len{lo:g}-{hi:g}s"] = agg(keys)
    row["degenerate_examples"] = [
        (f"{k[0]}/{k[1]}", got[k]["why"], got[k]["raw"][:60]) for k in data if got[k]["why"]
    ][:8]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.encoder_window",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--windows", default=",".join(WINDOWS), help=f"comma list of {list(WINDOWS)}")
    p.add_argument("--out", type=Path, default=None, help="JSON result (merged into if it exists)")
    a = p.parse_args(argv)
    data = utterances()
    res = json.loads(a.out.read_text()) if a.out and a.out.exists() else {}
    for name in (w.strip() for w in a.windows.split(",") if w.strip()):
        res[name] = measure(WINDOWS[name], data)
        print(
            name,
            json.dumps({k: v for k, v in res[name].items() if k != "degenerate_examples"}),
            flush=True,
        )
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
