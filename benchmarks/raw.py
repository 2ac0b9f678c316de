"""The compute limit: the acoustic model run directly with onnxruntime, no server.

Same ONNX file, same session options as the server's onnxruntime backend
(``intra_op_num_threads`` from acoustic_model's ``intra_op_thread_count`` parameter,
0 = onnxruntime's default of one thread per core; ``inter_op_num_threads`` 1), timed
per batch size.  The inputs are real log-mel windows of the benchmark audio (the model's
cost does not depend on the values, but there is no reason to feed it noise).

    .venv/bin/python -m benchmarks.raw --batches 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from streamasr.protocol.contract import ModelContract

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = REPO_ROOT / "model_repository" / "acoustic_model" / "1" / "model.onnx"
CONFIG = REPO_ROOT / "model_repository" / "acoustic_model" / "config.pbtxt"


def server_intra_op_threads(config: Path = CONFIG) -> int:
    """The ``intra_op_thread_count`` the server's backend uses (0 when not set)."""
    from streamasr.triton.repository import parse_config

    cfg = parse_config(config)
    if "intra_op_thread_count" in cfg.parameters:
        return int(cfg.parameters["intra_op_thread_count"].string_value)
    return 0


def session(model: Path = MODEL, intra_op_threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = (
        server_intra_op_threads() if intra_op_threads is None else intra_op_threads
    )
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def real_windows(contract: ModelContract, audio: list[np.ndarray], n: int) -> np.ndarray:
    """``n`` model windows [n, W, F] cut from the recordings by the streaming features."""
    from streamasr.core.features import whole_file_windows

    out: list[np.ndarray] = []
    for a in audio:
        out += list(whole_file_windows(contract, a).features)
        if len(out) >= n:
            break
    if not out:
        raise ValueError("the audio yields no model window")
    return np.resize(np.stack(out), (n,) + out[0].shape).astype(np.float32)


def time_batches(
    sess,
    windows: np.ndarray,
    batches: list[int],
    *,
    min_seconds: float = 1.0,
    min_runs: int = 3,
    max_runs: int = 200,
    progress=print,
) -> dict[int, dict]:
    """Median seconds per call for each batch size (after one warm-up call)."""
    name = sess.get_inputs()[0].name
    out = {}
    for b in batches:
        x = np.ascontiguousarray(np.resize(windows, (b,) + windows.shape[1:]))
        sess.run(None, {name: x})
        times = []
        t_end = time.perf_counter() + min_seconds
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() < t_end):
            t = time.perf_counter()
            sess.run(None, {name: x})
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        out[b] = {
            "runs": len(times),
            "median_ms": round(med * 1000, 3),
            "min_ms": round(min(times) * 1000, 3),
            "windows_per_s": round(b / med, 2),
        }
        progress(
            f"  raw onnxruntime batch {b:>2}: {med * 1000:7.2f} ms/call  {b / med:8.1f} windows/s"
        )
    return out


def parallel_throughput(
    model: Path,
    windows: np.ndarray,
    batch: int,
    sessions: int,
    *,
    intra_op_threads: int = 1,
    seconds: float = 3.0,
) -> dict:
    """Windows/s of ``sessions`` independent sessions (``intra_op_threads`` each) running
    batch-``batch`` calls at the same time from as many threads (onnxruntime releases
    the GIL): what N model instances could do on this machine if nothing else ran."""
    import threading

    sess = [session(model, intra_op_threads) for _ in range(sessions)]
    name = sess[0].get_inputs()[0].name
    x = np.ascontiguousarray(np.resize(windows, (batch,) + windows.shape[1:]))
    for s in sess:
        s.run(None, {name: x})
    counts = [0] * sessions
    stop = time.perf_counter() + seconds

    def work(i):
        while time.perf_counter() < stop:
            sess[i].run(None, {name: x})
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "sessions": sessions,
        "intra_op_threads": intra_op_threads,
        "batch": batch,
        "calls": sum(counts),
        "windows_per_s": round(sum(counts) * batch / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    from .load import load_clips

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.raw",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--threads", type=int, default=None, help="default: the server's setting")
    p.add_argument("--seconds", type=float, default=1.0, help="timing per batch size")
    a = p.parse_args(argv)
    contract = ModelContract.from_onnx(MODEL)
    clips = load_clips(contract.sample_rate)
    w = real_windows(contract, [c.audio for c in clips], 32)
    time_batches(
        session(intra_op_threads=a.threads),
        w,
        [int(x) for x in a.batches.split(",")],
        min_seconds=a.seconds,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
