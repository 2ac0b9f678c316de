"""What every streamasr python-backend model shares at its edge with Triton: logging
into Triton's log, tensors in and out, the streams metrics, the state sweeper, and the
execute loop (``serve_each``).  Importable only inside Triton
(``triton_python_backend_utils``)."""

from __future__ import annotations

import bisect
import ctypes
import json
import logging
import os
import threading
import time
from typing import Any, Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from streamasr.core.admission import RefusedStreamEnded, StreamRefused
from streamasr.core.state import StreamError, StreamStore, Sweeper
from streamasr.pipeline.common import ConfigError, ModelConfig


class _TritonLogHandler(logging.Handler):
    """Forward the package's logging to Triton's log, with the model name as prefix."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"[{self.prefix}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(msg)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(msg)
        else:
            pb_utils.Logger.log_verbose(msg)


def setup_logging(prefix: str) -> logging.Logger:
    root = logging.getLogger("streamasr")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        root.addHandler(_TritonLogHandler(prefix))
    level = os.environ.get("STREAMASR_LOG_LEVEL", "INFO").upper()
    root.setLevel(getattr(logging, level, logging.INFO))
    root.propagate = False
    return logging.getLogger(f"streamasr.{prefix}")


def error_response(message: str, unavailable: bool = False):
    """An error response; ``unavailable``: status UNAVAILABLE (retryable: gRPC
    UNAVAILABLE, HTTP 503 on unary calls; on a gRPC stream only the message travels)."""
    if unavailable:
        err = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
    else:
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def strings_tensor(name: str, items: list[str]):
    return pb_utils.Tensor(name, np.array([s.encode("utf-8") for s in items], dtype=np.object_))


def messages_tensor(name: str, msgs: list[dict]):
    """Result messages as a BYTES tensor, one JSON message per element."""
    return strings_tensor(name, [json.dumps(m, ensure_ascii=False) for m in msgs])


def read_messages(tensor) -> list[dict]:
    return [json.loads(m) for m in tensor.as_numpy().reshape(-1)]


def utterances_tensor(utterances) -> "pb_utils.Tensor":
    """Two-pass utterances (streamasr.core.two_pass.Utterance) as the UTTERANCES tensor."""
    return pb_utils.Tensor(
        "UTTERANCES", np.array([u.to_bytes() for u in utterances], dtype=np.object_)
    )


def batch_of_one(tensor) -> "pb_utils.Tensor":
    """The tensor with a leading batch dimension of 1 (for models with max_batch_size > 0)."""
    return pb_utils.Tensor(tensor.name(), tensor.as_numpy()[None])


def loaded(
    args: dict, inputs: set[str] | None = None, outputs: set[str] | None = None
) -> tuple[ModelConfig, logging.Logger]:
    """initialize()'s first step: the model's parsed config and its logger (into Triton's
    log), after checking that the config declares ``inputs`` and ``outputs``."""
    cfg = ModelConfig.from_args(args)
    log = setup_logging(cfg.name)
    validate_io(cfg, inputs or set(), outputs or set())
    return cfg, log


def validate_io(cfg: ModelConfig, inputs: set[str], outputs: set[str]) -> None:
    have_in = {i["name"] for i in cfg.raw.get("input", [])}
    have_out = {o["name"] for o in cfg.raw.get("output", [])}
    if not inputs <= have_in or not outputs <= have_out:
        raise ConfigError(
            f"model {cfg.name!r} must declare inputs {sorted(inputs)} and outputs "
            f"{sorted(outputs)}; config.pbtxt has {sorted(have_in)} / "
            f"{sorted(have_out)}"
        )


#: The per-request time histogram's name: its series are ``_bucket{le}``, ``_count`` and
#: ``_sum``, as a Prometheus histogram's (histogram_quantile reads them as such).
REQUEST_SECONDS = "streamasr_request_seconds"


class RequestSeconds:
    """A Prometheus histogram of request times, counted here and published to Triton's
    metrics as counters at most once per ``publish_every_s``.  Observing each request
    through pb_utils was one round trip to tritonserver per request: py-spy found it
    the top frame of the Python steps (37 % of the feature step's samples, 14 % of the
    decoder's at the throughput limit, benchmarks/results/vm-20261206-1055.md).  What is
    counted since the last publication goes out with the first request after the next
    ``publish_every_s``."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
    LE = (*(f"{b:g}" for b in BUCKETS), "+Inf")
    PUBLISH_EVERY_S = 1.0

    def __init__(
        self,
        buckets: list,
        count,
        total,
        publish_every_s: float = PUBLISH_EVERY_S,
        clock=time.monotonic,
    ):
        self._metrics = buckets, count, total
        self.publish_every_s, self.clock = publish_every_s, clock
        self.counts = [0] * len(self.LE)  # cumulative, as Prometheus's buckets are
        self.sum = 0.0
        self._published = ([0] * len(self.LE), 0.0)
        self._last = clock()

    def observe(self, durations: list[float]) -> None:
        for d in durations:
            self.sum += d
            for i in range(bisect.bisect_left(self.BUCKETS, d), len(self.LE)):
                self.counts[i] += 1
        if self.clock() - self._last >= self.publish_every_s:
            self.publish()

    def publish(self) -> None:
        buckets, count, total = self._metrics
        seen, summed = self._published
        for metric, now, before in zip(buckets, self.counts, seen):
            if now != before:
                metric.increment(now - before)
        if self.counts[-1] != seen[-1]:
            count.increment(self.counts[-1] - seen[-1])
            total.increment(self.sum - summed)
        self._published = (list(self.counts), self.sum)
        self._last = self.clock()


class StreamMetrics:
    """Our Prometheus metrics on Triton's metrics port, labelled by model:
    streamasr_open_streams (gauge), streamasr_reclaimed_streams_total and
    streamasr_request_errors_total (counters), streamasr_request_seconds (RequestSeconds).

    Published from execute() only, i.e. as of the model's last request: a pb_utils call
    from another thread races the stub's own IPC (tritonserver aborted with
    boost::interprocess::lock_exception under load while the sweeper thread published)."""

    _families: dict = {}
    _lock = threading.Lock()

    def __init__(self, model: str):
        fam = self._families
        if not fam:
            M = pb_utils.MetricFamily
            fam["open"] = M("streamasr_open_streams", "Streams with state held", M.GAUGE)
            fam["reclaimed"] = M(
                "streamasr_reclaimed_streams_total",
                "Streams whose state was swept after going idle without END",
                M.COUNTER,
            )
            fam["errors"] = M(
                "streamasr_request_errors_total", "Requests answered with an error", M.COUNTER
            )
            what = "Time this step spent on one request (one audio chunk)"
            for part in ("bucket", "count", "sum"):
                fam[part] = M(f"{REQUEST_SECONDS}_{part}", f"{what}: {part}", M.COUNTER)
        labels = {"model": model}
        self.open = fam["open"].Metric(labels=labels)
        self.reclaimed = fam["reclaimed"].Metric(labels=labels)
        self.errors = fam["errors"].Metric(labels=labels)
        self.seconds = RequestSeconds(
            [fam["bucket"].Metric(labels={**labels, "le": le}) for le in RequestSeconds.LE],
            fam["count"].Metric(labels=labels),
            fam["sum"].Metric(labels=labels),
        )
        self._reported = 0
        self._open_reported: int | None = None

    def observe(self, durations: list[float]) -> None:
        if durations:
            with self._lock:
                self.seconds.observe(durations)

    def sync(self, store: StreamStore) -> None:
        """Publish the store's figures.  ``reclaimed`` follows ``store.reclaimed``, which
        counts sweeps on the request path as well as the timer's."""
        with store.lock:
            reclaimed, n_open = store.reclaimed, len(store)
            delta = reclaimed - self._reported
            self._reported = reclaimed
        with self._lock:
            if delta:
                self.reclaimed.increment(delta)
            # Each metric call is a round trip to tritonserver: py-spy put this set() at
            # 71 % of the decoder step's time when it ran on every request.
            if n_open != self._open_reported:
                self.open.set(n_open)
                self._open_reported = n_open

    def error(self) -> None:
        with self._lock:
            self.errors.increment(1)


class AdmissionMetrics:
    """Admission control on Triton's metrics port (streamasr.core.admission):
    streamasr_admitted_streams_total, streamasr_refused_streams_total,
    streamasr_lead_closed_streams_total (counters) and streamasr_stream_capacity (gauge:
    the limit; 0 = none).  Published from execute()."""

    def __init__(self, model: str, limit: int | None):
        M = pb_utils.MetricFamily
        labels = {"model": model}
        # the families must outlive their metrics: keep them
        self._counters = (
            M("streamasr_admitted_streams_total", "Streams admitted at START", M.COUNTER),
            M(
                "streamasr_refused_streams_total",
                "STARTs refused because the server held its limit of streams",
                M.COUNTER,
            ),
            M(
                "streamasr_lead_closed_streams_total",
                "Streams closed for sending audio further ahead of real time than "
                "max_lead_seconds (or max_lead_seconds_at_capacity, at capacity)",
                M.COUNTER,
            ),
        )
        self._capacity = M(
            "streamasr_stream_capacity", "Streams admitted at most at once (0: no limit)", M.GAUGE
        )
        self.counters = [f.Metric(labels=labels) for f in self._counters]
        self.capacity = self._capacity.Metric(labels=labels)
        self.capacity.set(limit or 0)
        self._reported = (0,) * len(self.counters)

    def sync(self, counts: tuple[int, ...]) -> None:
        """``counts``: admitted, refused, closed for their lead, as totals so far."""
        if counts == self._reported:
            return
        for metric, before, now in zip(self.counters, self._reported, counts):
            if now > before:
                metric.increment(now - before)
        self._reported = counts


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: thousands of
    swept streams' small arrays would stay in the stub's RSS for good)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def start_sweeper(store: StreamStore, metrics: StreamMetrics, also=None) -> Sweeper:
    """Sweep on a timer too: Triton never tells a model that a sequence timed out.
    ``also``: a further pure-Python sweep to run each time (no pb_utils calls)."""
    trimmed = {"at": 0}

    def on_sweep(_n: int) -> None:
        if also is not None:
            also()
        # No pb_utils here (see StreamMetrics); execute() publishes the counts.
        # after many streams went away (by TTL or END), at most once per sweep
        if store.reclaimed - trimmed["at"] >= 256 or (
            len(store) == 0 and store.reclaimed != trimmed["at"]
        ):
            trimmed["at"] = store.reclaimed
            _release_freed_memory()

    return Sweeper([store], max(store.ttl_s / 4, 0.05), on_sweep).start()


