"""Abandoned-stream soak: open many streams that never send END, let them go idle, and
check that the server lets go of all of them.

    .venv/bin/python -m benchmarks.soak                # 10 000 streams (a few minutes)
    .venv/bin/python -m benchmarks.soak --streams 500 --json out.json

It starts its own tritonserver on a copy of the model repository with a short
``stream_idle_timeout_s`` (our TTL sweep), a short Triton sequence idle timeout and
``max_streams`` raised above ``--streams``.  Phases:

1. warm-up (``--warmup-rounds``, 2): ``--warmup`` streams (default: as many as the soak),
   one short chunk each, no END; wait until both Python steps report
   ``streamasr_open_streams == 0`` and Triton's own sequence idle timeout has passed; RSS of tritonserver + its python stubs (from
   /proc) is the baseline.  RSS is a high-water mark of peak concurrency (allocators keep
   freed pages), so the warm-up reaches the same peak: a leak then shows as growth.
2. soak (``--rounds`` times): ``--streams`` streams the same way.  ``--path steps``
   (default) opens each stream on each Python step directly (a START chunk on
   ``feature_extractor``, a START STEP_INFO on ``ctc_decoder``): thousands per second.
   ``--path ensemble`` goes through ``streaming_asr`` and so runs the acoustic model once
   per stream (about 30 streams/s on 2 CPU cores).  Triton's ``feature_extractor``
   sequence batcher has ``max_candidate_sequences`` 4096 slots; a START beyond that waits
   in Triton's backlog until a slot frees (a sequence ENDs or idles out after
   ``max_sequence_idle_microseconds``), so late STARTs are answered up to a few idle
   timeouts late, never refused (``feature_start_latency_max_s``).
3. reclaim: wait until both steps' stores are empty and ``reclaimed`` grew by the number
   of streams; RSS after the last round must not exceed the baseline by more than
   ``--tolerance``.  A fresh end-to-end stream must then still work.

Prints the figures (and writes them as JSON with ``--json``); exit status 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from streamasr.triton.server import child_processes

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = ("feature_extractor", "ctc_decoder")


# -- process figures ---------------------------------------------------------------------
def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def server_rss(pid: int) -> dict[str, int]:
    """RSS in KiB of tritonserver and each of its child processes (the python stubs)."""
    out = {"tritonserver": _rss_kib(pid)}
    for c, argv in child_processes(pid).items():
        # the stub's argv: <stub> <model path> <shm region> ... ; name it by model folder
        name = Path(argv[1]).parent.parent.name if len(argv) > 1 else str(c)
        out[f"stub:{name}:{c}"] = _rss_kib(c)
    return out


# -- metrics -----------------------------------------------------------------------------
def scrape(metrics_url: str) -> str:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', text, re.M)
    if not m:
        raise RuntimeError(f"{name}{{model={model!r}}} not in the metrics")
    return float(m.group(1))


def poll(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def settled_rss(pid: int, timeout: float = 60.0, tolerance: float = 0.005) -> int:
    """Total RSS once two readings a second apart differ by less than ``tolerance``."""
    last = sum(server_rss(pid).values())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = sum(server_rss(pid).values())
        if abs(now - last) <= tolerance * last:
            return now
        last = now
    return last


# -- streams -----------------------------------------------------------------------------
class StepStreams:
    """Streams opened straight on each Python step (the models an ensemble calls are
    models of their own): a START chunk on ``feature_extractor`` and a START STEP_INFO
    on ``ctc_decoder``.  Skips the acoustic model, so 10 000 streams open in seconds."""

    def __init__(self, url: str, rate: int, vocab: int):
        import tritonclient.grpc as grpcclient

        self.g = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.rate, self.vocab = rate, vocab
        self.answered: dict[str, float] = {}
        self.errors: list[str] = []
        self.client.start_stream(callback=self._done)
        self.sent: dict[str, float] = {}
        self._ids = iter(range(1_000_000_000, 2_000_000_000))

    def _done(self, result, error) -> None:
        rid = (
            result.get_response().id
            if result is not None
            else getattr(error, "request_id", lambda: None)()
            if error
            else None
        )
        if error is not None:
            self.errors.append(str(error))
        if rid:
            self.answered[rid] = time.monotonic()
        else:
            self.answered[f"?{len(self.answered)}"] = time.monotonic()

    def open(self, n: int, samples: int) -> None:
        from streamasr.pipeline.step_info import StepInfo

        audio = (np.random.default_rng(0).standard_normal(samples) * 0.01).astype(np.float32)
        lp = np.zeros((1, 20, self.vocab), np.float32)
        for _ in range(n):
            sid = next(self._ids)
            a = self.g.InferInput("AUDIO", [samples], "FP32")
            a.set_data_from_numpy(audio)
            self.sent[f"f{sid}"] = time.monotonic()
            self.client.async_stream_infer(
                "feature_extractor", [a], request_id=f"f{sid}", sequence_id=sid, sequence_start=True
            )
            x = self.g.InferInput("LOG_PROBS", list(lp.shape), "FP32")
            x.set_data_from_numpy(lp)
            info = self.g.InferInput("STEP_INFO", [1], "BYTES")
            info.set_data_from_numpy(
                np.array([StepInfo(stream=sid, seq=0, start=True).to_json().encode()], dtype=object)
            )
            self.sent[f"d{sid}"] = time.monotonic()
            self.client.async_stream_infer("ctc_decoder", [x, info], request_id=f"d{sid}")

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def open_abandoned_steps(streams: StepStreams, n: int, samples: int, timeout: float) -> dict:
    streams.answered.clear()
    streams.sent.clear()
    errors_before = len(streams.errors)
    t0 = time.monotonic()
    streams.open(n, samples)
    sent_s = time.monotonic() - t0
    poll(lambda: len(streams.answered) >= 2 * n, timeout, f"answers to {2 * n} requests")
    lat = {k: streams.answered[k] - streams.sent[k] for k in streams.sent if k in streams.answered}
    feat = np.array([v for k, v in lat.items() if k[0] == "f"])
    errs = streams.errors[errors_before:]
    return {
        "streams": n,
        "errors": len(errs),
        "first_error": errs[0] if errs else None,
        "seconds_to_send": round(sent_s, 2),
        "seconds_to_all_answered": round(time.monotonic() - t0, 2),
        # a START beyond feature_extractor's max_candidate_sequences waits for a slot
        "feature_starts_answered_within_2s": int((feat < 2.0).sum()),
        "feature_start_latency_max_s": round(float(feat.max()), 2) if len(feat) else None,
    }


def open_abandoned_ensemble(conn, n: int, samples: int, timeout: float) -> dict:
    """n streams through `streaming_asr`, one chunk each, no END; waits for every answer."""
    audio = (np.random.default_rng(0).standard_normal(samples) * 0.01).astype(np.float32)
    t0 = time.monotonic()
    sessions = [conn.open_session() for _ in range(n)]
    answered_at: list[float] = []
    for s in sessions:
        s.send(audio)
    deadline = t0 + timeout
    for s in sessions:
        s.wait(timeout=max(1.0, deadline - time.monotonic()))
        answered_at.append(time.monotonic() - t0)
    errors = [e for s in sessions for e in s.errors]
    for s in sessions:
        conn.forget(s)
    lat = np.array(answered_at)
    return {
        "streams": n,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds_to_all_answered": round(float(lat.max()), 2),
        "answered_p50_s": round(float(np.median(lat)), 2),
    }


def run(
    streams: int,
    warmup: int,
    ttl_s: float,
    triton_idle_s: float,
    audio_ms: int,
    tolerance: float,
    workdir: Path,
    timeout: float = 900.0,
    path: str = "steps",
    rounds: int = 1,
    warmup_rounds: int = 2,
) -> dict:
    from streamasr.triton.repository import TWO_PASS_MODELS, copy_repository
    from streamasr.triton.server import ServerConfig, TritonServer, free_ports
    from streamasr_client.stream import AsrConnection

    limit = str(max(streams, warmup) * 2)
    repo = copy_repository(
        REPO_ROOT / "model_repository",
        workdir / "repo",
        {m: {"stream_idle_timeout_s": str(ttl_s), "max_streams": limit} for m in STEPS},
        idle_us={"feature_extractor": int(triton_idle_s * 1e6)},
        leave_out=TWO_PASS_MODELS,
    )
    cfg = ServerConfig(
        model_repository=repo,
        **free_ports(),
        exit_timeout_s=3,
    )
    figures: dict = {
        "path": path,
        "streams": streams,
        "warmup": warmup,
        "rounds_run": rounds,
        "warmup_rounds": warmup_rounds,
        "stream_idle_timeout_s": ttl_s,
        "triton_sequence_idle_s": triton_idle_s,
        "audio_ms_per_stream": audio_ms,
    }
    with TritonServer(cfg, log_path=workdir / "tritonserver.log") as server:
        murl = f"http://{cfg.host}:{cfg.metrics_port}/metrics"
        pid = server.proc.pid

        def publish() -> None:
            """The steps publish metrics from execute() only: run both once with a
            one-request stream (START and END together) that leaves nothing open."""
            with AsrConnection(server.grpc_url) as c:
                s = c.open_session()
                s.close(np.zeros(1600, np.float32))
                s.wait()

        def reclaimed() -> dict[str, float]:
            publish()
            text = scrape(murl)
            return {m: metric(text, "streamasr_reclaimed_streams_total", m) for m in STEPS}

        def open_now() -> dict[str, float]:
            publish()
            text = scrape(murl)
            return {m: metric(text, "streamasr_open_streams", m) for m in STEPS}

        peak_open = {m: 0.0 for m in STEPS}

        def all_closed() -> bool:
            now = open_now()
            for m, v in now.items():
                peak_open[m] = max(peak_open[m], v)
            return all(v == 0 for v in now.values())

        with AsrConnection(server.grpc_url) as conn:
            contract = conn.contract()
            samples = contract.sample_rate * audio_ms // 1000
            if path == "steps":
                steps = StepStreams(server.grpc_url, contract.sample_rate, len(contract.vocabulary))
                go = lambda k: open_abandoned_steps(steps, k, samples, timeout)  # noqa: E731
            else:
                go = lambda k: open_abandoned_ensemble(conn, k, samples, timeout)  # noqa: E731
            figures["warmup_runs"] = []
            for _ in range(warmup_rounds):
                figures["warmup_runs"].append(go(warmup))
                poll(all_closed, 3 * ttl_s + 60, "warm-up streams to be reclaimed")
                # Triton's own sequence slots free one sequence-idle timeout after the
                # last request; wait that out so the baseline holds no sequence either.
                time.sleep(max(0.0, triton_idle_s - ttl_s) + 1.0)
                figures.setdefault("rss_after_warmup_rounds_kib", []).append(settled_rss(pid))
            base = reclaimed()
            rss_before = settled_rss(pid)
            figures["rss_before_kib"] = rss_before
            figures["rss_before_by_process_kib"] = server_rss(pid)

            figures["rounds"] = []
            for _ in range(rounds):
                rnd: dict = {}
                peak_open.update({m: 0.0 for m in STEPS})
                rnd["run"] = go(streams)
                all_closed()  # samples the open-stream gauges
                rnd["rss_peak_kib"] = sum(server_rss(pid).values())
                t0 = time.monotonic()
                poll(
                    lambda base=base: (
                        all_closed() and all(v - base[m] >= streams for m, v in reclaimed().items())
                    ),
                    3 * ttl_s + 120,
                    "every soak stream to be reclaimed",
                )
                rnd["peak_open_streams_seen"] = dict(peak_open)
                rnd["seconds_to_reclaim_after_last_answer"] = round(time.monotonic() - t0, 2)
                after = reclaimed()
                rnd["reclaimed"] = {m: int(after[m] - base[m]) for m in STEPS}
                base = after
                time.sleep(max(0.0, triton_idle_s - ttl_s) + 1.0)
                rnd["rss_after_kib"] = settled_rss(pid)
                rnd["rss_after_by_process_kib"] = server_rss(pid)
                figures["rounds"].append(rnd)
            rss_after = figures["rounds"][-1]["rss_after_kib"]
            figures["rss_after_kib"] = rss_after
            if path == "steps":
                steps.close()
            # the server still serves a fresh end-to-end stream after the soak
            s = conn.open_session()
            s.send(np.zeros(samples, np.float32))
            s.close()
            s.wait(timeout=60)
            figures["fresh_stream_after_soak_errors"] = s.errors
    figures["rss_change"] = round(rss_after / rss_before - 1.0, 4)
    rounds_ = figures["rounds"]
    checks = {
        "no_errors": all(w["errors"] == 0 for w in figures["warmup_runs"])
        and all(r["run"]["errors"] == 0 for r in rounds_),
        "all_reclaimed": all(v >= streams for r in rounds_ for v in r["reclaimed"].values()),
        # a leak grows; a lower RSS after the soak (allocator slack given back) is fine
        "rss_within_tolerance": figures["rss_change"] <= tolerance,
        "fresh_stream_ok": figures["fresh_stream_after_soak_errors"] == [],
    }
    figures["checks"] = checks
    figures["ok"] = all(checks.values())
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="streams in the warm-up round (default: --streams; RSS is a "
        "high-water mark of peak concurrency, a leak grows round on round)",
    )
    p.add_argument(
        "--path",
        choices=("steps", "ensemble"),
        default="steps",
        help="open streams on each Python step directly (fast), or through "
        "streaming_asr (runs the acoustic model once per stream: slow)",
    )
    p.add_argument("--ttl", type=float, default=5.0, help="stream_idle_timeout_s of the copy")
    p.add_argument(
        "--triton-idle",
        type=float,
        default=8.0,
        help="feature_extractor max_sequence_idle (s) of the copy",
    )
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=2,
        help="warm-up rounds before the baseline: RSS follows the peak number "
        "of live sequences, which varies a little from round to round",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="soak rounds after the warm-up (RSS is checked after the last)",
    )
    p.add_argument("--audio-ms", type=int, default=100, help="audio in each stream's one chunk")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed RSS change")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the repository copy and the server log here",
    )
    a = p.parse_args(argv)
    if a.warmup is None:
        a.warmup = a.streams
    with tempfile.TemporaryDirectory(prefix="streamasr-soak-") as tmp:
        workdir = a.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fig = run(
            a.streams,
            a.warmup,
            a.ttl,
            a.triton_idle,
            a.audio_ms,
            a.tolerance,
            workdir,
            a.timeout,
            a.path,
            a.rounds,
            a.warmup_rounds,
        )
    text = json.dumps(fig, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0 if fig["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
