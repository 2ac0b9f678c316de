"""`make bench-gpu`: the GPU run, prepared to go unattended (< 8 minutes).

On a machine with an NVIDIA GPU and ``onnxruntime-gpu`` in the venv (the CUDA execution
provider: what Triton's native onnxruntime backend uses on a GPU instance):

1. raw model on the CUDA provider, batch sweep 1..64: ms per call, windows/s;
2. a local server with the acoustic model on the GPU (the production overlay,
   ``streamasr.triton.repository``: ``instance_group KIND_GPU``; the local stand-in backend then
   runs the same ONNX file on the CUDA provider, one session call per batch Triton forms),
   admission control off;
3. paced real-time streams at 160 ms and 400 ms chunks, swept upward until p99 chunk
   latency leaves 100 ms: streams held per chunk size;
4. writes ``benchmarks/results/gpu/<host>-<date>.{json,md}`` (and ``--commit``: commits
   them on the current branch).

Without a GPU it stops at once, saying what is missing (exit 2).

    .venv/bin/python -m benchmarks.gpu                 # the full run, ~6-7 min
    .venv/bin/python -m benchmarks.gpu --check         # only: is this machine ready?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = REPO_ROOT / "model_repository"
RESULTS = Path(__file__).resolve().parent / "results" / "gpu"

DEFAULTS = dict(
    batches=[1, 2, 4, 8, 16, 32, 64],
    chunks_ms=[160.0, 400.0],
    levels=[8, 16, 32, 64, 96, 128, 192, 256],
    duration_s=15.0,
    budget_ms=100.0,
    connections=4,
    raw_seconds=1.0,
)
#: wall-clock budget the defaults are sized for (issue 14: under 8 minutes)
WALL_BUDGET_S = 8 * 60


class NotReady(RuntimeError):
    """This machine cannot run the GPU benchmark; the message says why."""


def parse_list(text: str, kind=float) -> list:
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of numbers: {text!r}") from None
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"need positive numbers, got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--check", action="store_true", help="only check that a GPU is usable")
    p.add_argument(
        "--batches",
        type=lambda t: parse_list(t, int),
        default=DEFAULTS["batches"],
        help="raw batch sizes (comma list)",
    )
    p.add_argument(
        "--chunks-ms",
        type=parse_list,
        default=DEFAULTS["chunks_ms"],
        help="chunk sizes the paced streams send (comma list)",
    )
    p.add_argument(
        "--levels",
        type=lambda t: parse_list(t, int),
        default=DEFAULTS["levels"],
        help="streams to try, upward (comma list)",
    )
    p.add_argument(
        "--duration", type=float, default=DEFAULTS["duration_s"], help="seconds per level"
    )
    p.add_argument(
        "--budget-ms", type=float, default=DEFAULTS["budget_ms"], help="p99 chunk-latency budget"
    )
    p.add_argument("--connections", type=int, default=DEFAULTS["connections"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--commit", action="store_true", help="git commit the result files")
    a = p.parse_args(argv)
    # the run must fit its budget: levels x chunk sizes x (duration + drain) + ~90 s setup
    worst = len(a.levels) * len(a.chunks_ms) * (a.duration + 5) + 90
    if worst > WALL_BUDGET_S:
        p.error(
            f"{len(a.levels)} levels x {len(a.chunks_ms)} chunk sizes x {a.duration:g} s "
            f"could take {worst:.0f} s, over the {WALL_BUDGET_S} s budget"
        )
    return a


def check_gpu() -> dict:
    """What the run needs: an NVIDIA GPU (nvidia-smi) and onnxruntime's CUDA provider
    (pip install onnxruntime-gpu, same version as onnxruntime).  NotReady otherwise."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise NotReady("no GPU: nvidia-smi is not on PATH (this run needs an NVIDIA GPU)")
    q = subprocess.run(
        [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if q.returncode != 0 or not q.stdout.strip():
        raise NotReady(f"nvidia-smi found no usable GPU: {q.stderr.strip() or q.stdout.strip()}")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise NotReady(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
            f"({providers}): install onnxruntime-gpu=={ort.__version__} into the "
            "venv (replacing onnxruntime)"
        )
    return {
        "gpus": [ln.strip() for ln in q.stdout.splitlines() if ln.strip()],
        "onnxruntime": ort.__version__,
        "providers": providers,
    }


def raw_sweep(batches: list[int], seconds: float, progress=print) -> dict:
    import onnxruntime as ort

    from streamasr.protocol.contract import ModelContract

    from . import raw
    from .load import load_clips

    model = REPOSITORY / "acoustic_model" / "1" / "model.onnx"
    contract = ModelContract.from_onnx(model)
    sess = ort.InferenceSession(
        str(model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        raise NotReady(f"the session fell back to {sess.get_providers()[0]}")
    clips = load_clips(contract.sample_rate)
    windows = raw.real_windows(contract, [c.audio for c in clips], max(batches))
    timed = raw.time_batches(sess, windows, batches, min_seconds=seconds, progress=progress)
    return {str(b): v for b, v in timed.items()}


def paced(
    chunks_ms: list[float],
    levels: list[int],
    duration_s: float,
    budget_ms: float,
    connections: int,
    progress=print,
) -> dict:
    from streamasr.core import admission
    from streamasr.triton.repository import production_overlay
    from streamasr.triton.server import ServerConfig, TritonServer, free_ports
    from streamasr_client.stream import AsrConnection

    from . import load, metrics

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="streamasr-gpu-") as tmp:
        repo = Path(tmp) / "model_repository"
        production_overlay(REPOSITORY, repo, gpu=True)
        server = TritonServer(
            ServerConfig(
                model_repository=repo,
                **free_ports(),
                exit_timeout_s=5,
                env={admission.ENV_LIMIT: "0"},
            ),
            log_path=Path(tmp) / "tritonserver.log",
        )
        try:
            server.start(timeout_s=300)
            if "CUDAExecutionProvider" not in server.log_tail(400):
                raise NotReady(
                    "acoustic_model did not load on the CUDA provider:\n" + server.log_tail(40)
                )
            with AsrConnection(server.grpc_url) as c:
                served = c.contract()
            clips = load.load_clips(served.sample_rate)
            probe = load.Probe(server.http_url, server.proc.pid)
            load.run_level(
                server.grpc_url,
                clips,
                1,
                chunk_samples=served.chunk_samples,
                sample_rate=served.sample_rate,
                duration_s=3,
            )  # warm-up
            for ms in chunks_ms:
                chunk = int(round(ms * served.sample_rate / 1000))
                progress(f"paced streams, {ms:g} ms chunks, budget p99 <= {budget_ms:g} ms")
                lv = load.sweep(
                    server.grpc_url,
                    clips,
                    levels,
                    chunk_samples=chunk,
                    sample_rate=served.sample_rate,
                    duration_s=duration_s,
                    connections=connections,
                    budget_ms=budget_ms,
                    probe=probe,
                    progress=progress,
                    beyond=1,
                )
                held = metrics.held_level(lv, budget_ms)
                out[f"{ms:g}"] = {"levels": lv, "held_streams": held["streams"] if held else 0}
        finally:
            server.stop()
    return out


def markdown(res: dict) -> str:
    L = [
        f"# streamasr GPU benchmark — {res['host']} {res['started']}",
        "",
        f"GPU: {', '.join(res['gpu']['gpus'])}; onnxruntime {res['gpu']['onnxruntime']} "
        f"(CUDA execution provider); {res['cpu_count']} CPU cores; wall {res['wall_s']} s.",
        "",
        "## Raw acoustic model, CUDA provider",
        "",
        "| batch | ms/call | windows/s |",
        "|---|---|---|",
    ]
    for b, v in res["raw"].items():
        L.append(f"| {b} | {v['median_ms']:.2f} | {v['windows_per_s']:.0f} |")
    L += [
        "",
        f"## Paced real-time streams, budget p99 ≤ {res['budget_ms']:g} ms",
        "",
        "| chunk ms | streams | p50 ms | p99 ms | errors | mean batch | in budget |",
        "|---|---|---|---|---|---|---|",
    ]
    for ms, r in res["paced"].items():
        for lv in r["levels"]:
            am = (lv.get("server") or {}).get("acoustic_model") or {}
            lat = lv["chunk_latency_ms"]
            L.append(
                f"| {ms} | {lv['streams']} | {lat['p50']} | {lat['p99']} | {lv['errors']} "
                f"| {am.get('mean_batch', '–')} | {'yes' if lv['within_budget'] else 'no'} |"
            )
    L += ["", "| chunk ms | streams held |", "|---|---|"]
    L += [f"| {ms} | **{r['held_streams']}** |" for ms, r in res["paced"].items()]
    return "\n".join(L) + "\n"


def write(res: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    t = datetime.strptime(res["started"], "%Y-%m-%dT%H:%M:%SZ")
    stem = f"{res['host']}-{t.strftime('%Y%m%d-%H%M')}"
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(markdown(res))
    return paths


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    try:
        gpu = check_gpu()
    except NotReady as exc:
        print(f"bench-gpu: not run: {exc}", file=sys.stderr)
        return 2
    print(f"GPU ready: {gpu['gpus']}, onnxruntime {gpu['onnxruntime']}", flush=True)
    if a.check:
        return 0
    res = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "budget_ms": a.budget_ms,
        "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        res["raw"] = raw_sweep(a.batches, DEFAULTS["raw_seconds"])
        res["paced"] = paced(a.chunks_ms, a.levels, a.duration, a.budget_ms, a.connections)
    except NotReady as exc:
        print(f"bench-gpu: stopped: {exc}", file=sys.stderr)
        return 2
    res["wall_s"] = round(time.monotonic() - t0, 1)
    paths = write(res, a.out)
    print(markdown(res))
    print("written: " + ", ".join(str(p) for p in paths))
    if a.commit:
        subprocess.run(["git", "add", *map(str, paths)], cwd=REPO_ROOT, check=True)
        subprocess.run(
            [
                "git",
                "commit",
                "-m",
                f"bench-gpu: {res['gpu']['gpus'][0]}, streams "
                "held "
                + ", ".join(
                    f"{ms} ms chunks: {r['held_streams']}" for ms, r in res["paced"].items()
                ),
            ],
            cwd=REPO_ROOT,
            check=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
