"""Sampling profiles of the server's Python processes with py-spy (``pip install py-spy``):
``record --format raw`` for a fixed time on each Python backend stub at once, then the
functions with the most samples (self time, the innermost frame) per process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def parse_raw(text: str) -> tuple[int, Counter, Counter]:
    """(total samples, samples by innermost frame, samples by any frame on the stack)
    from py-spy's raw (collapsed-stack) output."""
    total, leaf, inclusive = 0, Counter(), Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        leaf[_short(frames[-1])] += count
        for f in set(_short(x) for x in frames):
            inclusive[f] += count
    return total, leaf, inclusive


def _short(frame: str) -> str:
    # "process (streamasr/pipeline/ctc_decoder.py:113)" -> "process (ctc_decoder.py:113)"
    name, _, where = frame.partition(" (")
    if where:
        where = where.rstrip(")")
        return f"{name} ({Path(where.rsplit(':', 1)[0]).name}:{where.rsplit(':', 1)[-1]})"
    return frame


def start(
    pids: dict[int, str], seconds: float, out_dir: Path
) -> list[tuple[str, Path, subprocess.Popen]]:
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    running = []
    for pid, label in pids.items():
        path = out_dir / f"{label}.txt"
        p = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "50",
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        running.append((label, path, p))
    return running


def finish(running, top: int = 6) -> dict:
    out = {}
    for label, path, p in running:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0 or not path.exists():
            out[label] = {"error": (err or b"").decode(errors="replace")[-300:]}
            continue
        total, leaf, inclusive = parse_raw(path.read_text())
        out[label] = {
            "samples": total,
            "self": [[f, round(n / total, 3)] for f, n in leaf.most_common(top)] if total else [],
            "inclusive": [[f, round(n / total, 3)] for f, n in inclusive.most_common(top)]
            if total
            else [],
        }
    return out
