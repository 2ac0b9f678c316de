"""Peer baseline for accuracy: CMU PocketSphinx (PyPI ``pocketsphinx==5.1.1``) on the
project's evaluation set.

    .venv/bin/python -m benchmarks.peer_pocketsphinx                 # per-clip REF/HYP + totals
    .venv/bin/python -m benchmarks.peer_pocketsphinx --json out.json # also write the result dict
    .venv/bin/python -m benchmarks.peer_pocketsphinx -q              # totals only

Each clip of ``streamasr.core.evaluation.load_eval_set()`` (assets/eval/) is decoded as one whole
utterance (``start_utt`` / ``process_raw(full_utt=True)`` / ``end_utt``) from 16 kHz mono int16
samples, with the wheel's bundled en-us acoustic model, language model and dictionary, no
options changed. The hypotheses are scored with ``streamasr.core.evaluation.wer_cer`` (the same
normaliser as every other system in the benchmarks). Decode time is wall time of the three
calls above, per clip, on one thread, and the process CPU time they took (``rtf_cpu``: less
sensitive to other work on a shared machine than the wall-clock ``rtf``); decoder construction
(model loading) is reported apart.

``make bench`` runs it next to the accuracy step (``run_step``): a missing ``pocketsphinx``
is recorded as skipped with the reason, not left out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from streamasr.core.evaluation import EvalItem, load_eval_set, wer_cer

log = logging.getLogger("benchmarks.peer_pocketsphinx")

SAMPLE_RATE = 16000
PACKAGE = "pocketsphinx"
PINNED = "5.1.1"  # requirements-dev.txt


def unavailable() -> str | None:
    """None when pocketsphinx imports; otherwise why not (for a recorded skip)."""
    try:
        import pocketsphinx  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return (
            f"{PACKAGE} not importable ({type(exc).__name__}: {exc}); "
            f"`.venv/bin/pip install {PACKAGE}=={PINNED}` (requirements-dev.txt)"
        )
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def make_decoder():
    """PocketSphinx with its defaults (bundled en-us model, LM, dictionary) at 16 kHz; its
    own log output silenced (it writes to stderr by default)."""
    from pocketsphinx import Decoder

    return Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")


def model_files(decoder) -> dict[str, str]:
    cfg = decoder.config
    return {k: os.path.basename(str(cfg[k])) for k in ("hmm", "lm", "dict")}


def load_pcm16(path: Path) -> np.ndarray:
    """A file as 16 kHz mono int16 samples (read as-is when already in that format)."""
    import soundfile as sf

    info = sf.info(str(path))
    if info.samplerate == SAMPLE_RATE and info.channels == 1 and info.subtype == "PCM_16":
        return sf.read(str(path), dtype="int16", always_2d=False)[0]
    from streamasr_client.audio import load_audio

    audio = load_audio(path, SAMPLE_RATE)
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def transcribe(decoder, pcm: np.ndarray) -> str:
    """One whole-file utterance -> its best hypothesis ("" when there is none)."""
    decoder.start_utt()
    decoder.process_raw(
        np.ascontiguousarray(pcm, dtype=np.int16).tobytes(), no_search=False, full_utt=True
    )
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def run(items: list[EvalItem] | None = None, *, limit: int | None = None, decoder=None) -> dict:
    """Decode the eval set (or ``items``) and score it; returns the result dict."""
    if items is None:
        items = load_eval_set()
    if limit:
        items = items[:limit]
    if not items:
        raise ValueError("empty evaluation set")
    t0 = time.perf_counter()
    if decoder is None:
        decoder = make_decoder()
    init_s = time.perf_counter() - t0
    refs, hyps, per_clip = [], [], []
    audio_s = decode_s = cpu_s = 0.0
    for it in items:
        pcm = load_pcm16(it.audio_path)
        t, c = time.perf_counter(), time.process_time()
        hyp = transcribe(decoder, pcm)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        secs = len(pcm) / SAMPLE_RATE
        audio_s += secs
        decode_s += dt
        cpu_s += dc
        refs.append(it.reference)
        hyps.append(hyp)
        one = wer_cer([it.reference], [hyp])
        per_clip.append(
            {
                "name": it.name,
                "ref": it.reference,
                "hyp": hyp,
                "audio_s": round(secs, 3),
                "decode_s": round(dt, 3),
                "decode_cpu_s": round(dc, 3),
                "wer": round(one["wer"], 4),
            }
        )
        log.info(
            "%s (%.1f s audio, %.2f s decode, WER %.3f)\n  REF: %s\n  HYP: %s",
            it.name,
            secs,
            dt,
            one["wer"],
            it.reference,
            hyp,
        )
    score = wer_cer(refs, hyps)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "system": f"{PACKAGE} {version()}",
        "model": model_files(decoder),
        "decoding": "whole file, one utterance per clip, default config, 16 kHz mono int16",
        "eval_set": "streamasr.core.evaluation.load_eval_set()",
        "clips": len(items),
        "words": score["words"],
        "wer": round(score["wer"], 4),
        "cer": round(score["cer"], 4),
        "substitutions": score["substitutions"],
        "deletions": score["deletions"],
        "insertions": score["insertions"],
        "audio_s": round(audio_s, 2),
        "decode_s": round(decode_s, 2),
        "rtf": round(decode_s / audio_s, 3) if audio_s else None,
        "decode_cpu_s": round(cpu_s, 2),
        "rtf_cpu": round(cpu_s / audio_s, 3) if audio_s else None,
        "init_s": round(init_s, 2),
        "loadavg_after": load,
        "per_clip": per_clip,
    }


def summary(res: dict) -> str:
    return (
        f"{res['system']} on {res['clips']} clips ({res['words']} words, "
        f"{res['audio_s']:.1f} s): WER {100 * res['wer']:.1f} %, CER {100 * res['cer']:.1f} %, "
        f"decode {res['decode_s']:.1f} s wall = RTF {res['rtf']:.2f}, "
        f"{res['decode_cpu_s']:.1f} s CPU = RTF {res['rtf_cpu']:.2f} (model load "
        f"{res['init_s']:.1f} s, load avg {(res.get('loadavg_after') or ['?'])[0]})"
    )


def run_step(progress=print) -> dict:
    """For ``make bench``: the result, ``{"skipped": reason}`` when pocketsphinx is
    missing, or ``{"error": ...}`` when it fails."""
    reason = unavailable()
    if reason:
        progress(f"  peer pocketsphinx skipped: {reason}")
        return {"skipped": reason}
    try:
        res = run()
    except Exception as exc:  # recorded, not hidden: the rest of the bench still runs
        progress(f"  peer pocketsphinx failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}
    progress("  peer " + summary(res))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peer_pocketsphinx",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="write the result dict here")
    p.add_argument("--limit", type=int, default=None, help="only the first N clips")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="totals only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.WARNING if a.quiet else logging.INFO,
        format="%(message)s",
    )
    reason = unavailable()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    res = run(limit=a.limit)
    print(summary(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
