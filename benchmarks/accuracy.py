"""Accuracy through the real server: each eval utterance streamed (model-sized chunks over
the gRPC stream) and sent whole to `offline_asr`; WER/CER of both against the references.

The eval set is ``streamasr.core.evaluation.load_eval_set()`` when that module exists (the data
helper's); until then the LibriVox clips shipped with pocketsphinx and their
``transcription`` file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from streamasr.protocol import final_text
from streamasr_client.audio import load_audio
from streamasr_client.stream import AsrConnection

LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")


def normalize(text: str) -> str:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return " ".join(text.split())


def librivox_eval_set(sample_rate: int) -> list[tuple[str, np.ndarray, str]]:
    refs = {}
    for line in (LIBRIVOX_DIR / "transcription").read_text().splitlines():
        m = re.match(r"\s*(.*?)\s*\(([^)]+)\)\s*$", line)
        if m:
            refs[m.group(2)] = m.group(1).replace("<s>", "").replace("</s>", "").strip()
    return [
        (uid, load_audio(LIBRIVOX_DIR / f"{uid}.wav", sample_rate), text)
        for uid, text in sorted(refs.items())
        if (LIBRIVOX_DIR / f"{uid}.wav").exists()
    ]


def _as_triples(items, sample_rate: int) -> list[tuple[str, np.ndarray, str]]:
    """Accept the eval set's items as objects or mappings with an id, audio (array or
    path) and reference text."""
    out = []
    for i, it in enumerate(items):
        get = (
            (lambda k, it=it: it.get(k))
            if isinstance(it, dict)
            else (lambda k, it=it: getattr(it, k, None))
        )
        uid = get("id") or get("name") or get("uid") or str(i)
        text = get("text") or get("reference") or get("transcript")
        audio = get("audio")
        if audio is None:
            path = get("path") or get("audio_path") or get("wav")
            audio = load_audio(path, sample_rate)
        else:
            rate = get("sample_rate") or sample_rate
            if rate != sample_rate:
                from streamasr_client.audio import resample

                audio = resample(np.asarray(audio, np.float32), rate, sample_rate)
        if text is None:
            raise ValueError(f"eval item {uid!r} has no reference text")
        out.append((str(uid), np.asarray(audio, np.float32), str(text)))
    return out


def eval_set(sample_rate: int) -> tuple[str, list[tuple[str, np.ndarray, str]]]:
    try:
        from streamasr.core import evaluation
    except ImportError:
        return "pocketsphinx LibriVox clips", librivox_eval_set(sample_rate)
    return "streamasr.core.evaluation.load_eval_set()", _as_triples(
        evaluation.load_eval_set(), sample_rate
    )


def wer_cer(refs: list[str], hyps: list[str]) -> dict:
    try:
        from streamasr.core.evaluation import wer_cer as ev
    except ImportError:
        ev = None
    if ev is not None:
        r = ev(refs, hyps)
        if isinstance(r, dict):
            return {"wer": round(float(r["wer"]), 4), "cer": round(float(r["cer"]), 4)}
        w, c = r
        return {"wer": round(float(w), 4), "cer": round(float(c), 4)}
    import jiwer

    refs_n = [normalize(x) for x in refs]
    hyps_n = [normalize(x) for x in hyps]
    return {"wer": round(jiwer.wer(refs_n, hyps_n), 4), "cer": round(jiwer.cer(refs_n, hyps_n), 4)}


def run(
    url: str, chunk_samples: int, sample_rate: int, *, progress=print, limit: int | None = None
) -> dict:
    name, items = eval_set(sample_rate)
    if limit:
        items = items[:limit]
    if not items:
        return {"error": f"eval set {name} is empty"}
    refs, streamed, offline = [], [], []
    t0 = time.perf_counter()
    with AsrConnection(url) as conn:
        for uid, audio, text in items:
            s = conn.open_session()
            pieces = [audio[i : i + chunk_samples] for i in range(0, len(audio), chunk_samples)]
            for p in pieces[:-1]:
                s.send(p)
            s.close(pieces[-1])
            s.wait(120)
            if s.errors:
                return {"error": f"{uid}: {s.errors[0]}"}
            conn.forget(s)
            refs.append(text)
            streamed.append(s.transcript)
            offline.append(final_text(conn.transcribe_file(audio)))
    out = {
        "eval_set": name,
        "utterances": len(items),
        "audio_s": round(sum(len(a) for _, a, _ in items) / sample_rate, 1),
        "streamed": wer_cer(refs, streamed),
        "offline": wer_cer(refs, offline),
        "streamed_equals_offline": sum(
            normalize(a) == normalize(b) for a, b in zip(streamed, offline)
        ),
        "wall_s": round(time.perf_counter() - t0, 1),
        "examples": [
            {"id": items[i][0], "ref": refs[i], "streamed": streamed[i], "offline": offline[i]}
            for i in range(min(3, len(items)))
        ],
    }
    progress(
        f"  accuracy on {len(items)} utterances: streamed WER {out['streamed']['wer']}, "
        f"offline WER {out['offline']['wer']}"
    )
    return out
