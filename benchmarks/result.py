"""What `make bench` (benchmarks/run.py) measures, as typed sections of one result.

The result file ``benchmarks/results/<host>-<date>.json`` is ONE flat JSON object (the
shape every committed file has, and the one benchmarks/report.py reads): each section
below owns some of its top-level keys.  ``BenchResult.to_json`` writes that shape and
``BenchResult.from_json`` reads it back, old files included: a key no section owns is
kept in ``extra`` and written back unchanged.

A step's own measurement (one paced level, the closed-loop run, perf_analyzer's table,
the accuracy or two-pass figures...) stays the dict its module returns (benchmarks/load.py,
accuracy.py, two_pass.py, ...): those modules own their shape; the sections type what
run.py itself puts together.

Optional fields left ``None`` are not written: the key is absent, as when run.py used to
skip setting it (a step skipped, a figure not computable).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

Json = dict[str, Any]
LoadAvg = list[float]


def _omit(default: Any = None) -> Any:
    """An optional key: absent from the JSON while ``None``."""
    return field(default=default, metadata={"omit_none": True})


class Section:
    """A dataclass whose fields are top-level keys of the result file."""

    def to_json(self) -> Json:
        out: Json = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = value
        return out

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, data: Json):
        names = cls.keys()
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class RunInfo(Section):
    """The machine, the options and the served model; when and how long."""

    host: str = ""
    quick: bool = False
    started: str = ""
    cpu_count: int | None = None
    platform: str = ""
    python: str = ""
    budget_ms: float = 250.0
    connections: int = 2
    loadavg_start: LoadAvg = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    intra_op_threads: int | None = None
    model: str = ""
    chunk_ms: float | None = _omit()
    acoustic_instances: int | None = _omit()
    #: the clips streamed: name, seconds, onset_s
    audio: list[Json] | None = _omit()


@dataclass
class Capacity(Section):
    """Step 1: paced real-time streams swept upward (benchmarks/load.py), the level held
    within the latency budget; step 2's closed-loop run at the throughput limit."""

    #: one entry per paced level tried (load.sweep)
    levels: list[Json] | None = _omit()
    held_streams: int | None = _omit()
    #: the closed-loop run (load.saturate): server statistics, CPU, load average
    saturation: Json | None = _omit()
    #: held_streams / compute_limit_streams (set with the targets)
    held_vs_limit: float | None = _omit()


@dataclass
class RawModel(Section):
    """Step 2: the same ONNX model run directly with onnxruntime (benchmarks/raw.py) at
    the server's batch sizes, and what the server achieved against it."""

    raw_loadavg_before: LoadAvg | None = _omit()
    #: batch size (as a string) -> runs, median_ms, windows_per_s ...
    raw: dict[str, Json] | None = _omit()
    #: one 1-thread session per core (raw.parallel_throughput)
    raw_all_cores: Json | None = _omit()
    raw_loadavg_after: LoadAvg | None = _omit()
    #: server windows/s vs raw at the same batch mix (the busier of closed loop / paced)
    overhead: Json | None = _omit()
    overhead_paced_peak: Json | None = _omit()
    #: the closed-loop figure when the paced peak replaced it as ``overhead``
    overhead_closed_loop: Json | None = _omit()
    windows_per_chunk: float | None = _omit()
    compute_limit_streams: float | None = _omit()
    compute_limit_streams_best_batch: float | None = _omit()
    compute_limit_streams_all_cores: float | None = _omit()


@dataclass
class Latency(Section):
    """Steps 3, 5, 7 and 8: perf_analyzer's closed-loop latency, the growing-buffer peer,
    the 3x overload on a server with admission control, hostile clients beside paced
    bystanders through docker/serve."""

    perf_analyzer: Json | None = _omit()
    #: runs (benchmarks/naive.py) and a one-paragraph summary
    naive: Json | None = _omit()
    overload: Json | None = _omit()
    #: benchmarks/hostile.py's result (its own folder: results/hostile/<date-time>/)
    hostile: Json | None = _omit()


@dataclass
class Accuracy(Section):
    """Step 4: WER/CER streamed vs offline, two-pass finals, the PocketSphinx peer."""

    accuracy: Json | None = _omit()
    two_pass: Json | None = _omit()
    #: benchmarks/finals.py: last word's end -> final per mode, at 1 and 8 streams
    finals: Json | None = _omit()
    peer_pocketsphinx: Json | None = _omit()


@dataclass
class ServerStats(Section):
    """Step 6 and the run's health: py-spy profile and where the CPU time went, server
    crashes (recorded and restarted), load average at the end."""

    #: py_spy (per process) and summary (lines)
    profile: Json | None = _omit()
    server_crashes: list[Json] | None = _omit()
    loadavg_end: LoadAvg | None = _omit()


@dataclass
class Target:
    """One goal of the run: what was measured and whether it was met (None: not measured)."""

    target: str
    measured: str
    met: bool | None

    def to_json(self) -> Json:
        return {"target": self.target, "measured": self.measured, "met": self.met}


@dataclass
class BenchResult:
    """A whole `make bench` run."""

    run: RunInfo = field(default_factory=RunInfo)
    capacity: Capacity = field(default_factory=Capacity)
    raw_model: RawModel = field(default_factory=RawModel)
    latency: Latency = field(default_factory=Latency)
    accuracy: Accuracy = field(default_factory=Accuracy)
    server: ServerStats = field(default_factory=ServerStats)
    targets: list[Target] | None = None
    wall_s: float | None = None
    #: the PNG files beside the JSON (report.write_results)
    plots: list[str] | None = None
    #: keys no section owns (an older or newer file's): written back as they came
    extra: Json = field(default_factory=dict)

    SECTIONS: ClassVar[dict[str, type[Section]]] = {
        "run": RunInfo,
        "capacity": Capacity,
        "raw_model": RawModel,
        "latency": Latency,
        "accuracy": Accuracy,
        "server": ServerStats,
    }
    TOP: ClassVar[tuple[str, ...]] = ("targets", "wall_s", "plots")

    def to_json(self) -> Json:
        out: Json = {}
        for name in self.SECTIONS:
            out.update(getattr(self, name).to_json())
        if self.targets is not None:
            out["targets"] = [t.to_json() for t in self.targets]
        if self.wall_s is not None:
            out["wall_s"] = self.wall_s
        if self.plots is not None:
            out["plots"] = self.plots
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Json) -> "BenchResult":
        sections = {name: t.from_json(data) for name, t in cls.SECTIONS.items()}
        owned = set(cls.TOP).union(*(t.keys() for t in cls.SECTIONS.values()))
        targets = data.get("targets")
        return cls(
            **sections,
            targets=None if targets is None else [Target(**t) for t in targets],
            wall_s=data.get("wall_s"),
            plots=data.get("plots"),
            extra={k: v for k, v in data.items() if k not in owned},
        )
