"""The gateway's view of Triton and its health: one connection (one gRPC stream shared
by every session) and the health state ``/ping`` answers from.

Triton's own readiness RPCs do not tell the truth about the pipeline.  Measured on
Triton 2.51: after ``kill -9`` of the ``ctc_decoder`` python stub, ServerReady and
ModelReady (``streaming_asr`` and ``ctc_decoder`` alike) stay true, the stub is never
restarted (watched for 23 s), nothing is logged, and every request through the ensemble
is answered, after about 1 s, "Stub process 'ctc_decoder_0_0' is not healthy".  And a
pipeline wedged behind a flood of queued requests still answers the readiness RPCs.  So
each health check (every ``HEALTH_INTERVAL_S``) asks, in order:

1. Triton's ServerReady and ModelReady of the models the gateway uses;
2. whether every python backend stub alive when the pipeline was first ready still is
   (``StubWatch``; only where the gateway knows tritonserver's process: docker/serve);
3. a canary: a tiny stream through ``streaming_asr`` (one START+END request with
   ``CANARY_AUDIO_S`` of silence) on the gateway's own gRPC stream, with its own sequence
   id, every ``canary_interval_s``.  It must be answered within ``canary_deadline_s``;
   that deadline is also the bound on queue delay, since the canary waits in the same
   queues as every stream (a late answer is unhealthy too).  A canary refused "server at
   capacity" (streamasr.core.admission) was answered by the pipeline: healthy.  At startup
   /ping says 200 only once the first canary came back.

``HealthState`` turns the first problem found into /ping's verdict, and tells
docker/serve when the pipeline has been unhealthy for ``exit_after_s`` after having been
healthy once (so that SageMaker replaces the container).  Settings:
``HealthConfig.from_env`` (docs/sagemaker.md, "Health").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc
import numpy as np

from streamasr.core.admission import QueueDelayGuard
from streamasr.core.params import parse_float
from streamasr.protocol import (
    CONTRACT_MODEL,
    OFFLINE_MODEL,
    STREAM_MODEL,
    ModelContract,
    is_capacity_refusal,
)
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr_client.stream import AsrConnection, AsrError, Session

log = logging.getLogger("streamasr.health")

# /ping answers from the state of a background health check: how often it runs, and how
# old a state may be before /ping stops trusting it.
HEALTH_INTERVAL_S = 1.0


HEALTH_STALE_S = 15.0


# How long a /ping waits for the very first health check after startup.
FIRST_HEALTH_WAIT_S = 1.5

# Defaults of HealthConfig.  Worst case from a wedge to /ping 503: a canary starts within
# interval + one check, misses its deadline, and the next check sees it:
# 2 + 1 + 4 + 1 = 8 s, inside the 10 s target.  4 s is 16x the 250 ms real-time budget.
CANARY_INTERVAL_S = 2.0
CANARY_DEADLINE_S = 4.0
# docker/serve exits (status UNHEALTHY_EXIT_CODE) after this long unhealthy in a row.
EXIT_AFTER_S = 30.0
UNHEALTHY_EXIT_CODE = 3

# Silence in a canary: well under one model chunk; with END in the same request the
# feature step flushes it, so the acoustic model and the decoder run too.
CANARY_AUDIO_S = 0.1

ENV_CANARY_INTERVAL = "STREAMASR_HEALTH_CANARY_INTERVAL"
ENV_CANARY_DEADLINE = "STREAMASR_HEALTH_CANARY_DEADLINE"
ENV_EXIT_AFTER = "STREAMASR_HEALTH_EXIT_AFTER"


@dataclass
class HealthConfig:
    """``canary_interval_s`` 0 turns the canary off; ``exit_after_s`` 0: never exit."""

    canary_interval_s: float = CANARY_INTERVAL_S
    canary_deadline_s: float = CANARY_DEADLINE_S
    exit_after_s: float = EXIT_AFTER_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "HealthConfig":
        e = os.environ if env is None else env
        c = cls()
        for name, attr in (
            (ENV_CANARY_INTERVAL, "canary_interval_s"),
            (ENV_CANARY_DEADLINE, "canary_deadline_s"),
            (ENV_EXIT_AFTER, "exit_after_s"),
        ):
            if name in e:
                setattr(c, attr, parse_float(name, e[name]))
        if c.canary_deadline_s <= 0:
            raise ValueError(f"{ENV_CANARY_DEADLINE}: must be > 0, got {c.canary_deadline_s}")
        return c


class Canary:
    """One tiny stream at a time through the streaming pipeline; its answer arrives on
    the connection's reader thread, so starting one never blocks the health check."""

    def __init__(
        self,
        cfg: HealthConfig,
        clock: Callable[[], float] = time.monotonic,
        guard: QueueDelayGuard | None = None,
    ):
        self.cfg, self.clock = cfg, clock
        # the canary's latency is the queue delay every stream sees: admission's live guard
        self.guard = guard
        self._lock = threading.Lock()
        self._in_flight_since: float | None = None
        self._last_start: float | None = None
        # (latency, problem) of the last canary answered; None before the first answer
        self.last: tuple[float, str | None] | None = None
        self.answered = 0

    def due(self) -> bool:
        with self._lock:
            if self._in_flight_since is not None:
                return False  # never a second one behind a stuck one
            last = self._last_start
        return last is None or self.clock() - last >= self.cfg.canary_interval_s

    def start(self, conn: AsrConnection, contract: ModelContract) -> None:
        audio = np.zeros(int(CANARY_AUDIO_S * contract.sample_rate), np.float32)
        now = self.clock()
        with self._lock:
            self._in_flight_since = self._last_start = now
        if self.guard is not None:
            self.guard.probe_started(now)
        try:
            s = conn.open_session(model=STREAM_MODEL)
            s.add_listener(lambda: self._answer(conn, s, now))
            s.close(audio)  # START and END in one request: no state left behind
        except AsrError as exc:  # the connection is closing
            self._finish(now, f"canary not sent: {exc}")

    def _answer(self, conn: AsrConnection, s: Session, started: float) -> None:
        if s.answered < s.sent:
            return
        conn.forget(s)
        errors = [e for e in s.errors if not is_capacity_refusal(e)]
        # the server's own error text: the canary's input is ours, never a client's
        self._finish(
            started, f"canary through {STREAM_MODEL} failed: {errors[0]}" if errors else None
        )

    def _finish(self, started: float, problem: str | None) -> None:
        latency = self.clock() - started
        with self._lock:
            if self._in_flight_since == started:
                self._in_flight_since = None
            self.last = (latency, problem)
            self.answered += 1
        if self.guard is not None:
            self.guard.probe_started(None)
            if problem is None:  # a failed canary says nothing about queues
                self.guard.observe(latency)
        log.debug("canary answered in %.1f ms: %s", latency * 1e3, problem or "ok")

    def problem(self) -> str | None:
        """What the canaries say is wrong now, or None."""
        deadline = self.cfg.canary_deadline_s
        with self._lock:
            since, last = self._in_flight_since, self.last
        if since is not None and self.clock() - since > deadline:
            return f"canary through {STREAM_MODEL} unanswered past its {deadline:g} s deadline"
        if last is None:  # startup: ready means a canary came back
            return f"no canary through {STREAM_MODEL} answered yet"
        latency, problem = last
        if problem is not None:
            return problem
        if latency > deadline:
            return f"canary through {STREAM_MODEL} answered late (over its {deadline:g} s deadline)"
        return None


