"""Admission control: how many streams one server holds, and a polite refusal beyond it.

A server that accepts every stream ends an overload in exhaustion (issue 14: at 4-5x
offered load chunk latency grew to minutes and tritonserver's memory followed the
backlog).  The feature step, where every stream starts, admits a new START only while
fewer than ``limit`` streams are open, and refuses the rest with a retryable error whose
message starts with ``CAPACITY_MARKER``; admitted streams keep their latency.

The limit comes from, in order: the environment variable ``STREAMASR_MAX_ACTIVE_STREAMS``
(a deployment sets it per instance type), the feature step's config.pbtxt parameter
``max_active_streams``, else ``MEASURED_STREAMS_HELD`` below: the one place the measured
capacity is written down.  ``0`` turns admission control off.

One admitted stream's own backlog is bounded elsewhere: the feature step closes a stream
that runs ``max_lead_seconds`` ahead of real time (streamasr.protocol), AsrConnection and
the SageMaker gateway keep at most ``MAX_PENDING_REQUESTS`` unanswered per stream
(docs/reliability.md, "Capacity, admission control and backlog").
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Hashable, Mapping

from streamasr.core.state import StreamError
from streamasr.protocol import CAPACITY_MARKER, is_capacity_refusal  # noqa: F401 (re-exported)

#: Paced real-time streams the committed model repository (acoustic_model 2 instances x
#: 1 thread, beam 16 + word LM with token pruning) held at p99 chunk latency <= 250 ms on
#: the 2-core CPU VM (no GPU) in every run: the same config held 28 in one run (vm-...-1743),
#: missed 28 by 0.6 ms in the next (1747), and two hours later held 16 (1922: 20 at p99
#: 259 ms, 24 at 338-358 ms) as the VM's speed drifted (benchmarks/results/capacity/
#: README.md, docs/benchmarks.md).  3x overload at this limit, in the slow period: admitted p99 79 ms.
#: The default admission limit; a deployment measures its own instance type.
MEASURED_STREAMS_HELD = 16
MEASURED_ON = "2-core CPU VM, benchmarks/results/capacity/pruned-i2t1/vm-20261203-1922"

#: SageMaker target tracking on ConcurrentRequestsPerModel (an open stream counts until it
#: closes, like an admitted stream here) aims at this share of the limit, so instances are
#: added before one starts refusing.
AUTOSCALE_TARGET_SHARE = 0.75


def autoscale_target(limit: int | None = MEASURED_STREAMS_HELD) -> float:
    """Concurrent streams per instance for SageMaker target tracking to aim at."""
    return round(AUTOSCALE_TARGET_SHARE * (limit or MEASURED_STREAMS_HELD), 1)


#: Environment override of the limit (an integer; 0 = no limit).
ENV_LIMIT = "STREAMASR_MAX_ACTIVE_STREAMS"
#: config.pbtxt parameter of the feature step: an integer, or "measured".
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


def parse_limit(value: str | int | None, where: str) -> int | None:
    """A configured limit: a non-negative integer (0: no limit, returned as None) or
    "measured" (``MEASURED_STREAMS_HELD``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == MEASURED):
        return MEASURED_STREAMS_HELD
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(
            f"{where} must be a non-negative integer or {MEASURED!r}, got {value!r}"
        ) from None
    if n < 0:
        raise ValueError(f"{where} must be a non-negative integer or {MEASURED!r}, got {n}")
    return n or None


def configured_limit(
    config_value: str | None, environ: Mapping[str, str] | None = None
) -> int | None:
    """The limit in force: the environment first, then config.pbtxt, then the measured
    figure.  None: no limit."""
    env = os.environ if environ is None else environ
    if env.get(ENV_LIMIT, "").strip():
        return parse_limit(env[ENV_LIMIT], f"environment variable {ENV_LIMIT}")
    return parse_limit(config_value, f"config.pbtxt parameter {CONFIG_KEY!r}")


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
