"""What the server did during a measurement: Triton's statistics API (per-model request
counts and times, the acoustic model's batch sizes) and CPU time per process (the server,
each Python backend stub, this client) from /proc."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from .metrics import batch_histogram_delta

MODELS = ("feature_extractor", "acoustic_model", "ctc_decoder", "streaming_asr")
_TICK = os.sysconf("SC_CLK_TCK")


def _scrape(metrics_url: str) -> str | None:
    """The Prometheus endpoint's text; None when it does not answer (the server died)."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def model_requests(metrics_url: str, model: str) -> float | None:
    """Requests Triton has counted for ``model`` (success + failure, every version) on
    its Prometheus endpoint ``metrics_url``; None when it does not answer (the server died)."""
    text = _scrape(metrics_url)
    if text is None:
        return None
    total = 0.0
    for name in ("nv_inference_request_success", "nv_inference_request_failure"):
        pattern = rf'^{name}{{model="{re.escape(model)}",[^}}]*}} ([0-9.e+-]+)$'
        total += sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))
    return total


def metric_total(metrics_url: str, name: str) -> float | None:
    """The sum of every series of the metric ``name`` (e.g. streamasr_stream_capacity) on
    the Prometheus endpoint ``metrics_url``; None when it does not answer or has none."""
    text = _scrape(metrics_url)
    if text is None:
        return None
    values = [
        float(m.group(1))
        for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    ]
    return sum(values) if values else None


def model_stats(http_url: str, model: str) -> dict:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as r:
        data = json.load(r)
    stats = data["model_stats"]
    if not stats:
        raise RuntimeError(f"no statistics for model {model!r}")
    return stats[0]


@dataclass
class StatsSnapshot:
    t: float
    models: dict[str, dict]

    @classmethod
    def take(cls, http_url: str, models=MODELS) -> "StatsSnapshot":
        return cls(time.monotonic(), {m: model_stats(http_url, m) for m in models})


def _batch_counts(stats: dict) -> dict[int, int]:
    return {
        int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])
    }


def _batch_ns(stats: dict) -> dict[int, int]:
    return {
        int(b["batch_size"]): int(b["compute_infer"]["ns"]) for b in stats.get("batch_stats", [])
    }


def stats_delta(a: StatsSnapshot, b: StatsSnapshot) -> dict:
    """Per model: requests, executions and mean per-request queue/compute times (ms)
    between two snapshots; for the acoustic model the batch-size histogram, windows/s,
    and Triton's mean compute_infer per batch size."""
    out: dict = {"seconds": round(b.t - a.t, 3)}
    for m in b.models:
        s0, s1 = a.models[m], b.models[m]
        i0, i1 = s0["inference_stats"], s1["inference_stats"]
        n = int(i1["success"]["count"]) - int(i0["success"]["count"])
        fails = int(i1["fail"]["count"]) - int(i0["fail"]["count"])
        execs = int(s1.get("execution_count", 0)) - int(s0.get("execution_count", 0))
        per_req = {}
        for k in ("queue", "compute_input", "compute_infer", "compute_output"):
            ns = int(i1[k]["ns"]) - int(i0[k]["ns"])
            per_req[k + "_ms"] = round(ns / n / 1e6, 3) if n else None
        entry = {"requests": n, "failures": fails, "executions": execs, **per_req}
        if m == "acoustic_model":
            hist = batch_histogram_delta(_batch_counts(s0), _batch_counts(s1))
            ns0, ns1 = _batch_ns(s0), _batch_ns(s1)
            windows = sum(bs * c for bs, c in hist.items())
            entry["batch_hist"] = {str(k): v for k, v in hist.items()}
            entry["windows"] = windows
            entry["windows_per_s"] = round(windows / out["seconds"], 2) if out["seconds"] else None
            entry["mean_batch"] = round(windows / sum(hist.values()), 2) if hist else None
            entry["compute_infer_ms_by_batch"] = {
                str(bs): round((ns1[bs] - ns0.get(bs, 0)) / c / 1e6, 3) for bs, c in hist.items()
            }
        out[m] = entry
    return out


# -- CPU time per process --------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, user+system CPU seconds) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def process_tree(root: int) -> dict[int, str]:
    """pid -> label for ``root`` (labelled ``tritonserver``) and its descendants; a
    python backend stub is labelled with the model it serves."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(int(d))
            if st is not None:
                parents[int(d)] = st[0]
    tree, frontier = {root: "tritonserver"}, [root]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree[child] = _label(child)
                frontier.append(child)
    return tree


def _label(pid: int) -> str:
    args = _cmdline(pid)
    if args and args[0].endswith("triton_python_backend_stub") and len(args) > 1:
        # argv[1] is the model's model.py path: .../<model>/<version>/model.py, or the
        # backend's model.py for a Python-based backend; the stub's argv also names it.
        for a in args[1:]:
            for m in (
                "feature_extractor",
                "acoustic_model",
                "ctc_decoder",
                "model_contract",
                "offline_asr",
            ):
                if f"/{m}/" in a or a.startswith(m):
                    return m
        return "stub:" + os.path.basename(os.path.dirname(args[1]))
    return os.path.basename(args[0]) if args else f"pid{pid}"


class CpuMeter:
    """CPU seconds used per labelled process between ``start()`` and ``stop()``."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self._t0: dict[int, float] = {}
        self._labels: dict[int, str] = {}
        self._wall0 = 0.0

    def _sample(self) -> dict[int, float]:
        pids = dict(self._labels)
        pids[os.getpid()] = "client (this process)"
        out = {}
        for pid in pids:
            st = _proc_stat(pid)
            if st is not None:
                out[pid] = st[1]
        return out

    def start(self) -> None:
        self._labels = process_tree(self.server_pid) if self.server_pid else {}
        self._labels[os.getpid()] = "client (this process)"
        self._wall0 = time.monotonic()
        self._t0 = self._sample()

    def stop(self) -> dict:
        t1 = self._sample()
        wall = time.monotonic() - self._wall0
        per: dict[str, float] = {}
        for pid, cpu in t1.items():
            label = self._labels.get(pid, str(pid))
            per[label] = per.get(label, 0.0) + cpu - self._t0.get(pid, cpu)
        total = sum(per.values())
        return {
            "wall_s": round(wall, 3),
            "cpu_s": {k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])},
            "cores_busy": round(total / wall, 3) if wall else None,
        }


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]
