"""Faults against a REAL tritonserver: clients that die or misbehave, server shutdown and
restart, a crashed python stub, hostile requests, TLS, logs and metrics.

Every fault is checked two ways: the faulty party gets a clear error (or its streams are
reclaimed), and a bystander stream running at the same time keeps the exact transcript of
a whole-file decode (``reference_messages``, as tests/integration/test_streaming.py does).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from streamasr.triton.server import (
    ServerConfig,
    ServerError,
    TritonServer,
    child_processes,
    free_ports,
)
from streamasr_client.stream import AsrConnection

from ..helpers import (
    DEMO_WAV,
    MAX_STREAM_S,
    ROOT,
    STREAMING_STEPS,
    TTL_S,
    Bystander,
    all_reclaimed,
    f32,
    finals_with_words,
    metric,
    metrics_text,
    poll,
    raw_request,
    reclaimed_now,
    reference_messages,
)

PY = sys.executable


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audio(contract) -> np.ndarray:
    """The bundled recording when there is one, else 8 s of deterministic tone bursts
    (any audio will do: the check is streamed == whole-file, exactly)."""
    if DEMO_WAV.exists():
        from streamasr_client.audio import load_audio

        return load_audio(DEMO_WAV, contract.sample_rate)[: 25 * contract.sample_rate]
    rate = contract.sample_rate
    t = np.arange(8 * rate) / rate
    rng = np.random.default_rng(7)
    env = (np.sin(2 * np.pi * 0.7 * t) > 0).astype(np.float64)
    sig = 0.3 * np.sin(2 * np.pi * (200 + 150 * np.sin(2 * np.pi * 0.3 * t)) * t)
    return ((sig + 0.05 * rng.standard_normal(len(t))) * env).astype(np.float32)


@pytest.fixture(scope="module")
def expected(contract, onnx_session, audio):
    return finals_with_words(reference_messages(contract, onnx_session, audio))


@pytest.fixture
def fconn(short_ttl_server):
    c = short_ttl_server.connect()
    yield c
    c.close()


@pytest.fixture
def bystander(fconn, contract, audio, expected):
    return Bystander(fconn, contract, audio, expected)


# -- 2. client faults --------------------------------------------------------------------
KILLED_CLIENT = r"""
import sys, numpy as np
from streamasr_client.stream import AsrConnection
conn = AsrConnection(sys.argv[1], model=sys.argv[3])
rate = conn.contract().sample_rate
sessions = [conn.open_session() for _ in range(int(sys.argv[2]))]
noise = (np.random.default_rng(0).standard_normal(rate // 2) * 0.1).astype(np.float32)
for s in sessions:
    s.send(noise)
for s in sessions:
    s.wait(60)
    assert s.errors == [], s.errors
for s in sessions:          # in flight when the process dies
    s.send(noise)
print("STREAMING", flush=True)
sys.stdin.read()
"""


def test_sigkilled_client_streams_are_reclaimed_and_others_keep_their_transcript(
    short_ttl_server, fconn, contract, audio, expected
):
    n = 5
    since = reclaimed_now(short_ttl_server)
    proc = subprocess.Popen(
        [PY, "-c", KILLED_CLIENT, short_ttl_server.grpc_url, str(n), short_ttl_server.model()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == b"STREAMING", "client never streamed"
        # (started only now: a bystander idle while the client starts up would expire)
        bystander = Bystander(fconn, contract, audio, expected)
    finally:
        proc.send_signal(signal.SIGKILL)  # no END, no half-close: the socket dies
        proc.wait(30)
    bystander.finish()
    poll(
        lambda: all_reclaimed(short_ttl_server, since, n),
        10 * TTL_S + 10,
        "the dead client's streams to be reclaimed",
    )


def test_half_closed_connection_still_gets_its_answers_and_streams_are_reclaimed(
    short_ttl_server, contract, bystander
):
    since = reclaimed_now(short_ttl_server)
    conn = short_ttl_server.connect()
    sessions = [conn.open_session() for _ in range(3)]
    for s in sessions:
        for _ in range(4):
            s.send(np.zeros(contract.chunk_samples, np.float32))
    conn.half_close()  # no more requests, no END
    for s in sessions:
        s.wait(timeout=60)  # every request sent is still answered
        assert s.errors == [] and s.pending == 0
    conn.close()
    bystander.finish()
    poll(
        lambda: all_reclaimed(short_ttl_server, since, 3),
        10 * TTL_S + 10,
        "half-open streams to be reclaimed",
    )


def test_duplicate_start_for_a_live_id_is_refused_and_the_live_stream_is_intact(
    short_ttl_server, fconn, contract, audio, expected
):
    live = Bystander(fconn, contract, audio, expected)
    live.s.wait()  # its START has been served: the id is live
    with short_ttl_server.connect() as other:  # a second client, same id
        dup = other.open_session(sequence_id=live.s.sequence_id)
        dup.send(np.zeros(contract.chunk_samples, np.float32))
        dup.wait()
        assert len(dup.errors) == 1 and "already open" in dup.errors[0], dup.errors
    live.finish()


def test_end_for_an_unknown_id_is_refused_clearly(fconn, bystander):
    s = fconn.open_session()
    raw_request(s, [f32(np.zeros(1600))], start=False, end=True)
    s.wait()
    assert len(s.errors) == 1 and "START" in s.errors[0], s.errors
    bystander.finish()


def test_stream_longer_than_max_stream_seconds_is_refused_then_ends_cleanly(fconn, contract):
    s = fconn.open_session()
    piece = np.zeros(contract.sample_rate * 5, np.float32)
    for _ in range(int(MAX_STREAM_S / 5) + 1):
        s.send(piece)
    s.close()
    s.wait()
    assert len(s.errors) == 1 and "max_stream_seconds" in s.errors[0], s.errors
    # END still closed the stream: its id STARTs again at once (a live stream's id is
    # refused as "already open").  Not read from the order of the messages: with two
    # acoustic_model instances Triton 2.51 sometimes returns the refused chunk's error
    # under END's request id and END's answer under the chunk's (measured: 2 of 6 runs).
    again = fconn.open_session(sequence_id=s.sequence_id)
    again.send(piece[:1600])
    again.close()
    again.wait()
    assert again.errors == [], again.errors


# -- 4. hostile requests through the server ----------------------------------------------
DTYPES = {
    "FP32": np.float32,
    "INT16": np.int16,
    "FP64": np.float64,
    "INT32": np.int32,
    "UINT8": np.uint8,
}
hostile_inputs = st.lists(
    st.tuples(
        st.sampled_from(["AUDIO", "AUDIO_INT16", "SAMPLE_RATE", "BOGUS"]),
        st.sampled_from(sorted(DTYPES) + ["BYTES"]),
        st.lists(st.integers(0, 5000), min_size=0, max_size=2),
        st.binary(max_size=64) | st.integers(0, 9000).map(lambda n: os.urandom(n)),
    ),
    min_size=0,
    max_size=3,
)
hostile_params = st.dictionaries(
    st.sampled_from(["finalize", "keepalive", "beam_size", "decoding", "hotwords", "x"]),
    st.text(max_size=8) | st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
    max_size=2,
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(inputs=hostile_inputs, params=hostile_params, start=st.booleans(), end=st.booleans())
def test_hostile_requests_get_an_answer_and_never_kill_the_server(
    short_ttl_server, fconn, inputs, params, start, end
):
    s = fconn.open_session()
    raw_request(
        s,
        [(n, d, shape, data) for n, d, shape, data in inputs],
        start=start,
        end=end,
        params=params,
    )
    s.wait(timeout=60)
    assert len(s.messages) >= 1
    for m in s.messages:
        if m["type"] == "Error":
            assert m["message"].strip()
        else:
            assert m["type"] in ("Results", "UtteranceEnd")
    assert short_ttl_server.proc.poll() is None


def test_after_hostile_requests_the_server_is_whole(short_ttl_server, bystander):
    """Runs after the fuzz above: the same stubs are alive and a stream is exact."""
    stubs = short_ttl_server.python_stubs()
    assert {short_ttl_server.model(m) for m in STREAMING_STEPS} <= set(stubs.values())
    bystander.finish()
    assert short_ttl_server.python_stubs() == stubs


# -- 5. no content in logs; 6. metrics ---------------------------------------------------
def test_logs_hold_no_audio_and_no_transcript(short_ttl_server, fconn, contract, audio, expected):
    s = fconn.open_session()
    for i in range(0, len(audio), contract.chunk_samples):
        s.send(audio[i : i + contract.chunk_samples])
    s.close()
    s.wait(timeout=180)
    bad = fconn.open_session()
    raw_request(bad, [f32([0.123456789, np.nan])], start=True)  # an error path too
    bad.wait()
    log = Path(short_ttl_server.log_path).read_text(errors="replace")
    assert "ready: chunk" in log, "the steps' own INFO lines must reach this log"
    words = {w for text, _ in expected for w in text.split() if len(w) >= 4}
    loud = np.argsort(-np.abs(audio))[:20]
    samples = (
        {repr(float(audio[i])) for i in loud}
        | {np.format_float_positional(audio[i], precision=8) for i in loud}
        | {"0.12345679"}
    )
    # whole words only: "hare" is a transcript word, and also inside "shared"
    leaked = sorted(
        x for x in words | samples if re.search(rf"(?<![\w.]){re.escape(x)}(?![\w])", log)
    )
    assert leaked == [], f"audio or transcript content in the server log: {leaked[:5]}"


def test_metrics_port_has_tritons_and_our_metrics(short_ttl_server, fconn, contract):
    s = fconn.open_session()
    s.send(np.zeros(contract.chunk_samples * 2, np.float32))
    s.close()
    bad = fconn.open_session()
    raw_request(bad, [f32([np.nan])], start=True)
    for x in (s, bad):
        x.wait()
    assert len(bad.errors) == 1
    text = metrics_text(short_ttl_server)
    steps = [short_ttl_server.model(m) for m in STREAMING_STEPS]
    for model in (short_ttl_server.model(), "acoustic_model", *steps):
        m = re.search(
            rf'^nv_inference_request_success{{model="{model}",version="1"}} (\d+)', text, re.M
        )
        assert m and int(m.group(1)) > 0, f"no nv_inference_request_success for {model}"
    assert re.search(r'^nv_inference_count\{model="acoustic_model"', text, re.M)
    for name in (
        "streamasr_open_streams",
        "streamasr_reclaimed_streams_total",
        "streamasr_request_errors_total",
    ):
        for model in steps:
            assert re.search(rf'^{name}{{model="{model}"}} ', text, re.M), (name, model)
    assert (
        metric(
            short_ttl_server,
            "streamasr_request_errors_total",
            short_ttl_server.model("feature_extractor"),
        )
        > 0
    )
    # per-request time of each Python step, as a histogram
    for model in steps:
        count = re.search(rf'^streamasr_request_seconds_count{{model="{model}"}} (\d+)', text, re.M)
        assert count and int(count.group(1)) > 0, f"no request-time histogram for {model}"
        bucket = re.search(
            rf'^streamasr_request_seconds_bucket{{(?=[^}}]*model="{model}")(?=[^}}]*le="0.01")',
            text,
            re.M,
        )
        assert bucket, f"no le=0.01 bucket for {model}"


def test_launcher_health_poll_flags_a_model_that_goes_unready(short_ttl_server):
    """The launcher's poll (streamasr.triton.server._health_problem) on a model unloaded through
    the repository API: its stub goes away and /v2/models/<m>/ready stops answering 200."""
    from streamasr.triton.server import _health_problem

    models, stubs = short_ttl_server.ready_models(), short_ttl_server.python_stubs()
    assert "model_contract" in models
    assert _health_problem(short_ttl_server, models, stubs, {}, 2) is None
    base = f"http://{short_ttl_server.http_url}/v2/repository/models/model_contract"
    urllib.request.urlopen(urllib.request.Request(base + "/unload", data=b"{}"), timeout=30)
    try:
        poll(
            lambda: short_ttl_server.unready_models(["model_contract"]) == ["model_contract"],
            30,
            "model_contract to report not ready",
        )
        strikes: dict = {}
        problems = [_health_problem(short_ttl_server, models, stubs, strikes, 2) for _ in range(2)]
        assert problems[-1] and "model_contract" in problems[-1], problems
    finally:
        urllib.request.urlopen(urllib.request.Request(base + "/load", data=b"{}"), timeout=120)
    assert short_ttl_server.unready_models(models) == []


# -- 3. server faults --------------------------------------------------------------------
def test_sigterm_answers_in_flight_requests_then_exits_and_a_restart_serves_new_clients(
    tmp_path, contract, audio, expected
):
    ports = free_ports()
    cfg = ServerConfig(exit_timeout_s=20, **ports)
    srv = TritonServer(cfg, log_path=tmp_path / "first.log")
    try:
        srv.start(timeout_s=180)
    except ServerError as exc:
        srv.stop()
        pytest.fail(str(exc))
    conn = AsrConnection(srv.grpc_url)
    chunk = contract.chunk_samples
    sessions = [conn.open_session() for _ in range(3)]
    for s in sessions:  # whole streams, END included
        for i in range(0, len(audio), chunk):
            s.send(audio[i : i + chunk])
        s.close()
    poll(lambda: sum(s.answered for s in sessions) > 0, 120, "the first answers")
    before = [len(s.messages) for s in sessions]
    in_flight = sum(s.pending for s in sessions)
    t0 = time.monotonic()
    srv.stop()  # SIGTERM while requests are in flight, clients connected
    stopped_in = time.monotonic() - t0
    assert in_flight > 0, "the streams finished before the signal: nothing was in flight"
    # Every request sent gets an answer before the connection goes away: a result, or
    # (not yet scheduled when the signal came) a clear "Server is stopping" error.
    poll(lambda: all(s.pending == 0 for s in sessions), 5, "answers to in-flight requests")
    for s, n in zip(sessions, before):
        assert [m for m in s.messages[:n] if m["type"] == "Error"] == []
        assert all("Server is stopping" in e for e in s.errors), s.errors[:3]
        late = s.messages[n:]
        # once a stream got "stopping", nothing after it is a result
        first_err = next((i for i, m in enumerate(late) if m["type"] == "Error"), len(late))
        assert all(m["type"] == "Error" for m in late[first_err:])
    # the process is gone: by itself or, with a client's stream still open, killed
    # exit_timeout + 10 s after the signal (Triton 2.51 does not exit while one is open)
    assert srv.proc.poll() is not None and stopped_in < cfg.exit_timeout_s + 15
    assert (
        "Found 0 model versions that have in-flight inferences"
        in Path(tmp_path / "first.log").read_text()
    )
    conn.close()
    # the same address again: clients reconnect with a new connection
    srv2 = TritonServer(ServerConfig(**ports), log_path=tmp_path / "second.log")
    try:
        srv2.start(timeout_s=180)
        with AsrConnection(srv2.grpc_url) as again:
            s = again.open_session()
            for i in range(0, len(audio), chunk):
                s.send(audio[i : i + chunk])
            s.close()
            s.wait(timeout=180)
            assert s.errors == [] and finals_with_words(s.messages) == expected
    finally:
        srv2.stop()


# -- TLS and the launcher's watchdog (conftest: launcher, own_launcher) --------------
def test_tls_server_refuses_plaintext(launcher):
    channel = grpc.insecure_channel(launcher.grpc)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    channel.close()


def test_tls_server_serves_a_tls_client(launcher, contract):
    with AsrConnection(launcher.grpc, ssl=True, root_certificates=launcher.cert) as c:
        assert c.contract() == contract
        s = c.open_session()
        s.send(np.zeros(contract.chunk_samples * 3, np.float32))
        s.close()
        s.wait(timeout=60)
        assert s.errors == [] and s.messages


def test_crashed_stub_gives_clear_errors_and_the_launcher_exits_loudly(own_launcher, contract):
    """Kills the feature_extractor stub of a launcher of its own."""
    (triton,) = [
        p
        for p, argv in child_processes(own_launcher.proc.pid).items()
        if argv[0].endswith("tritonserver")
    ]
    stubs = [
        p
        for p, argv in child_processes(triton).items()
        if argv[0].endswith("triton_python_backend_stub")
        and Path(argv[1]).parent.parent.name == "feature_extractor"
    ]
    assert len(stubs) == 1
    with AsrConnection(own_launcher.grpc, ssl=True, root_certificates=own_launcher.cert) as c:
        os.kill(stubs[0], signal.SIGKILL)
        s = c.open_session()
        s.send(np.zeros(contract.chunk_samples, np.float32))
        try:
            s.wait(timeout=30)
        except Exception:  # noqa: BLE001 - the server may be gone
            pass
        # never a transcript from a dead step: an error naming it, or no answer at all
        assert not [m for m in s.messages if m["type"] != "Error"]
        assert all("not healthy" in e or "feature_extractor" in e for e in s.errors), s.errors
    code = own_launcher.proc.wait(timeout=60)
    text = own_launcher.log_path.read_text()
    assert code == 3, text[-3000:]
    assert "UNHEALTHY" in text and "feature_extractor" in text


# -- 1. abandoned streams at scale (make test-slow) --------------------------------------
@pytest.mark.slow
def test_soak_ten_thousand_abandoned_streams_are_reclaimed_and_rss_returns(tmp_path):
    """benchmarks/soak.py: 10 000 streams with no END after a warm-up of as many; every
    Python step's store is empty again and server RSS within 5 % of the baseline."""
    from benchmarks import soak

    fig = soak.run(
        streams=10_000,
        warmup=10_000,
        ttl_s=5.0,
        triton_idle_s=8.0,
        audio_ms=100,
        tolerance=0.05,
        workdir=tmp_path,
        timeout=900.0,
        path="steps",
        rounds=2,
        warmup_rounds=2,
    )
    (tmp_path / "soak.json").write_text(json.dumps(fig, indent=2))
    for rnd in fig["rounds"]:
        assert rnd["run"]["errors"] == 0, rnd["run"]["first_error"]
        assert rnd["reclaimed"] == {"feature_extractor": 10_000, "ctc_decoder": 10_000}
    assert fig["rss_after_kib"] <= 1.05 * fig["rss_before_kib"], fig
    assert fig["fresh_stream_after_soak_errors"] == []
    assert fig["ok"], fig["checks"]
