"""`make bench`: start a real local Triton server and measure it.

    .venv/bin/python -m benchmarks.run            # full run (~10-15 min on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # ~3 min

Steps (progress is printed as they run):
1. paced load: N real-time streams, N swept upward until the p99 chunk latency leaves the
   budget (benchmarks/load.py);
2. throughput limit: closed-loop streams, the batch sizes Triton forms, and the same ONNX
   model run directly with onnxruntime at those batch sizes (benchmarks/raw.py) -> ratio;
   per-request cost of the Python steps from Triton's statistics API;
3. perf_analyzer on `streaming_asr` with real audio chunks (benchmarks/perf_analyzer.py);
4. WER/CER streamed vs offline (benchmarks/accuracy.py); two-pass finals vs one-pass, WER
   and final latency (benchmarks/two_pass.py); last word's end -> final per mode at 1 and
   8 paced streams (benchmarks/finals.py); and the accuracy peer: PocketSphinx on the
   same eval set (benchmarks/peer_pocketsphinx.py; recorded as skipped if missing);
5. peer baseline: re-transcribe the growing buffer every chunk (benchmarks/naive.py);
6. py-spy profile of the server's Python processes under closed-loop load;
7. overload: a fresh server with admission control on (the repository's limit) offered
   3x that many paced streams (benchmarks/overload.py): admitted streams' latency and
   transcripts, refusals, memory back to baseline;
8. hostile clients: docker/serve (gateway + tritonserver), one attacker class at a time
   beside 8 paced WebSocket bystanders (benchmarks/hostile.py; also written to
   results/hostile/<date-time>/).

Writes benchmarks/results/<host>-<date>.json / .md / *.png and latest.md.  Everything
runs on loopback; a temporary copy of the model repository is used only when
``--intra-op-threads`` or ``--acoustic-instances`` change the acoustic model's config.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime, timezone
from pathlib import Path

from streamasr.core import admission
from streamasr.protocol.contract import ModelContract
from streamasr.triton import repository
from streamasr.triton.server import ServerConfig, ServerError, TritonServer, free_ports
from streamasr_client.stream import AsrConnection

from . import (
    accuracy,
    finals,
    hostile,
    load,
    metrics,
    naive,
    overload,
    peer_pocketsphinx,
    perf_analyzer,
    profile,
    raw,
    report,
    two_pass,
)
from .result import (
    BenchResult,
    RunInfo,
    ServerStats,
    Target,
)
from .server_stats import loadavg, process_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = REPO_ROOT / "model_repository"
RESULTS = Path(__file__).resolve().parent / "results"
LOG = REPO_ROOT / "build" / "bench-tritonserver.log"  # kept after the run (not committed)

FULL = dict(
    levels=[1, 2, 4, 8, 12, 16, 18, 20, 22, 24, 28, 32],
    duration=20.0,
    sat_streams=16,
    sat_s=15.0,
    raw_seconds=1.0,
    pa_concurrency=[1, 2, 4],
    pa_ms=4000,
    naive_s=15.0,
    profile_s=10,
    two_pass_concurrency=(4, 8, 12),
    finals_streams=(1, 8),
    overload_s=60.0,
    overload_settle_s=60.0,
)
QUICK = dict(
    levels=[1, 2, 4, 8],
    duration=8.0,
    sat_streams=12,
    sat_s=8.0,
    raw_seconds=0.5,
    pa_concurrency=[1, 2],
    pa_ms=2500,
    naive_s=6.0,
    profile_s=5,
    two_pass_concurrency=(),
    finals_streams=(1,),
    overload_s=15.0,
    overload_settle_s=20.0,
)


def say(msg: str) -> None:
    print(msg, flush=True)


def recorded(step: str, fn, *args, **kw) -> dict:
    """A step's result, or its failure recorded (not hidden): the rest of the run goes on."""
    try:
        return fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001
        say(f"  {step} failed: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


def repository_copy(
    tmp: Path,
    intra_op: int | None,
    instances: int | None,
    queue_delay_us: int | None = None,
    feature_instances: int | None = None,
) -> Path:
    """The model repository with acoustic_model's threads / instance count / batching
    delay, or feature_extractor's instance count, changed (edited as protobuf; the ONNX
    file is linked, not copied)."""
    from tritonclient.grpc import model_config_pb2

    dst = repository.copy_repository(REPOSITORY, tmp / "model_repository", link_suffixes=(".onnx",))

    def threads_and_instances(cfg) -> None:
        if intra_op is not None:
            cfg.parameters["intra_op_thread_count"].string_value = str(intra_op)
        if instances is not None:
            del cfg.instance_group[:]
            g = cfg.instance_group.add()
            g.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
            g.count = instances
        if queue_delay_us is not None:
            cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us

    def feature_step(cfg) -> None:
        cfg.instance_group[0].count = feature_instances

    repository.edit_config(dst / "acoustic_model" / "config.pbtxt", threads_and_instances)
    if feature_instances is not None:
        repository.edit_config(dst / "feature_extractor" / "config.pbtxt", feature_step)
    return dst


class Live:
    """The server under test; restarted (and the crash recorded) when it dies."""

    def __init__(self, repo: Path, stats: ServerStats):
        self.repo, self.stats = repo, stats
        self.server: TritonServer | None = None

    def crashed(self, crash: dict) -> None:
        if self.stats.server_crashes is None:
            self.stats.server_crashes = []
        self.stats.server_crashes.append(crash)

    def start(self, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            self.server = TritonServer(
                ServerConfig(
                    model_repository=self.repo,
                    **free_ports(),
                    exit_timeout_s=5,
                    # admission control off: this server measures how many streams fit
                    env={admission.ENV_LIMIT: "0"},
                ),
                log_path=LOG,
            )
            try:
                self.server.start(timeout_s=180)
                break
            except ServerError as exc:
                self.server.stop()
                lines = [
                    ln
                    for ln in str(exc).splitlines()
                    if re.search(r"terminate called|what\(\)|exited", ln)
                ]
                self.crashed(
                    {
                        "phase": f"startup (attempt {attempt})",
                        "log": lines[-4:],
                        "loadavg": loadavg(),
                    }
                )
                say(
                    f"  !! tritonserver failed to start (attempt {attempt}): "
                    f"{' | '.join(lines[-2:])}"
                )
                if attempt == attempts:
                    raise
                time.sleep(3)
        self.url, self.http = self.server.grpc_url, self.server.http_url
        self.probe = load.Probe(self.http, self.server.proc.pid)

    def check(self, phase: str) -> bool:
        """True when the server survived ``phase``; otherwise record why and restart."""
        if self.server.proc.poll() is None:
            return True
        lines = [
            ln.strip()
            for ln in LOG.read_text(errors="replace").splitlines()
            if re.search(r"terminate called|what\(\)|Signal \(|Stub process|error", ln)
        ]
        crash = {
            "phase": phase,
            "exit_code": self.server.proc.returncode,
            "log": lines[-6:],
            "loadavg": loadavg(),
        }
        self.crashed(crash)
        say(
            f"  !! tritonserver died during {phase} (exit {crash['exit_code']}): "
            f"{' | '.join(lines[-3:])}"
        )
        self.server.stop()
        say("  restarting tritonserver for the remaining steps ...")
        self.start()
        return False

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _acoustic(level: dict | None) -> dict:
    return ((level or {}).get("server") or {}).get("acoustic_model") or {}


def acoustic_instances(server: TritonServer) -> int:
    return sum(1 for label in process_tree(server.proc.pid).values() if label == "acoustic_model")


def compute_targets(result: BenchResult, chunk_s: float) -> list[Target]:
    out = []
    cap, rm = result.capacity, result.raw_model
    ov = rm.overhead or {}
    ratio = ov.get("ratio")
    basis = "same batch sizes"
    rac = rm.raw_all_cores or {}
    n_inst = result.run.acoustic_instances or 1
    if n_inst > 1 and ratio is not None and rac.get("windows_per_s"):
        # several model instances run in parallel: one raw session is the wrong yardstick
        ratio = ov["server_windows_per_s"] / rac["windows_per_s"]
        ov["ratio_vs_parallel_raw"] = round(ratio, 3)
        basis = (
            f"{n_inst} instances vs {rac['sessions']} parallel 1-thread raw sessions, "
            f"batch {rac['batch']}"
        )
    out.append(
        Target(
            f"server throughput ≥ 0.85 × raw onnxruntime ({basis})",
            f"{ratio:.2f}" if ratio is not None else "not measured",
            None if ratio is None else bool(ratio >= 0.85),
        )
    )
    held, limit = cap.held_streams, rm.compute_limit_streams
    if limit:
        r = (held or 0) / limit
        cap.held_vs_limit = round(r, 3)
        out.append(
            Target(
                "streams held ≥ 0.8 × compute-limited maximum (the model alone, "
                "server's threads, server's batch sizes)",
                f"{held or 0} of {limit:.1f} ({r:.2f})",
                bool(r >= 0.8),
            )
        )
        allc = rm.compute_limit_streams_all_cores
        if allc:
            out.append(
                Target(
                    "streams held ≥ 0.8 × compute-limited maximum with every "
                    "core running the model (one 1-thread session per core)",
                    f"{held or 0} of {allc:.1f} ({(held or 0) / allc:.2f})",
                    bool((held or 0) / allc >= 0.8),
                )
            )
    for t in (result.latency.overload or {}).get("targets", []):
        out.append(Target(f"3x overload: {t['target']}", t["measured"], t["met"]))
    for t in (result.latency.hostile or {}).get("targets", []):
        out.append(Target(f"hostile {t['class']}: {t['target']}", t["measured"], t["met"]))
    one = next((lv for lv in cap.levels or [] if lv["streams"] == 1), None)
    if one:
        mx = one["onset_interim_ms"].get("max")
        bound = chunk_s * 1000 + 30
        out.append(
            Target(
                f"1 stream: first interim after speech onset ≤ chunk + 30 ms "
                f"({bound:.0f} ms), every session",
                (
                    f"max {mx:.0f} ms, p50 {one['onset_interim_ms']['p50']:.0f} ms "
                    f"(first non-empty text p50 "
                    f"{one['first_text_ms'].get('p50') or float('nan'):.0f} ms)"
                )
                if mx is not None
                else "not measured",
                None if mx is None else bool(mx <= bound),
            )
        )
    out += two_pass.two_pass_targets(result.accuracy.two_pass or {})
    out += finals.targets(result.accuracy.finals or {})
    return out


def profile_summary(saturation: dict | None, profile: dict) -> list[str]:
    lines = []
    sat = saturation or {}
    cpu = (sat.get("cpu") or {}).get("cpu_s") or {}
    total = sum(cpu.values())
    if total:
        share = ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in cpu.items() if v / total >= 0.02
        )
        lines.append(
            f"CPU time at the throughput limit by process: {share} "
            f"({sat['cpu']['cores_busy']:.2f} cores busy of {os.cpu_count()}, "
            f"load avg {sat.get('loadavg_after', ['?'])[0]})."
        )
    for label, p in (profile.get("py_spy") or {}).items():
        if p.get("self"):
            top = "; ".join(f"{f} {100 * s:.0f}%" for f, s in p["self"][:4])
            lines.append(f"py-spy {label} ({p['samples']} samples), self time: {top}")
        elif p.get("error"):
            lines.append(f"py-spy {label}: {p['error'][:150]}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="~3 minute version")
    p.add_argument("--levels", type=load.parse_levels, default=None, help="streams to try")
    p.add_argument("--duration", type=float, default=None, help="seconds per level")
    p.add_argument("--budget-ms", type=float, default=250.0)
    p.add_argument(
        "--connections", type=int, default=2, help="gRPC streams the sessions are spread over"
    )
    p.add_argument("--chunk-ms", type=float, default=None, help="default: the model's chunk")
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="run acoustic_model with this intra_op_thread_count (repository copy)",
    )
    p.add_argument(
        "--acoustic-instances",
        type=int,
        default=None,
        help="run acoustic_model with this many CPU instances (repository copy)",
    )
    p.add_argument(
        "--skip",
        default="",
        help="comma list of: perf_analyzer,accuracy,two_pass,finals,pocketsphinx,naive,profile,"
        "overload,hostile",
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="acoustic_model's dynamic batching delay (repository copy)",
    )
    p.add_argument(
        "--feature-instances",
        type=int,
        default=None,
        help="run feature_extractor with this many instances (repository copy)",
    )
    p.add_argument(
        "--overload-capacity",
        default=None,
        help="admission limit for the overload step: a number, or 'held' (the streams this "
        "run held); default: the repository's setting",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


@dataclass
class Bench:
    """One run: its options, the server under test, the audio, and the result so far."""

    a: argparse.Namespace
    cfg: dict
    levels: list[int]
    duration: float
    skip: set[str]
    tmp: Path
    repo: Path
    result: BenchResult
    contract: ModelContract
    live: Live | None = None
    chunk: int = 0
    rate: int = 0
    chunk_s: float = 0.0
    clips: list = dc_field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.live is not None
        return self.live.url


def setup(a: argparse.Namespace, tmp: Path) -> Bench:
    """The options, the repository served (a copy when a variant is asked for), the
    run's facts."""
    cfg = dict(QUICK if a.quick else FULL)
    run = RunInfo(
        host=socket.gethostname(),
        quick=a.quick,
        started=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=sys.version.split()[0],
        budget_ms=a.budget_ms,
        connections=a.connections,
        loadavg_start=loadavg(),
    )
    repo = REPOSITORY
    variant = (a.intra_op_threads, a.acoustic_instances, a.queue_delay_us, a.feature_instances)
    if any(v is not None for v in variant):
        repo = repository_copy(tmp, *variant)
        run.notes.append(
            f"run with acoustic_model intra_op_thread_count={a.intra_op_threads}, "
            f"instances={a.acoustic_instances}, max_queue_delay_us={a.queue_delay_us}; "
            f"feature_extractor instances={a.feature_instances} (repository copy; committed "
            f"config unchanged)"
        )
    run.intra_op_threads = raw.server_intra_op_threads(repo / "acoustic_model" / "config.pbtxt")
    contract = ModelContract.from_onnx(repo / "acoustic_model" / "1" / "model.onnx")
    run.model = f"{contract.name} {contract.version}"
    return Bench(
        a=a,
        cfg=cfg,
        levels=a.levels or cfg["levels"],
        duration=a.duration or cfg["duration"],
        skip={s.strip() for s in a.skip.split(",") if s.strip()},
        tmp=tmp,
        repo=repo,
        result=BenchResult(run=run),
        contract=contract,
    )


def start_server(b: Bench) -> None:
    """Start the server, read the chunk size and the clips, warm up."""
    run = b.result.run
    b.live = Live(b.repo, b.result.server)
    say("starting tritonserver ...")
    b.live.start()
    with AsrConnection(b.live.url) as c:
        served = c.contract()
    b.rate = served.sample_rate
    b.chunk = int(round(b.a.chunk_ms * b.rate / 1000)) if b.a.chunk_ms else served.chunk_samples
    b.chunk_s = b.chunk / b.rate
    run.chunk_ms = round(b.chunk_s * 1000, 1)
    run.acoustic_instances = acoustic_instances(b.live.server)
    b.clips = load.load_clips(b.rate)
    run.audio = [
        {
            "name": c.name,
            "seconds": round(len(c.audio) / b.rate, 2),
            "onset_s": None if c.onset is None else round(c.onset / b.rate, 3),
        }
        for c in b.clips
    ]
    say("warm-up (1 stream, 3 s) ...")
    load.run_level(b.url, b.clips, 1, chunk_samples=b.chunk, sample_rate=b.rate, duration_s=3)
    b.live.check("warm-up")


def paced_load(b: Bench) -> None:
    """[1/6] real-time streams, swept upward until p99 leaves the budget."""
    a, cap = b.a, b.result.capacity
    say(
        f"[1/6] paced load, levels {b.levels}, {b.duration:.0f} s each, budget p99 ≤ "
        f"{a.budget_ms:g} ms"
    )
    assert b.live is not None
    cap.levels = load.sweep(
        b.url,
        b.clips,
        b.levels,
        chunk_samples=b.chunk,
        sample_rate=b.rate,
        duration_s=b.duration,
        connections=a.connections,
        budget_ms=a.budget_ms,
        probe=b.live.probe,
        progress=say,
        beyond=2,
    )
    b.live.check("the paced load sweep")
    held = metrics.held_level(cap.levels, a.budget_ms)
    cap.held_streams = held["streams"] if held else 0
    say(f"  -> streams held within budget: {cap.held_streams}")


def throughput_limit(b: Bench) -> None:
    """[2/6] closed-loop streams, then the raw model at the batch sizes the server formed."""
    cfg, cap, rm = b.cfg, b.result.capacity, b.result.raw_model
    assert b.live is not None
    say(
        f"[2/6] throughput limit: {cfg['sat_streams']} closed-loop streams for "
        f"{cfg['sat_s']:.0f} s, then raw onnxruntime"
    )
    sat = cap.saturation = load.saturate(
        b.url,
        b.clips,
        cfg["sat_streams"],
        chunk_samples=b.chunk,
        sample_rate=b.rate,
        duration_s=cfg["sat_s"],
        connections=b.a.connections,
        probe=b.live.probe,
    )
    b.live.check("the closed-loop run")
    am = (sat.get("server") or {}).get("acoustic_model") or {}
    if sat.get("aborted") or not am:
        say(f"  closed-loop run aborted: {sat.get('aborted')}")
        am = {}
    else:
        say(
            f"  server: {am['windows_per_s']} windows/s, batches {am['batch_hist']}, "
            f"load {sat['loadavg_after'][0]}"
        )
    hist = {int(k): v for k, v in am.get("batch_hist", {}).items()}
    # the busiest paced level (an overloaded one runs the server flat out too)
    paced = [lv for lv in cap.levels or [] if _acoustic(lv).get("batch_hist")]
    peak = max(paced, key=lambda lv: _acoustic(lv)["windows_per_s"], default=None)
    peak_hist = {int(k): v for k, v in _acoustic(peak)["batch_hist"].items()} if peak else {}
    sizes = sorted({1, 2, 4, 8, 16, 32} | set(hist) | set(peak_hist))
    model = b.repo / "acoustic_model" / "1" / "model.onnx"
    sess = raw.session(model, b.result.run.intra_op_threads)
    windows = raw.real_windows(b.contract, [c.audio for c in b.clips], 32)
    rm.raw_loadavg_before = loadavg()
    timed = raw.time_batches(sess, windows, sizes, min_seconds=cfg["raw_seconds"], progress=say)
    del sess
    rm.raw = {str(bs): v for bs, v in timed.items()}
    # every core busy with the model and nothing else: one 1-thread session per core
    rm.raw_all_cores = raw.parallel_throughput(
        model, windows, 8, os.cpu_count() or 1, seconds=2 * cfg["raw_seconds"] + 1
    )
    say(
        f"  raw onnxruntime, {os.cpu_count()} 1-thread sessions in parallel, batch 8: "
        f"{rm.raw_all_cores['windows_per_s']} windows/s"
    )
    rm.raw_loadavg_after = loadavg()
    if hist:
        overhead(b, am, hist, peak, peak_hist, timed)


def overhead(b: Bench, am: dict, hist: dict, peak, peak_hist: dict, timed: dict) -> None:
    """Server windows/s against the raw model at the same batch mix; the compute limit."""
    cap, rm, chunk_s = b.result.capacity, b.result.raw_model, b.chunk_s
    raw_mix = metrics.mixed_throughput(hist, {bs: timed[bs]["median_ms"] / 1000 for bs in hist})
    best = max(timed, key=lambda bs: timed[bs]["windows_per_s"])
    rm.overhead = {
        "measured_in": "closed loop",
        "server_windows_per_s": am["windows_per_s"],
        "raw_windows_per_s": round(raw_mix, 2),
        "ratio": round(am["windows_per_s"] / raw_mix, 3),
        "best_batch": best,
        "best_raw_windows_per_s": timed[best]["windows_per_s"],
    }
    if peak_hist:
        pk = _acoustic(peak)
        raw_pk = metrics.mixed_throughput(
            peak_hist, {bs: timed[bs]["median_ms"] / 1000 for bs in peak_hist}
        )
        rm.overhead_paced_peak = {
            "measured_in": f"paced level {peak['streams']} streams",
            "server_windows_per_s": pk["windows_per_s"],
            "batch_hist": pk["batch_hist"],
            "raw_windows_per_s": round(raw_pk, 2),
            "ratio": round(pk["windows_per_s"] / raw_pk, 3),
        }
        say(
            f"  busiest paced level ({peak['streams']} streams): {pk['windows_per_s']} "
            f"windows/s vs raw {raw_pk:.1f} at its batch mix -> "
            f"{pk['windows_per_s'] / raw_pk:.2f}"
        )
        if pk["windows_per_s"] > am["windows_per_s"]:
            raw_mix = raw_pk  # the compute limit at the batches of the busier run
            rm.overhead, rm.overhead_closed_loop = (
                rm.overhead_paced_peak
                | {"best_batch": best, "best_raw_windows_per_s": timed[best]["windows_per_s"]},
                rm.overhead,
            )
    # one window per chunk of each stream
    wins_per_chunk = 1.0
    one = next((lv for lv in cap.levels or [] if lv["streams"] == 1), None)
    if one and one.get("chunks") and one.get("server"):
        wins_per_chunk = one["server"]["acoustic_model"]["windows"] / one["chunks"]
    rm.windows_per_chunk = round(wins_per_chunk, 3)
    # the model alone, at the batch sizes the server formed when saturated
    rm.compute_limit_streams = round(raw_mix * chunk_s / wins_per_chunk, 2)
    rm.compute_limit_streams_best_batch = round(
        timed[best]["windows_per_s"] * chunk_s / wins_per_chunk, 2
    )
    assert rm.raw_all_cores is not None
    rm.compute_limit_streams_all_cores = round(
        rm.raw_all_cores["windows_per_s"] * chunk_s / wins_per_chunk, 2
    )
    say(
        f"  raw at the same batch mix {raw_mix:.1f} windows/s -> server/raw "
        f"{rm.overhead['ratio']:.2f}; compute limit ≈ "
        f"{rm.compute_limit_streams:.1f} streams"
    )


def run_perf_analyzer(b: Bench) -> None:
    """[3/6] Triton's perf_analyzer with real audio chunks."""
    cfg, lat = b.cfg, b.result.latency
    assert b.live is not None
    say(f"[3/6] perf_analyzer, concurrency {cfg['pa_concurrency']}")
    try:
        pa = lat.perf_analyzer = perf_analyzer.run(
            b.url,
            [c.audio for c in b.clips],
            b.chunk,
            cfg["pa_concurrency"],
            out_dir=perf_analyzer.WORK,
            measurement_ms=cfg["pa_ms"],
            progress=say,
        )
        pa["loadavg_after"] = loadavg()
        for row in pa.get("rows", []):
            say(
                f"  concurrency {int(row['Concurrency'])}: "
                f"{row['Inferences/Second']:.1f} infer/s, p99 {row['p99 latency']} ms"
            )
        b.live.check("perf_analyzer")
        if pa.get("error"):
            say(f"  perf_analyzer failed: {pa['error'][:300]}")
    except Exception as exc:  # recorded, not hidden: the rest still runs
        lat.perf_analyzer = {"error": f"{type(exc).__name__}: {exc}"}
        say(f"  perf_analyzer failed: {exc}")


def run_accuracy(b: Bench) -> None:
    """[4/6] WER/CER streamed vs offline."""
    assert b.live is not None
    say("[4/6] accuracy: streamed vs offline")
    b.result.accuracy.accuracy = recorded(
        "accuracy", accuracy.run, b.url, b.chunk, b.rate, progress=say
    )
    b.live.check("accuracy")


def run_two_pass(b: Bench) -> None:
    """Two-pass finals and Whisper interims vs one-pass (benchmarks/two_pass.py)."""
    assert b.live is not None and b.live.server is not None
    say(
        "      two-pass finals and Whisper interims vs one-pass, paced: 1 stream, then "
        f"{b.cfg['two_pass_concurrency']} at once"
    )
    b.result.accuracy.two_pass = recorded(
        "two-pass",
        two_pass.run,
        b.url,
        progress=say,
        concurrency=b.cfg["two_pass_concurrency"],
        server_pid=b.live.server.proc.pid,
    )
    b.live.check("two-pass finals")


def run_finals(b: Bench) -> None:
    """Last word's end -> final per mode, paced, at 1 and 8 streams (benchmarks/finals.py)."""
    assert b.live is not None
    say(f"      last word -> final, one-pass and two-pass, streams {b.cfg['finals_streams']}")
    b.result.accuracy.finals = recorded(
        "finals",
        finals.run,
        b.url,
        streams=b.cfg["finals_streams"],
        limit=None if not b.a.quick else 3,
        server_pid=b.live.server.proc.pid if b.live.server else None,
        progress=say,
    )
    b.live.check("last word -> final")


def run_pocketsphinx(b: Bench) -> None:
    """The accuracy peer on the same eval set (no server involved)."""
    say("      accuracy peer: pocketsphinx on the same eval set (no server involved)")
    b.result.accuracy.peer_pocketsphinx = peer_pocketsphinx.run_step(progress=say)


def run_naive(b: Bench) -> None:
    """[5/6] the peer baseline: re-transcribe the growing buffer every chunk."""
    assert b.live is not None
    levels = b.result.capacity.levels or []
    n_naive = sorted({1, max(1, b.result.capacity.held_streams or 0)})
    say(f"[5/6] peer baseline (re-transcribe the growing buffer), streams {n_naive}")
    runs = [
        naive.run(
            b.url,
            b.clips,
            n,
            chunk_samples=b.chunk,
            sample_rate=b.rate,
            duration_s=b.cfg["naive_s"],
            probe=b.live.probe,
        )
        for n in n_naive
    ]
    b.live.check("the growing-buffer baseline")
    parts = []
    for nv in runs:
        ours = next(
            (
                lv
                for lv in levels
                if lv["streams"] == nv["streams"] and lv.get("server") and nv.get("server")
            ),
            None,
        )
        if ours is None:
            parts.append(f"{nv['streams']} stream(s): no comparable streaming level.")
            continue
        win_ours = ours["server"]["acoustic_model"]["windows"] / max(ours["audio_s"], 1e-9)
        win_naive = nv["server"]["acoustic_model"]["windows"] / max(nv["calls"] * b.chunk_s, 1e-9)
        nv["windows_per_audio_s"] = round(win_naive, 2)
        nv["ours_windows_per_audio_s"] = round(win_ours, 2)
        ratio = (nv["call_latency_ms"]["p99"] or 0) / max(
            ours["chunk_latency_ms"]["p99"] or 1e-9, 1e-9
        )
        nv["p99_ratio_vs_streaming"] = round(ratio, 2)
        parts.append(
            f"{nv['streams']} stream(s): per-chunk p50 {nv['call_latency_ms']['p50']} ms, "
            f"p99 {nv['call_latency_ms']['p99']} ms (streaming: "
            f"{ours['chunk_latency_ms']['p50']} / {ours['chunk_latency_ms']['p99']} ms, "
            f"p99 ratio {ratio:.1f}×); model windows per second of audio "
            f"{win_naive:.1f} vs {win_ours:.1f} streaming "
            f"({win_naive / max(win_ours, 1e-9):.1f}×); sender late p99 "
            f"{nv['send_lateness_ms']['p99']} ms; load avg {nv['loadavg_after'][0]}."
        )
        say("  " + parts[-1])
    b.result.latency.naive = {"runs": runs, "summary": " ".join(parts)}


def run_profile(b: Bench) -> None:
    """[6/6] py-spy on the server's Python processes under closed-loop load (when py-spy
    is there and not skipped); the CPU summary either way."""
    stats = b.result.server
    assert b.live is not None and b.live.server is not None
    if "profile" not in b.skip and b.cfg["profile_s"] and profile.py_spy():
        say(f"[6/6] py-spy profile under closed-loop load ({b.cfg['profile_s']} s)")
        pids = {
            pid: f"{label}-{pid}" if label == "acoustic_model" else label
            for pid, label in process_tree(b.live.server.proc.pid).items()
            if label in ("feature_extractor", "ctc_decoder", "acoustic_model")
        }
        running = profile.start(pids, b.cfg["profile_s"], b.tmp / "pyspy")
        load.saturate(
            b.url,
            b.clips,
            b.cfg["sat_streams"],
            chunk_samples=b.chunk,
            sample_rate=b.rate,
            duration_s=b.cfg["profile_s"] + 2,
            connections=b.a.connections,
        )
        stats.profile = {"py_spy": profile.finish(running)}
        b.live.check("the profile run")
    elif stats.profile is None:
        stats.profile = {}
    stats.profile["summary"] = profile_summary(b.result.capacity.saturation, stats.profile)
    for line in stats.profile["summary"]:
        say("  " + line)


def run_overload(b: Bench) -> None:
    """[7/8] a fresh server with admission control on, offered 3x its limit."""
    say("[7/8] overload: 3x the admission limit, a fresh server with admission on")
    cap = b.a.overload_capacity
    cap = (b.result.capacity.held_streams or None) if cap == "held" else (int(cap) if cap else None)
    b.result.latency.overload = recorded(
        "overload",
        overload.run_with_server,
        b.repo,
        cap,
        log_path=LOG.with_name("bench-overload-tritonserver.log"),
        progress=say,
        duration_s=b.cfg["overload_s"],
        settle_s=b.cfg["overload_settle_s"],
    )


def run_hostile(b: Bench) -> None:
    """[8/8] hostile clients beside paced bystanders, through a docker/serve of its own."""
    say("[8/8] hostile clients: one attacker class at a time beside paced bystanders")

    def step() -> dict:
        res = hostile.run(
            hostile.QUICK if b.a.quick else hostile.FULL,
            list(hostile.CLASSES),
            quick=b.a.quick,
            log_path=LOG.with_name("bench-hostile-serve.log"),
            progress=say,
        )
        res["folder"] = str(hostile.write_results(res))
        return res

    b.result.latency.hostile = recorded("hostile", step)


#: The steps on the first server, in order, and the --skip name of each (None: always).
SERVER_STEPS = (
    (None, paced_load),
    (None, throughput_limit),
    ("perf_analyzer", run_perf_analyzer),
    ("accuracy", run_accuracy),
    ("two_pass", run_two_pass),
    ("finals", run_finals),
    ("pocketsphinx", run_pocketsphinx),
    ("naive", run_naive),
    (None, run_profile),  # checks --skip profile itself: the summary is always written
)


def finish(b: Bench, t_start: float) -> Path:
    """Targets, the end's facts, the result files."""
    res = b.result
    res.targets = compute_targets(res, b.chunk_s)
    res.server.loadavg_end = loadavg()
    res.wall_s = round(time.monotonic() - t_start, 1)
    data = res.to_json()
    paths = report.write_results(data, b.a.out)
    res.plots = data.get("plots")
    say(f"done in {res.wall_s:.0f} s: {paths['md']} (and .json, plots, latest.md)")
    for t in res.targets:
        say(
            f"  target: {t.target}: {t.measured} -> "
            f"{'met' if t.met else 'MISSED' if t.met is False else 'n/a'}"
        )
    return paths["json"]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.monotonic()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    with tempfile.TemporaryDirectory(prefix="streamasr-bench-") as tmp:
        b = setup(a, Path(tmp))
        say(
            f"streamasr benchmark ({'quick' if a.quick else 'full'}) on {b.result.run.host}, "
            f"load avg {b.result.run.loadavg_start}"
        )
        try:
            start_server(b)
            for name, step in SERVER_STEPS:
                if name is None or name not in b.skip:
                    step(b)
        except BaseException:
            if b.live is not None and b.live.server is not None:
                say(b.live.server.log_tail(40))
            raise
        finally:
            if b.live is not None:
                b.live.stop()
        if "overload" not in b.skip:
            run_overload(b)
        if "hostile" not in b.skip:
            run_hostile(b)
    finish(b, t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
