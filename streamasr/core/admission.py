"""Admission control: how many streams one server holds, and a polite refusal beyond it.

A server that accepts every stream ends an overload in exhaustion (issue 14: at 4-5x
offered load chunk latency grew to minutes and tritonserver's memory followed the
backlog).  The feature step, where every stream starts, admits a new START only while
fewer than ``limit`` streams are open, and refuses the rest with a retryable error whose
message starts with ``CAPACITY_MARKER``; admitted streams keep their latency.

The limit comes from, in order: the environment variable ``STREAMASR_MAX_ACTIVE_STREAMS``
(an override: an integer, 0 = no limit), the feature step's config.pbtxt parameter
``max_active_streams`` (an integer, or ``measured``: the default), and for ``measured`` a
calibration each instance runs at start-up (``streamasr.pipeline.calibration``: times the
acoustic model, the decoder and the feature step on this machine, before Triton is ready;
issue 26).  ``FALLBACK_STREAMS_HELD`` is used only when no calibration can run.

A live guard complements the start-up figure: ``QueueDelayGuard`` refuses new streams
while the measured queue delay is over its bound (the SageMaker gateway feeds it from its
canary, which waits in the same queues as every stream), so an instance whose neighbours
or inputs got slower than at start-up stops admitting before its streams miss real time.

The limit is also a rate: ``limit`` streams at real time need ``limit`` seconds of model
windows per second.  ``RealTimeBudget`` counts the windows the feature step sends on
against that rate, so a stream that runs ahead of real time (a client sending a file as
fast as the server answers) spends what is left, not what the real-time streams need:
while the budget is spent and another stream streams at real time, the feature step closes
a stream more than ``max_lead_seconds_at_capacity`` ahead (issue 26: fifteen such raw-gRPC
streams beside eight paced ones were all admitted under the calibrated limit and took the
instance down).

One admitted stream's own backlog is bounded elsewhere: the feature step closes a stream
that runs ``max_lead_seconds`` ahead of real time (streamasr.protocol), AsrConnection and
the SageMaker gateway keep at most ``MAX_PENDING_REQUESTS`` unanswered per stream
(docs/reliability.md, "Capacity, admission control and backlog").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable, Mapping

from streamasr.core.state import StreamError
from streamasr.protocol import CAPACITY_MARKER, is_capacity_refusal  # noqa: F401 (re-exported)

log = logging.getLogger("streamasr.admission")

#: The limit when no calibration can run (``measured`` asked for, but the calibration
#: failed, e.g. a repository without a ctc_decoder): half of what the quiet 2-core VM
#: held with the committed repository (32 paced streams at p99 <= 250 ms, issue 26).
FALLBACK_STREAMS_HELD = 16

#: SageMaker target tracking on ConcurrentRequestsPerModel (an open stream counts until it
#: closes, like an admitted stream here) aims at this share of the limit, so instances are
#: added before one starts refusing.
AUTOSCALE_TARGET_SHARE = 0.75


def autoscale_target(limit: int | None = None) -> float:
    """Concurrent streams per instance for SageMaker target tracking to aim at: a share
    of ``limit`` (the instance type's limit: its override, or what its calibration
    picks), else of the fallback."""
    return round(AUTOSCALE_TARGET_SHARE * (limit or FALLBACK_STREAMS_HELD), 1)


#: Environment override of the limit (an integer; 0 = no limit).
ENV_LIMIT = "STREAMASR_MAX_ACTIVE_STREAMS"
#: config.pbtxt parameter of the feature step: an integer, or "measured" (calibrate).
CONFIG_KEY = "max_active_streams"
MEASURED = "measured"
#: Every refusal's message starts with CAPACITY_MARKER (streamasr.protocol: clients
#: match it to retry later).
#: How long a refused stream id is remembered (its END, if the client sends one to free
#: Triton's sequence slot at once, is then answered as such, not as an unknown stream).
REFUSED_MEMORY_S = 120.0
REFUSED_MEMORY_MAX = 65_536


class StreamRefused(StreamError):
    """A START refused because the server holds its limit of streams: retry later.
    The Triton adapter answers it with status UNAVAILABLE."""

    retryable = True


class RefusedStreamEnded(StreamError):
    """The END a client sent for a stream that was refused at START: nothing to end.
    Answered with an error (there is no result), but not counted as one."""


def parse_limit(
    value: str | int | None, where: str, calibrate: Callable[[], int] | None = None
) -> int | None:
    """A configured limit: a non-negative integer (0: no limit, returned as None) or
    "measured" (``calibrate()``; ``FALLBACK_STREAMS_HELD`` when there is none or it
    fails)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == MEASURED):
        return measured_limit(calibrate)
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(
            f"{where} must be a non-negative integer or {MEASURED!r}, got {value!r}"
        ) from None
    if n < 0:
        raise ValueError(f"{where} must be a non-negative integer or {MEASURED!r}, got {n}")
    return n or None