class StubWatch:
    """The python backend stubs (children of tritonserver) alive when the pipeline was
    first ready: Triton 2.51 neither restarts a dead one nor reports its model unready."""

    def __init__(self, list_stubs: Callable[[], dict[int, str]]):
        self.list_stubs = list_stubs
        self.baseline: dict[int, str] | None = None
        self._reported: set[int] = set()

    def problem(self) -> str | None:
        alive = self.list_stubs()
        if self.baseline is None:
            self.baseline = alive
            log.info("watching %d python backend stubs", len(alive))
            return None
        dead = {pid: m for pid, m in self.baseline.items() if pid not in alive}
        for pid in sorted(set(dead) - self._reported):
            log.error(
                "python backend stub of %s (pid %d) died; Triton does not restart it and "
                "still reports the model ready: the pipeline cannot answer",
                dead[pid],
                pid,
            )
            self._reported.add(pid)
        if dead:
            names = ", ".join(f"{m} (pid {pid})" for pid, m in sorted(dead.items()))
            return f"python backend stub(s) died: {names}"
        return None


class HealthState:
    """The verdict of the last check, and how long the pipeline has been unhealthy."""

    def __init__(self, exit_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.exit_after_s, self.clock = exit_after_s, clock
        self._lock = threading.Lock()
        self.healthy_once = False
        self.unhealthy_since: float | None = None
        self.checked_at: float | None = None
        self.reason = "no health check yet"

    def record(self, problem: str | None) -> tuple[bool, str]:
        now = self.clock()
        with self._lock:
            self.checked_at = now
            if problem is None:
                self.healthy_once = True
                self.unhealthy_since, self.reason = None, "ready"
            else:
                if self.unhealthy_since is None:
                    self.unhealthy_since = now
                self.reason = problem
            return problem is None, self.reason

    def fatal(self) -> str | None:
        """Why the container should exit now, or None: unhealthy (or no check at all) for
        ``exit_after_s`` in a row, after having been healthy once (never during
        startup)."""
        if self.exit_after_s <= 0:
            return None
        now = self.clock()
        with self._lock:
            if not self.healthy_once:
                return None
            if self.checked_at is not None and now - self.checked_at >= self.exit_after_s:
                return f"no health check for {now - self.checked_at:.0f} s"
            if self.unhealthy_since is not None and now - self.unhealthy_since >= self.exit_after_s:
                return f"unhealthy for {now - self.unhealthy_since:.0f} s: {self.reason}"
        return None


class Backend:
    """The gateway's view of Triton: one AsrConnection (one gRPC stream, many sessions),
    which re-opens its stream itself should it break (e.g. Triton restarted).
    ``list_stubs``: pid -> model of tritonserver's live python stubs, where known
    (docker/serve: ``TritonServer.python_stubs``)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        health: HealthConfig | None = None,
        list_stubs: Callable[[], dict[int, str]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        queue_guard: QueueDelayGuard | None = None,
    ):
        self.cfg = cfg
        self.health_cfg = health or HealthConfig.from_env()
        self._lock = threading.Lock()
        # one gRPC stream per model: tritonserver 2.51 aborted (gRPC proto_buffer_writer
        # assertion in TRITONBACKEND_ResponseSend) with the decoupled two-pass ensemble's
        # responses on the same stream as other models' (the canary, one-pass sessions)
        self._conns: dict[str, AsrConnection] = {}
        self._contract: ModelContract | None = None
        self.stubs = StubWatch(list_stubs) if list_stubs is not None else None
        # admission's live guard (streamasr.core.admission): new sessions are refused as
        # busy while the canary's queue delay is over its bound; None: off (docker/serve
        # passes QueueDelayGuard.from_env())
        self.queue_guard = queue_guard if self.health_cfg.canary_interval_s > 0 else None
        self.canary = Canary(self.health_cfg, clock, self.queue_guard)
        self.state = HealthState(self.health_cfg.exit_after_s, clock)

    def connection(self, model: str = STREAM_MODEL) -> AsrConnection:
        """The connection (one gRPC stream) that sessions of ``model`` share."""
        with self._lock:
            conn = self._conns.get(model)
            if conn is None:
                root = None
                if self.cfg.grpc_root_cert:
                    with open(self.cfg.grpc_root_cert, "rb") as f:
                        root = f.read()
                # The gateway waits for room itself (never blocking its event loop):
                # the connection's window is the gateway's.
                conn = self._conns[model] = AsrConnection(
                    self.cfg.triton_grpc,
                    ssl=self.cfg.grpc_ssl,
                    root_certificates=root,
                    max_pending=self.cfg.max_pending_requests,
                )
            return conn

    def contract(self) -> ModelContract:
        if self._contract is None:
            self._contract = self.connection().contract()
        return self._contract

    @property
    def known_contract(self) -> ModelContract | None:
        """The contract when it has been fetched already (no I/O)."""
        return self._contract

    def ready(self) -> tuple[bool, str]:
        """One health check (blocking, on the health thread): (ready, reason)."""
        return self.state.record(self._problem())

    def _problem(self) -> str | None:
        conn = self.connection()
        try:
            if not conn.server_ready():
                return "triton server not ready"
            for m in (STREAM_MODEL, OFFLINE_MODEL, CONTRACT_MODEL):
                if not conn.model_ready(m):
                    return f"model {m} not ready"
            contract = self.contract()
        except grpc.RpcError as exc:
            return f"triton unreachable: {exc.code().name}"
        if self.stubs is not None:
            problem = self.stubs.problem()
            if problem:
                return problem
        if self.health_cfg.canary_interval_s <= 0:
            return None
        problem = self.canary.problem()  # before a new one replaces the last answer
        if self.canary.due():
            self.canary.start(conn, contract)
        return problem

    def admission_refusal(self) -> str | None:
        """Why a new session must be refused now (queue delay over its bound), or None."""
        return self.queue_guard.refusal() if self.queue_guard is not None else None

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns = {}
