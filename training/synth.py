"""Synthetic training speech from local text with espeak-ng and flite (Debian packages).

    python -m training.synth --out build/synth --sentences 6000

Text: sentences from the Debian ``fortunes`` databases (installed on demand is not done
here: ``apt-get install fortunes fortunes-min``), falling back to any English prose found
on the machine (perl and vim documentation).  Numbers are spelled out.  Each sentence is
spoken once by a random voice: espeak-ng (several accents x voice variants, rate, pitch)
or flite (slt, rms, awb, kal16, kal; duration stretch, pitch).  Writes 16 kHz wav files and
``manifest.jsonl`` ({"audio", "text", "voice"}).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import random
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamasr.evaluation import number_words

log = logging.getLogger("training.synth")

TEXT_SOURCES = ["/usr/share/games/fortunes/*", "/usr/share/perl/5.*/pod/perl*.pod"]
ESPEAK_ACCENTS = ["en-us", "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029",
                  "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
ESPEAK_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3",
                   "+f4", "+f5", "+klatt", "+klatt2", "+klatt3", "+croak", "+whisper"]
FLITE_VOICES = ["slt", "rms", "awb", "kal16", "kal"]



def spell_numbers(text: str) -> str:
    return re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)


def load_sentences(patterns=TEXT_SOURCES, min_words=3, max_words=20) -> list[str]:
    """Clean English sentences: letters, digits (spelled out) and light punctuation only."""
    out = set()
    for pat in patterns:
        for f in glob.glob(pat):
            if "." in Path(f).name and not f.endswith(".pod"):
                continue   # fortune index files (.dat, .u8 links)
            try:
                text = Path(f).read_text(errors="ignore")
            except OSError:
                continue
            for rec in re.split(r"\n%\n|\n\n", text):
                rec = re.sub(r"\s+", " ", rec)
                rec = re.sub(r"\s--\s.*$", "", rec)   # attributions
                for s in re.split(r"(?<=[.!?])\s", rec):
                    s = s.strip().strip('"')
                    if not re.fullmatch(r"[A-Za-z0-9 ,;:'\-]+[.!?]", s) or s.isupper():
                        continue
                    s = " ".join(spell_numbers(s).split())
                    if min_words <= len(s.split()) <= max_words:
                        out.add(s)
    return sorted(out)


def _speak(job) -> dict | None:
    i, text, out_dir, seed = job
    rng = random.Random(seed)
    wav = out_dir / f"s{i:06d}.wav"
    if rng.random() < 0.4:
        voice = rng.choice(FLITE_VOICES)
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={rng.uniform(0.8, 1.3):.2f}",
               "--setf", f"int_f0_target_mean={rng.uniform(80, 200):.0f}", "-t", text,
               "-o", str(wav)]
        name = f"flite:{voice}"
    else:
        voice = rng.choice(ESPEAK_ACCENTS) + rng.choice(ESPEAK_VARIANTS)
        cmd = ["espeak-ng", "-v", voice, "-s", str(rng.randint(120, 200)),
               "-p", str(rng.randint(25, 75)), "-g", str(rng.randint(0, 6)),
               "-w", str(wav), "--", text]
        name = f"espeak:{voice}"
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0 or not wav.exists() or wav.stat().st_size < 4000:
        log.warning("synthesis failed (%s): %s", name, r.stderr.decode()[-200:])
        return None
    return {"audio": wav.name, "text": text, "voice": name}


def build_manifest(out_dir: str | Path, n_sentences: int = 6000, seed: int = 0,
                   workers: int = 2) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    if manifest.exists() and (out_dir / "done").read_text().strip() == str(n_sentences) \
            if (out_dir / "done").exists() else False:
        return manifest
    sents = load_sentences()
    if not sents:
        raise RuntimeError("no training text: apt-get install fortunes fortunes-min")
    random.Random(seed).shuffle(sents)
    sents = sents[:n_sentences]
    log.info("synthesising %d sentences into %s", len(sents), out_dir)
    jobs = [(i, s, out_dir, seed * 1_000_003 + i) for i, s in enumerate(sents)]
    with ThreadPoolExecutor(workers) as ex:
        rows = [r for r in ex.map(_speak, jobs) if r]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out_dir / "done").write_text(str(n_sentences))
    log.info("%d utterances in %s", len(rows), manifest)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("build/synth"))
    p.add_argument("--sentences", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    build_manifest(a.out, a.sentences, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