def measured_limit(calibrate: Callable[[], int] | None) -> int:
    if calibrate is None:
        log.warning("no calibration to run: admission limit %d (fallback)", FALLBACK_STREAMS_HELD)
        return FALLBACK_STREAMS_HELD
    try:
        n = int(calibrate())
    except Exception as exc:  # noqa: BLE001 - any failure: keep serving, say so
        log.warning(
            "admission calibration failed (%s: %s): limit %d (fallback)",
            type(exc).__name__,
            exc,
            FALLBACK_STREAMS_HELD,
        )
        return FALLBACK_STREAMS_HELD
    if n < 1:
        raise ValueError(f"calibration picked {n} streams; a limit must be >= 1")
    return n


def configured_limit(
    config_value: str | None,
    environ: Mapping[str, str] | None = None,
    calibrate: Callable[[], int] | None = None,
) -> int | None:
    """The limit in force: the environment first, then config.pbtxt, then (for
    ``measured``) ``calibrate()``, which runs only when nothing overrides it.
    None: no limit."""
    env = os.environ if environ is None else environ
    if env.get(ENV_LIMIT, "").strip():
        return parse_limit(env[ENV_LIMIT], f"environment variable {ENV_LIMIT}")
    return parse_limit(config_value, f"config.pbtxt parameter {CONFIG_KEY!r}", calibrate)


#: Environment variable: the queue-delay bound of QueueDelayGuard in seconds (0: off).
ENV_QUEUE_DELAY = "STREAMASR_ADMISSION_MAX_QUEUE_DELAY"
#: 2x the 250 ms real-time budget of a chunk: a queue this long means the streams already
#: admitted are missing real time, so a new one would only make it worse.  Below the
#: gateway's canary deadline (4 s), where /ping turns 503.
QUEUE_DELAY_BOUND_S = 0.5
#: How long one delay observation counts: the canary runs every 2 s, so two of them.
QUEUE_DELAY_WINDOW_S = 5.0


class QueueDelayGuard:
    """Refuses new streams while the queue delay measured in the last ``window_s`` is
    over ``bound_s``.  ``observe`` takes measurements (e.g. canary latencies), and an
    ``in_flight_since`` probe that has not come back yet counts with its age."""

    def __init__(
        self,
        bound_s: float = QUEUE_DELAY_BOUND_S,
        window_s: float = QUEUE_DELAY_WINDOW_S,
        clock=time.monotonic,
    ):
        if bound_s <= 0 or window_s <= 0:
            raise ValueError(f"queue-delay bound and window must be > 0, got {bound_s}, {window_s}")
        self.bound_s, self.window_s, self.clock = bound_s, window_s, clock
        self._lock = threading.Lock()
        self._samples: list[tuple[float, float]] = []  # (when, delay)
        self._in_flight_since: float | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, clock=time.monotonic
    ) -> "QueueDelayGuard | None":
        """The guard ``STREAMASR_ADMISSION_MAX_QUEUE_DELAY`` asks for (None when 0)."""
        env = os.environ if environ is None else environ
        raw = env.get(ENV_QUEUE_DELAY, "").strip()
        if not raw:
            return cls(clock=clock)
        try:
            bound = float(raw)
        except ValueError:
            raise ValueError(
                f"{ENV_QUEUE_DELAY} must be a number of seconds, got {raw!r}"
            ) from None
        if bound < 0:
            raise ValueError(f"{ENV_QUEUE_DELAY} must be >= 0, got {bound}")
        return cls(bound, clock=clock) if bound else None

    def observe(self, delay_s: float) -> None:
        now = self.clock()
        with self._lock:
            self._samples.append((now, delay_s))
            self._samples = [(t, d) for t, d in self._samples if now - t <= self.window_s]

    def probe_started(self, since: float | None) -> None:
        """A probe in flight since ``since`` (None: none): its age is a delay too."""
        with self._lock:
            self._in_flight_since = since

    def delay(self) -> float:
        """The largest queue delay seen in the window (0 without measurements)."""
        now = self.clock()
        with self._lock:
            recent = [d for t, d in self._samples if now - t <= self.window_s]
            if self._in_flight_since is not None:
                recent.append(now - self._in_flight_since)
        return max(recent, default=0.0)

    def over(self) -> bool:
        return self.delay() > self.bound_s

    def refusal(self) -> str | None:
        """The refusal message while over the bound, else None."""
        d = self.delay()
        if d <= self.bound_s:
            return None
        return (
            f"{CAPACITY_MARKER}: queue delay {d * 1e3:.0f} ms is over its "
            f"{self.bound_s * 1e3:.0f} ms bound; no new stream is started until it falls. "
            "Retry later (this is not an error in the request), or use another endpoint "
            "instance"
        )


