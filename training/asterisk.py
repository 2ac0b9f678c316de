"""Real transcribed speech from Debian: the Asterisk core prompts (one US-English speaker).

    python -m training.asterisk --out build/asterisk

Needs ``apt-get install asterisk-core-sounds-en-g722 asterisk-core-sounds-en ffmpeg``.
The audio is raw G.722 (16 kHz wideband, real 4-8 kHz content); ffmpeg decodes it to
16-bit WAV.  The transcript of every prompt is ``core-sounds-en.txt.gz`` (``name: text``).

Licence: the recordings are CC-BY-SA-3.0 (Digium / Allison Smith).  Weights trained on
them are arguably an adaptation, so a head trained with ``--asterisk`` is distributed
under the same CC-BY-SA-3.0 terms, with attribution (training/README.md says so, and the
model's contract ``license`` field names it).

Prompts are kept only when their text can be written in the CTC alphabet without
guessing how it was read: bracketed notes (``[beep tone]``), keypad symbols (``*``,
``#``), decimals and digit strings of three or more digits (read digit by digit or as a
number? the text does not say) are dropped.  One- and two-digit numbers are spelled
with the evaluation's speller.

Split by a hash of the prompt name (stable when prompts are added): ``train`` (70 %),
``dev`` (10 %, for choosing decoder weights) and ``test`` (20 %, never trained or tuned on).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from streamasr.artifacts import acoustic
from streamasr.core.evaluation import normalize

log = logging.getLogger("training.asterisk")

TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
SPLITS = (("test", 0.20), ("dev", 0.10), ("train", 0.70))
LICENSE = acoustic.ASTERISK_LICENSE

_UNREADABLE = re.compile(r"[\[\]*#]|\d[.,:]\d|\d{3,}|\d[a-zA-Z]|[a-zA-Z]\d")


def read_transcripts(path: Path = TRANSCRIPTS) -> dict[str, str]:
    """``name -> text`` from the package's transcript list (comments and blanks skipped)."""
    out = {}
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            out[name.strip()] = text.strip()
    return out


def usable_text(text: str) -> str | None:
    """The prompt's text in the CTC alphabet, or None when how it was read is unclear."""
    if not text or _UNREADABLE.search(text):
        return None
    norm = normalize(text)
    return norm or None


def split_of(name: str) -> str:
    """Deterministic split from the prompt name's hash."""
    x = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edge = 0.0
    for split, share in SPLITS:
        edge += share
        if x < edge:
            return split
    return SPLITS[-1][0]


def decode_g722(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "g722",
            "-i",
            str(src),
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            str(dst),
        ],
        check=True,
    )


def build_manifests(
    out_dir: Path, sounds: Path = SOUNDS, transcripts: Path = TRANSCRIPTS
) -> dict[str, Path]:
    """Decode every usable prompt to ``out_dir/wav`` and write ``{train,dev,test}.jsonl``."""
    if not transcripts.exists() or not sounds.is_dir():
        raise FileNotFoundError(
            "Asterisk prompts not installed: apt-get install asterisk-core-sounds-en-g722 "
            "asterisk-core-sounds-en ffmpeg"
        )
    texts = read_transcripts(transcripts)
    rows: dict[str, list[dict]] = {s: [] for s, _ in SPLITS}
    jobs = []
    skipped = 0
    for name, raw in sorted(texts.items()):
        src = sounds / f"{name}.g722"
        text = usable_text(raw)
        if text is None or not src.exists():
            skipped += 1
            continue
        rel = Path("wav") / f"{name.replace('/', '__')}.wav"
        jobs.append((src, out_dir / rel))
        rows[split_of(name)].append(
            {"audio": str(rel), "text": text, "name": name, "voice": "asterisk:allison"}
        )
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: None if j[1].exists() else decode_g722(*j), jobs))
    out = {}
    for split, items in rows.items():
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        out[split] = path
        log.info("%s: %d prompts", split, len(items))
    log.info("skipped %d prompts whose reading is unclear or whose audio is missing", skipped)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.asterisk",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build/asterisk"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    build_manifests(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
