"""Per-chunk encoder cost: today's windowed encoder vs the streaming encoder (issue 26).

    python -m training.encoder_cost [--batch 8] [--repeats 20]

Both run on one thread with Whisper tiny's weights, in torch eager and as ONNX graphs in
onnxruntime (the windowed encoder as served; the streaming step via
``streaming_encoder.export_step_onnx``), for one 0.4 s chunk per stream:

* **windowed** (served today): the encoder on a whole [left 100 | chunk 40 | right 10]
  window, 75 encoder frames computed for 20 emitted;
* **streaming**: ``StreamingEncoder.step`` on the chunk + right context with a full
  left-context cache, 24 frames computed for 20 emitted, attention over 160 cached frames.

Prints JSON: median wall and CPU milliseconds per chunk (per stream), the ratio, and the
frames computed per frame emitted of each.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from streamasr.artifacts import acoustic, ct2, whisper
from training import streaming_encoder as se


def _onnx_costs(enc, student, window, step_in, state, repeats: int) -> dict[str, float]:
    """The same two encoders as ONNX graphs in onnxruntime (1 thread): seconds per call."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "windowed.onnx"
        with torch.no_grad():
            torch.onnx.export(
                enc,
                (torch.from_numpy(window[:1]),),
                str(wpath),
                dynamo=False,
                opset_version=17,
                input_names=["features"],
                output_names=["enc"],
                dynamic_axes={"features": {0: "batch"}, "enc": {0: "batch"}},
            )
        spath = se.export_step_onnx(student, Path(tmp) / "step.onnx")
        ws = ort.InferenceSession(str(wpath), so, providers=["CPUExecutionProvider"])
        ss = ort.InferenceSession(str(spath), so, providers=["CPUExecutionProvider"])
    feeds = {"features": step_in, **{k: v.numpy() for k, v in state.items()}}
    w_wall, w_cpu = _median(lambda: ws.run(None, {"features": window}), repeats)
    s_wall, s_cpu = _median(lambda: ss.run(None, feeds), repeats)
    return {
        "onnx_windowed_ms_per_chunk": w_wall,
        "onnx_windowed_cpu_ms_per_chunk": w_cpu,
        "onnx_streaming_ms_per_chunk": s_wall,
        "onnx_streaming_cpu_ms_per_chunk": s_cpu,
    }


def _median(fn, repeats: int) -> tuple[float, float]:
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


@torch.no_grad()
def measure(batch: int = 1, repeats: int = 20, left_chunks: int | None = None) -> dict:
    torch.set_num_threads(1)
    contract = acoustic.default_contract()
    enc = whisper.encoder_from_ct2(ct2.load(ct2.packaged_whisper_dir()))
    cfg = se.StreamConfig(
        chunk=contract.output_frames,
        right_features=contract.right_frames,
        **({"left_chunks": left_chunks} if left_chunks is not None else {}),
    )
    student = se.StreamingEncoder(enc, cfg).eval()
    g = torch.Generator().manual_seed(0)
    window = torch.randn(batch, contract.window_frames, contract.features.n_mels, generator=g)
    step_in = torch.randn(
        batch, 2 * cfg.chunk + cfg.right_features, contract.features.n_mels, generator=g
    )
    state = student.initial_state(batch)
    for _ in range(cfg.left_chunks + 1):  # a full cache: steady state
        _, state = student.step(step_in, state)
    w_wall, w_cpu = _median(lambda: enc(window), repeats)
    s_wall, s_cpu = _median(lambda: student.step(step_in, state), repeats)
    windowed_frames = contract.window_frames // contract.subsampling
    onnx = _onnx_costs(enc, student, window.numpy(), step_in.numpy(), state, repeats)
    return {
        **{k: round(1e3 * v / batch, 2) for k, v in onnx.items()},
        "onnx_cpu_ratio_windowed_over_streaming": round(
            onnx["onnx_windowed_cpu_ms_per_chunk"] / onnx["onnx_streaming_cpu_ms_per_chunk"], 2
        ),
        "batch": batch,
        "threads": 1,
        "left_chunks": cfg.left_chunks,
        "windowed_ms_per_chunk": round(1e3 * w_wall / batch, 2),
        "windowed_cpu_ms_per_chunk": round(1e3 * w_cpu / batch, 2),
        "streaming_ms_per_chunk": round(1e3 * s_wall / batch, 2),
        "streaming_cpu_ms_per_chunk": round(1e3 * s_cpu / batch, 2),
        "cpu_ratio_windowed_over_streaming": round(w_cpu / s_cpu, 2),
        "frames_per_emitted_windowed": windowed_frames / cfg.chunk,
        "frames_per_emitted_streaming": se.frames_per_emitted(cfg),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.encoder_cost", description=__doc__)
    p.add_argument("--batch", type=int, action="append", help="repeatable (default 1 and 8)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--left-chunks", type=int)
    a = p.parse_args(argv)
    for b in a.batch or [1, 8]:
        print(json.dumps(measure(b, a.repeats, a.left_chunks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