class Admission:
    """Counts admitted and refused STARTs against ``limit`` open streams (None: no limit).
    Thread-safe; the caller passes the number of streams open now."""

    def __init__(self, limit: int | None, clock=time.monotonic):
        if limit is not None and limit < 1:
            raise ValueError(f"admission limit must be >= 1 or None, got {limit}")
        self.limit = limit
        self.clock = clock
        self.admitted = 0
        self.refused = 0
        self._refused_ids: "OrderedDict[Hashable, float]" = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, stream: Hashable, open_streams: int) -> None:
        """Admit ``stream`` (count it) or raise StreamRefused."""
        with self._lock:
            if self.limit is not None and open_streams >= self.limit:
                self.refused += 1
                self._remember(stream)
                raise StreamRefused(
                    f"{CAPACITY_MARKER}: {open_streams} streams open, the limit is "
                    f"{self.limit}; stream {stream} was not started. Retry later (this is "
                    f"not an error in the request), or use another endpoint instance"
                )
            self.admitted += 1
            self._refused_ids.pop(stream, None)

    def _remember(self, stream: Hashable) -> None:
        now = self.clock()
        self._refused_ids.pop(stream, None)
        self._refused_ids[stream] = now
        while self._refused_ids and (
            len(self._refused_ids) > REFUSED_MEMORY_MAX
            or now - next(iter(self._refused_ids.values())) > REFUSED_MEMORY_S
        ):
            self._refused_ids.popitem(last=False)

    def check_refused(self, stream: Hashable, end: bool) -> None:
        """A later request (END, say) for a stream refused at START: RefusedStreamEnded,
        which names the refusal instead of "unknown stream".  The END forgets the id."""
        with self._lock:
            if stream not in self._refused_ids:
                return
            if end:
                del self._refused_ids[stream]
        raise RefusedStreamEnded(
            f"stream {stream} was refused at START ({CAPACITY_MARKER}); there is nothing "
            "to " + ("end" if end else "continue: start a new stream later")
        )

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.admitted, self.refused


#: config.pbtxt parameter of the feature step: how far (seconds) a stream may run ahead of
#: real time while the instance's real-time budget is spent and another stream streams at
#: real time (0: no such check).
LEAD_AT_CAPACITY_KEY = "max_lead_seconds_at_capacity"
#: Its default: a paced client is within a frame or two of real time (its jitter and the
#: gateway's 100 ms frame joins are well under this); a client sending as fast as the
#: server answers is past it within its first few requests.
DEFAULT_LEAD_AT_CAPACITY_S = 1.0
#: A stream counts as "at real time" (one the check protects) once it has been open this
#: long without running further ahead than the at-capacity lead: a newly started stream
#: is not yet known to be paced, and must not get a fast stream closed on its first request.
REALTIME_AFTER_S = 1.0
#: The budget's burst, in seconds of its rate: what simultaneous STARTs and a gateway's
#: frame joins send at once.  Small, because a flood admitted in the burst is computed
#: before anyone can be closed.
BUDGET_BURST_S = 0.5


class RealTimeBudget:
    """Seconds of audio per second (counted in model windows) that the admission limit's
    streams need at real time: a token bucket refilled at ``windows_per_s`` and holding
    at most ``burst_s`` of it.  ``spend`` takes every window sent on (real-time streams'
    too, which are never refused for it); ``spent`` says whether nothing is left.
    Debt is kept down to one burst, so a flood that is over does not count for long."""

    def __init__(self, windows_per_s: float, burst_s: float = BUDGET_BURST_S, clock=time.monotonic):
        if windows_per_s <= 0 or burst_s <= 0:
            raise ValueError(f"budget rate and burst must be > 0, got {windows_per_s}, {burst_s}")
        self.rate, self.clock = windows_per_s, clock
        self.burst = windows_per_s * burst_s
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    @classmethod
    def for_limit(
        cls, limit: int | None, window_seconds: float, clock=time.monotonic
    ) -> "RealTimeBudget | None":
        """The budget of ``limit`` real-time streams whose model windows each carry
        ``window_seconds`` of audio (None without a limit)."""
        if limit is None:
            return None
        return cls(limit / window_seconds, clock=clock)

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def spend(self, windows: int) -> None:
        if windows <= 0:
            return
        with self._lock:
            self._refill()
            self._tokens = max(-self.burst, self._tokens - windows)

    def spent(self) -> bool:
        with self._lock:
            self._refill()
            return self._tokens <= 0