def serve_each(
    requests: list,
    respond: Callable[[Any], list],
    log: logging.Logger,
    what: str,
    metrics: StreamMetrics | None = None,
    store: StreamStore | None = None,
    timed: Callable[[Any], bool] | None = None,
) -> list:
    """One response per request: ``respond(request)`` gives the output tensors; a
    StreamError or ValueError is the client's (its message is the answer), anything else
    is ours (logged, answered as an internal error) and never takes down the batch.
    With ``metrics``: errors counted, the stream ``store``'s figures published, each
    request's time observed (only where ``timed(request)`` says so, when given)."""
    responses, took = [], []
    for request in requests:
        t0 = time.perf_counter()
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=respond(request)))
        except (StreamRefused, RefusedStreamEnded) as exc:  # admission: no fault, not counted
            responses.append(error_response(str(exc), unavailable=True))
        except (StreamError, ValueError) as exc:
            if metrics is not None:
                metrics.error()
            responses.append(error_response(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one stream's bug must not fail the batch
            if metrics is not None:
                metrics.error()
            log.exception("unexpected error")
            responses.append(error_response(f"internal error in {what}: {exc}"))
        if timed is None or timed(request):
            took.append(time.perf_counter() - t0)
    if metrics is not None:
        if store is not None:
            metrics.sync(store)
        metrics.observe(took)
    return responses
