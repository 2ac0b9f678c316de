"""Health that tells the truth (issue 21): /ping turns 503 when the pipeline cannot
answer (a dead python stub, a wedged model, a canary past its deadline), docker/serve
exits non-zero when it stays so, and the canary never disturbs a real stream."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from streamasr.protocol import CAPACITY_MARKER, WS_PATH, final_text
from streamasr.sagemaker.gateway.health import (
    CANARY_DEADLINE_S,
    ENV_CANARY_DEADLINE,
    ENV_CANARY_INTERVAL,
    ENV_EXIT_AFTER,
    UNHEALTHY_EXIT_CODE,
    Canary,
    HealthConfig,
    HealthState,
    StubWatch,
)
from streamasr.triton.server import child_processes
from streamasr_client.stream import AsrConnection

from ..helpers import Serve, copy_repository, needs_demo, sagemaker_env, triton_children
from .test_gateway import demo_int16, whole_transcript

# Issue 21's target: /ping 503 within 10 s of a dead stub or a wedged pipeline.
DETECT_BOUND_S = 10.0
EXIT_AFTER_S = 5.0  # docker/serve's exit bound in these tests (default 30 s)
POLL_S = 0.1
STARTUP_S = 180.0  # Serve.wait_ready's limit
NOT_EXITING_S = 5.0  # several times the 1 s exit bound
# The flood: streams of this much speech kept queued at once (each START+END in one
# request: ~1 min of backlog on 2 cores), and how long its backlog may take to drain.
FLOOD_PENDING = 48
FLOOD_AUDIO_S = 8.0
DRAIN_S = 180.0
FRAME_S = 0.1  # a live caller's frame


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- units: the health logic, with a fake clock ---------------------------------------------


def test_health_config_reads_typed_values_and_refuses_bad_ones():
    c = HealthConfig.from_env(
        {ENV_CANARY_INTERVAL: "0.5", ENV_CANARY_DEADLINE: "3", ENV_EXIT_AFTER: "0"}
    )
    assert (c.canary_interval_s, c.canary_deadline_s, c.exit_after_s) == (0.5, 3.0, 0.0)
    assert HealthConfig.from_env({}) == HealthConfig()
    with pytest.raises(ValueError, match=ENV_CANARY_DEADLINE):
        HealthConfig.from_env({ENV_CANARY_DEADLINE: "0"})
    with pytest.raises(ValueError, match=ENV_EXIT_AFTER):
        HealthConfig.from_env({ENV_EXIT_AFTER: "-1"})
    with pytest.raises(ValueError, match=ENV_CANARY_INTERVAL):
        HealthConfig.from_env({ENV_CANARY_INTERVAL: "soon"})


def test_unhealthy_past_the_bound_is_fatal_only_after_healthy_once():
    clock = FakeClock()
    st = HealthState(exit_after_s=30, clock=clock)
    assert st.record("model x not ready") == (False, "model x not ready")
    clock.now += 100
    assert st.fatal() is None, "startup: never fatal before the first healthy check"
    assert st.record(None) == (True, "ready")
    clock.now += 1
    st.record("canary late")
    clock.now += 29
    st.record("canary late")
    assert st.fatal() is None
    clock.now += 1
    assert "unhealthy for 30 s: canary late" in (st.fatal() or "")
    st.record(None)  # recovered: the clock starts again
    assert st.fatal() is None
    st.record("stub died")
    clock.now += 29.9
    assert st.fatal() is None


def test_health_checks_that_stop_are_fatal_and_zero_never_exits():
    clock = FakeClock()
    st = HealthState(exit_after_s=30, clock=clock)
    st.record(None)
    clock.now += 31  # the gateway's health loop stopped running
    assert "no health check" in (st.fatal() or "")
    never = HealthState(exit_after_s=0, clock=clock)
    never.record(None)
    never.record("stub died")
    clock.now += 1e6
    assert never.fatal() is None


class FakeSession:
    def __init__(self) -> None:
        self.sent = self.answered = 0
        self.errors: list[str] = []
        self.listeners: list = []

    def add_listener(self, fn) -> None:
        self.listeners.append(fn)

    def close(self, audio) -> None:
        assert len(audio) > 0
        self.sent = 1

    def answer(self, error: str | None = None) -> None:
        if error:
            self.errors.append(error)
        self.answered = 1
        for fn in self.listeners:
            fn()


class FakeConnection:
    """Records the canary sessions the Canary opens, answered by the test."""

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.forgotten: list[FakeSession] = []

    def open_session(self, model=None) -> FakeSession:
        self.sessions.append(FakeSession())
        return self.sessions[-1]

    def forget(self, s) -> None:
        self.forgotten.append(s)


class FakeContract:
    sample_rate = 16000


def test_canary_deadline_late_answer_failure_and_capacity_refusal():
    clock = FakeClock()
    canary = Canary(HealthConfig(canary_interval_s=2, canary_deadline_s=4), clock)
    conn = FakeConnection()
    assert canary.due() and "no canary" in (canary.problem() or "")
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    assert not canary.due(), "never a second canary behind one in flight"
    clock.now += 4.5
    assert "unanswered past its 4 s deadline" in (canary.problem() or "")
    conn.sessions[0].answer()  # at last: late, still unhealthy
    assert "answered late" in (canary.problem() or "")
    assert conn.forgotten == [conn.sessions[0]]
    assert canary.due()
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    clock.now += 0.05
    assert "answered late" in (canary.problem() or ""), "until a canary answers in time"
    conn.sessions[1].answer()
    assert canary.problem() is None
    clock.now += 1
    assert not canary.due(), "interval"
    clock.now += 1
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    conn.sessions[2].answer(f"{CAPACITY_MARKER}: 16 streams")
    assert canary.problem() is None, "a refusal at capacity is an answer"
    clock.now += 2
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    conn.sessions[3].answer("Stub process 'ctc_decoder_0_0' is not healthy.")
    assert "not healthy" in (canary.problem() or "")


def test_canary_latency_feeds_the_admission_queue_delay_guard():
    from streamasr.core.admission import QueueDelayGuard

    clock = FakeClock()
    guard = QueueDelayGuard(bound_s=0.5, window_s=5.0, clock=clock)
    canary = Canary(HealthConfig(canary_interval_s=2, canary_deadline_s=4), clock, guard)
    conn = FakeConnection()
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    clock.now += 0.7
    assert guard.over(), "a canary unanswered for 0.7 s: the queues are that long"
    conn.sessions[0].answer()
    assert guard.over() and canary.problem() is None, "slow for admission, healthy for /ping"
    clock.now += 6  # out of the window; the next canary is fast
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    clock.now += 0.05
    conn.sessions[1].answer()
    assert not guard.over()
    clock.now += 2
    canary.start(conn, FakeContract())  # type: ignore[arg-type]
    clock.now += 0.01
    conn.sessions[2].answer("Stub process 'ctc_decoder_0_0' is not healthy.")
    assert not guard.over(), "a failed canary is a health problem, not a queue delay"


def test_stub_watch_reports_a_dead_stub_and_logs_it_once(caplog):
    alive = {11: "feature_extractor", 12: "ctc_decoder"}
    watch = StubWatch(lambda: dict(alive))
    assert watch.problem() is None  # the baseline
    assert watch.problem() is None
    del alive[12]
    with caplog.at_level(logging.ERROR, logger="streamasr.health"):
        for _ in range(3):
            assert watch.problem() == "python backend stub(s) died: ctc_decoder (pid 12)"
    died = [r for r in caplog.records if "died" in r.getMessage()]
    assert len(died) == 1 and died[0].levelno == logging.ERROR


# -- docker/serve against a real tritonserver ----------------------------------------------


def ping(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0, ""


def wait_for_ping(url: str, status: int, within: float) -> tuple[float, str]:
    """Seconds until /ping answers ``status``, and its text; fails after ``within``."""
    t0 = time.monotonic()
    seen: list[tuple[int, str]] = []
    while time.monotonic() - t0 < within:
        code, text = ping(url)
        if code == status:
            return time.monotonic() - t0, text
        if not seen or seen[-1] != (code, text):
            seen.append((code, text))
        time.sleep(POLL_S)
    pytest.fail(f"/ping did not answer {status} within {within} s; seen {seen}")


def stub_pid(serve_pid: int, model: str) -> int:
    (triton,) = triton_children(serve_pid)
    (pid,) = [
        p
        for p, argv in child_processes(triton).items()
        if argv[0].endswith("triton_python_backend_stub")
        and Path(argv[1]).parent.parent.name == model
    ]
    return pid


@pytest.mark.parametrize("own_serve", [{ENV_EXIT_AFTER: str(EXIT_AFTER_S)}], indirect=True)
def test_killed_decoder_stub_turns_ping_503_and_serve_exits_nonzero(own_serve):
    """Before: /ping stayed 200 and nothing was logged (Triton keeps the model READY)."""
    os.kill(stub_pid(own_serve.proc.pid, "ctc_decoder"), signal.SIGKILL)
    killed = time.monotonic()
    took, text = wait_for_ping(own_serve.url, 503, DETECT_BOUND_S)
    assert "ctc_decoder" in text and "died" in text, text
    code = own_serve.proc.wait(timeout=EXIT_AFTER_S + 60)
    exited = time.monotonic() - killed
    log = own_serve.log()
    assert code == UNHEALTHY_EXIT_CODE, log
    assert log.count("python backend stub of ctc_decoder") == 1, log
    assert "UNHEALTHY: unhealthy for" in log and "ctc_decoder" in log
    print(f"\nkill -9 ctc_decoder stub: /ping 503 after {took:.2f} s, serve exited {exited:.1f} s")


@needs_demo
@pytest.mark.parametrize(
    "own_serve", [{ENV_CANARY_DEADLINE: str(CANARY_DEADLINE_S), ENV_EXIT_AFTER: "0"}], indirect=True
)
def test_flooded_pipeline_turns_ping_503_and_200_after_it_drains(own_serve):
    """A raw gRPC client keeps FLOOD_PENDING streams of FLOOD_AUDIO_S speech queued: the
    readiness RPCs still answer, but a new stream waits behind the backlog, so the canary
    misses its deadline.  The flood stops, the backlog drains, /ping is 200 again.
    (SIGSTOP of a stub is no recoverable wedge: measured on 2.51, requests get "not
    healthy" after ~1 s, and SIGCONT makes tritonserver abort.)"""
    a, sr = demo_int16()
    audio = a[: int(FLOOD_AUDIO_S * sr)]
    stop = threading.Event()
    with AsrConnection(f"127.0.0.1:{own_serve.grpc_port}", pace=False) as conn:
        assert conn.sample_rate() == sr

        def flood():
            live: list = []
            while not stop.is_set():
                for s in [s for s in live if s.pending == 0]:
                    live.remove(s)
                    conn.forget(s)
                while len(live) < FLOOD_PENDING:
                    live.append(conn.open_session())
                    live[-1].close(audio)
                stop.wait(POLL_S)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            took, text = wait_for_ping(own_serve.url, 503, DETECT_BOUND_S)
            assert "canary" in text, text
        finally:
            stop.set()
            flooder.join()
        stopped = time.monotonic()
        wait_for_ping(own_serve.url, 200, DRAIN_S)
        back = time.monotonic() - stopped
    assert own_serve.proc.poll() is None
    print(f"\nflood: /ping 503 after {took:.2f} s ({text}); 200 {back:.2f} s after it stopped")


def test_canary_past_a_tiny_deadline_is_503_and_never_exits_during_startup(tmp_path):
    """Every canary misses a 0.5 ms deadline: /ping never says 200, and docker/serve,
    never healthy, does not exit although its exit bound (1 s) passes many times."""
    repo = copy_repository(tmp_path / "repo", {})
    env = {ENV_CANARY_DEADLINE: "0.0005", ENV_EXIT_AFTER: "1"}
    s = Serve(
        sagemaker_env(tmp_path, STREAMASR_MODEL_REPOSITORY=str(repo), **env), tmp_path / "log"
    )
    try:
        t0 = time.monotonic()
        while True:  # the models load, then canaries run
            assert s.proc.poll() is None, s.log()
            code, text = ping(s.url)
            assert code in (0, 503), (code, text)
            if "answered late" in text:
                break
            assert time.monotonic() - t0 < STARTUP_S, s.log()
            time.sleep(POLL_S)
        for _ in range(int(NOT_EXITING_S / POLL_S)):
            assert ping(s.url)[0] == 503
            time.sleep(POLL_S)
        assert s.proc.poll() is None, s.log()
    finally:
        s.stop()


async def paced_session(url: str, pcm: np.ndarray, sr: int) -> tuple[list[dict], int | None]:
    """One WebSocket stream sent at real time (FRAME_S frames), then CloseStream."""
    messages: list[dict] = []
    step = int(FRAME_S * sr)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url + WS_PATH) as ws:

            async def reader():
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(m.data))

            r = asyncio.create_task(reader())
            for i in range(0, len(pcm), step):
                await ws.send_bytes(pcm[i : i + step].tobytes())
                await asyncio.sleep(FRAME_S)  # real time, as a live caller
            await ws.send_str(json.dumps({"type": "CloseStream"}))
            await asyncio.wait_for(r, 120)
            return messages, ws.close_code


