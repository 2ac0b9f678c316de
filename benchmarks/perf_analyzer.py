"""Triton's own perf_analyzer on `streaming_asr`, fed real audio chunks.

PyPI's `perf-analyzer` needs a newer glibc than this machine has; the
``tritonclient==2.46.0`` manylinux1 wheel carries a binary that runs (see
/work/shared/notes/triton-local.md).  ``ensure_binary()`` downloads that wheel with pip
into ``build/perf_analyzer/`` (not committed), extracts only ``perf_analyzer`` and links
the two libraries it needs (libb64, libcudart) from the ``nvidia-pytriton`` wheel.

The input data is one data stream per sequence: the benchmark recordings cut into the
model's chunks (``AUDIO`` FP32 ``[chunk]``), so every perf_analyzer sequence is a real
utterance, started/ended by perf_analyzer's sequence flags, over ``--streaming`` gRPC.
perf_analyzer sends each sequence's next request when the previous one is answered
(closed loop, not real-time pace): its figures are the server's throughput and the
latency at a given concurrency, beside our paced load.

    .venv/bin/python -m benchmarks.perf_analyzer --url 127.0.0.1:8001 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / "build" / "perf_analyzer"
WHEEL_VERSION = "2.46.0"
MEMBER = f"tritonclient-{WHEEL_VERSION}.data/data/bin/perf_analyzer"
# library perf_analyzer links against -> name prefix of the copy nvidia-pytriton ships
NEEDED_LIBS = {"libb64.so.0d": "libb64-", "libcudart.so.12": "libcudart-"}


def _pytriton_libs() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"


def ensure_binary(work: Path = WORK, progress=print) -> tuple[Path, Path]:
    """(perf_analyzer binary, folder for LD_LIBRARY_PATH), fetched once into ``work``."""
    binary, libdir = work / "bin" / "perf_analyzer", work / "lib"
    if not binary.exists():
        wheels = sorted(glob.glob(str(work / f"tritonclient-{WHEEL_VERSION}-*.whl")))
        if not wheels:
            progress(f"  downloading tritonclient=={WHEEL_VERSION} (for perf_analyzer) ...")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--platform",
                    "manylinux1_x86_64",
                    f"tritonclient=={WHEEL_VERSION}",
                    "-d",
                    str(work),
                ],
                check=True,
            )
            wheels = sorted(glob.glob(str(work / f"tritonclient-{WHEEL_VERSION}-*.whl")))
        binary.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z, open(binary, "wb") as f:
            f.write(z.read(MEMBER))
        binary.chmod(0o755)
    libdir.mkdir(parents=True, exist_ok=True)
    libs = _pytriton_libs()
    for name, prefix in NEEDED_LIBS.items():
        link = libdir / name
        if not link.exists():
            found = sorted(libs.glob(prefix + "*"))
            if not found:
                raise FileNotFoundError(f"no {prefix}* in {libs} for perf_analyzer's {name}")
            link.symlink_to(found[0])
    return binary, libdir


def input_data(clips: list[np.ndarray], chunk: int, path: Path) -> dict:
    """Write perf_analyzer's ``--input-data`` JSON: one data stream per recording, one
    step per full chunk (a trailing partial chunk is dropped: perf_analyzer needs one
    shape per input)."""
    streams = []
    for a in clips:
        n = len(a) // chunk
        if n == 0:
            continue
        streams.append(
            [
                {
                    "AUDIO": {
                        "content": [round(float(x), 6) for x in a[i * chunk : (i + 1) * chunk]],
                        "shape": [chunk],
                    }
                }
                for i in range(n)
            ]
        )
    if not streams:
        raise ValueError("no recording holds a full chunk")
    path.write_text(json.dumps({"data": streams}))
    return {"streams": len(streams), "steps": sum(len(s) for s in streams), "chunk": chunk}


def parse_csv(text: str) -> list[dict]:
    """perf_analyzer's ``-f`` CSV as rows of numbers (latencies in ms)."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        row = {}
        for k, v in r.items():
            try:
                x = float(v)
            except (TypeError, ValueError):
                row[k] = v
                continue
            row[k] = round(x / 1000.0, 3) if k.endswith("latency") or "p9" in k or "p50" in k else x
        rows.append(row)
    return rows


def run(
    url: str,
    clips: list[np.ndarray],
    chunk: int,
    concurrency: list[int],
    *,
    out_dir: Path,
    measurement_ms: int = 4000,
    timeout_s: float = 240,
    progress=print,
) -> dict:
    binary, libdir = ensure_binary(progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = WORK / "input_data.json"
    info = input_data(clips, chunk, data)
    csv_path = WORK / "perf_analyzer.csv"
    lo, hi = min(concurrency), max(concurrency)
    step = concurrency[1] - concurrency[0] if len(concurrency) > 1 else 1
    cmd = [
        str(binary),
        "-m",
        "streaming_asr",
        "-u",
        url,
        "-i",
        "grpc",
        "--streaming",
        "--input-data",
        str(data),
        "--concurrency-range",
        f"{lo}:{hi}:{step}",
        "--sequence-id-range",
        "1000000:2000000",
        # a shared 2-core machine is never "stable" by the default 10 %: accept what
        # is measured (the load average is recorded beside it)
        "--measurement-interval",
        str(measurement_ms),
        "--max-trials",
        "4",
        "--stability-percentage",
        "999",
        "-f",
        str(csv_path),
    ]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libdir), str(_pytriton_libs()), env.get("LD_LIBRARY_PATH", "")) if p
    )
    progress("  " + " ".join(cmd[1:]))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {
            "command": cmd[1:],
            "error": f"timed out after {timeout_s:.0f} s",
            "stdout_tail": (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else "",
        }
    result = {
        "command": " ".join(["perf_analyzer", *cmd[1:]]),
        "input": info,
        "returncode": proc.returncode,
        "stdout_tail": proc.stdout[-3000:],
    }
    if proc.returncode != 0:
        result["error"] = (proc.stderr or proc.stdout)[-2000:]
        return result
    result["rows"] = parse_csv(csv_path.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    from streamasr_client.stream import AsrConnection

    from .load import _check_loopback, load_clips

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.perf_analyzer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--concurrency", default="1,2,3,4")
    p.add_argument("--measurement-ms", type=int, default=4000)
    p.add_argument("--out", type=Path, default=WORK)
    a = p.parse_args(argv)
    _check_loopback(a.url)
    with AsrConnection(a.url) as c:
        contract = c.contract()
    clips = [c.audio for c in load_clips(contract.sample_rate)]
    r = run(
        a.url,
        clips,
        contract.chunk_samples,
        [int(x) for x in a.concurrency.split(",")],
        out_dir=a.out,
        measurement_ms=a.measurement_ms,
    )
    print(json.dumps(r, indent=1))
    return 0 if "error" not in r else 1


if __name__ == "__main__":
    raise SystemExit(main())