@needs_demo
@pytest.mark.parametrize(
    "own_serve",
    [
        {
            ENV_CANARY_INTERVAL: "0.001",  # one at every health check
            ENV_CANARY_DEADLINE: str(CANARY_DEADLINE_S),
            "STREAMASR_LOG_LEVEL": "DEBUG",
        }
    ],
    indirect=True,
)
def test_canaries_never_disturb_real_streams(own_serve):
    """A canary every second beside 3 live (paced) WebSocket streams: each stream's
    transcript equals /invocations' whole-file transcript, and every canary was answered
    within the production deadline."""
    a, sr = demo_int16()
    pieces = [a[i * 6 * sr : (i + 1) * 6 * sr] for i in range(3)]
    expected = [whole_transcript(own_serve, p, sr) for p in pieces]
    before = own_serve.log().count("canary answered")

    async def go():
        return await asyncio.gather(*(paced_session(own_serve.url, p, sr) for p in pieces))

    results = asyncio.run(go())
    for (msgs, code), want in zip(results, expected):
        assert code == 1000 and not [m for m in msgs if m["type"] == "Error"], msgs[-3:]
        assert final_text(msgs) == want and want
    log = own_serve.log()
    canaries = [ln for ln in log.splitlines() if "canary answered" in ln]
    assert len(canaries) > before, "no canary ran beside the streams"
    assert all(ln.endswith(": ok") for ln in canaries), canaries
    assert "late" not in log and ping(own_serve.url)[0] == 200
