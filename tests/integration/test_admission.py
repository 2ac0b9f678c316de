"""Admission control (streamasr.core.admission, issue 14): a server that holds its limit of
streams refuses a new START with a retryable error, the admitted streams' transcripts are
exact, refused STARTs are counted, and the gateway maps the refusal to 503 / close 1013.

The server tests use a repository copy limited to ``LIMIT`` streams and offer 3x that
(the short overload test; the timed one, with latency and memory, is in ``make bench``)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import aiohttp
import aiohttp.test_utils
import numpy as np
import pytest

from streamasr.core import admission as adm
from streamasr.core.state import StreamError
from streamasr.pipeline import feature_extractor as fx
from streamasr.pipeline.common import read_config
from streamasr.protocol import WS_PATH
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.http import Gateway
from streamasr_client.stream import AsrConnection

from .. import helpers
from ..helpers import ADMISSION_LIMIT, REPOSITORY

LIMIT = ADMISSION_LIMIT


# -- units (no server) ---------------------------------------------------------------------


def test_limit_comes_from_environment_then_config_then_the_calibration():
    calls = []

    def calibrate():
        calls.append(1)
        return 23

    assert adm.configured_limit(None, {}, calibrate) == 23
    assert adm.configured_limit("measured", {}, calibrate) == 23
    assert len(calls) == 2
    assert adm.configured_limit("measured", {}) == adm.FALLBACK_STREAMS_HELD  # none to run
    assert adm.configured_limit("7", {}, calibrate) == 7
    assert adm.configured_limit("0", {}) is None  # 0: no limit
    assert adm.configured_limit("7", {adm.ENV_LIMIT: "3"}) == 3
    assert adm.configured_limit("7", {adm.ENV_LIMIT: "0"}) is None
    # the override wins, and the calibration does not even run
    assert adm.configured_limit("measured", {adm.ENV_LIMIT: "5"}, calibrate) == 5
    assert len(calls) == 2
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(ValueError, match="non-negative integer"):
            adm.configured_limit(bad, {})
        with pytest.raises(ValueError, match=adm.ENV_LIMIT):
            adm.configured_limit("1", {adm.ENV_LIMIT: bad})


def test_a_failed_calibration_falls_back_and_says_so(caplog):
    def broken():
        raise FileNotFoundError("no ctc_decoder/config.pbtxt")

    assert adm.configured_limit("measured", {}, broken) == adm.FALLBACK_STREAMS_HELD
    assert "admission calibration failed (FileNotFoundError" in caplog.text


def test_committed_config_admits_what_the_calibration_picks(monkeypatch):
    from streamasr.pipeline import calibration

    monkeypatch.delenv(adm.ENV_LIMIT, raising=False)
    picked = []
    real = calibration.calibrate

    def recording(cfg):  # the real calibration, its result kept for the assertion
        picked.append(real(cfg))
        return picked[-1]

    monkeypatch.setattr(calibration, "calibrate", recording)
    step = fx.build_step(read_config(REPOSITORY / "feature_extractor"))
    assert len(picked) == 1
    assert step.admission.limit == picked[0].limit
    assert picked[0].acoustic_s_per_window > 0 and picked[0].decoder_s_per_chunk > 0
    assert picked[0].decoder_instances >= 1 and picked[0].cores >= 1


def test_override_wins_without_calibrating(monkeypatch):
    from streamasr.pipeline import calibration

    def must_not_run(cfg):
        raise AssertionError("calibration ran despite the override")

    monkeypatch.setattr(calibration, "calibrate", must_not_run)
    monkeypatch.setenv(adm.ENV_LIMIT, "9")
    step = fx.build_step(read_config(REPOSITORY / "feature_extractor"))
    assert step.admission.limit == 9


def _request(corrid, flags, seconds=0.4):
    audio = np.zeros(int(16000 * seconds), np.float32) if seconds else None
    return fx.FeatureRequest(
        corrid=corrid, flags=flags, audio=audio, sample_rate=None, parameters={}
    )


def test_feature_step_refuses_start_beyond_the_limit_and_admits_after_an_end(contract):
    step = fx.FeatureExtractorStep(contract, 30.0, 10.0, 32, admission=adm.Admission(LIMIT))
    for sid in (1, 2):
        step.process(_request(sid, fx.FLAG_START))
    with pytest.raises(adm.StreamRefused) as refused:
        step.process(_request(3, fx.FLAG_START))
    assert adm.is_capacity_refusal(str(refused.value)) and "limit is 2" in str(refused.value)
    assert 3 not in step.store  # no state for a refused stream
    # the refused stream's own later requests say so (not "unknown stream"), END last
    with pytest.raises(adm.RefusedStreamEnded, match="nothing to continue"):
        step.process(_request(3, 0))
    with pytest.raises(adm.RefusedStreamEnded, match="nothing to end"):
        step.process(_request(3, fx.FLAG_END, seconds=0))
    with pytest.raises(StreamError, match="unknown stream 3"):
        step.process(_request(3, 0))
    # a bad START is told what is wrong with it, not "busy"
    with pytest.raises(StreamError, match="NaN") as bad:
        step.process(fx.FeatureRequest(4, fx.FLAG_START, np.full(10, np.nan, np.float32), None, {}))
    assert not isinstance(bad.value, adm.StreamRefused)
    step.process(_request(1, fx.FLAG_END))
    step.process(_request(5, fx.FLAG_START))  # a place came free
    assert step.admission.snapshot() == (3, 1)


# -- a real server limited to LIMIT streams ------------------------------------------------


def metric(server, name: str, step: str | None = None) -> float:
    """``name`` of the server's feature step (limited_server's: the base names)."""
    return helpers.metric(server, name, step or server.model("feature_extractor"))


def _stream(session, audio: np.ndarray, chunk: int) -> None:
    for i in range(0, len(audio), chunk):
        session.send(audio[i : i + chunk])
    session.close()


def test_three_times_capacity_admits_the_limit_exactly_and_refuses_the_rest(
    limited_server, demo_audio, contract
):
    from streamasr_client.stream import AsrBusy, AsrConnection

    audio = demo_audio[: 8 * contract.sample_rate]
    chunk = contract.chunk_samples
    with AsrConnection(limited_server.grpc_url) as conn:
        expected = conn.transcribe_file(audio)
        expected = " ".join(
            m["channel"]["alternatives"][0]["transcript"]
            for m in expected
            if m.get("type") == "Results"
            and m.get("is_final")
            and m["channel"]["alternatives"][0]["transcript"]
        )
        admitted0, refused0 = (
            metric(limited_server, "streamasr_admitted_streams_total"),
            metric(limited_server, "streamasr_refused_streams_total"),
        )
        assert metric(limited_server, "streamasr_stream_capacity") == LIMIT
        # LIMIT streams start and are answered; then 2 x LIMIT more try while they run
        admitted = [conn.open_session() for _ in range(LIMIT)]
        for s in admitted:
            s.send(audio[:chunk])
        for s in admitted:
            s.wait()
        late = [conn.open_session() for _ in range(2 * LIMIT)]
        for s in late:
            s.send(audio[:chunk])
            s.send(audio[chunk : 2 * chunk])  # sent before the refusal is back
        senders = [
            threading.Thread(target=_stream, args=(s, audio[chunk:], chunk)) for s in admitted
        ]
        for t in senders:
            t.start()
        for s in late:
            s.wait()
        for t in senders:
            t.join()
        for s in admitted:
            s.wait()
        for s in late:
            assert s.refused is not None and adm.CAPACITY_MARKER in s.refused, s.messages
            assert s.errors == [s.refused]  # the refusal, no follow-up errors
            assert [m.get("code") for m in s.messages] == ["busy"]
            with pytest.raises(AsrBusy):
                s.send(audio[:chunk])
        for s in admitted:
            assert s.errors == [] and s.refused is None
            assert s.transcript == expected  # exact under 3x offered load
        # the places are free again
        again = conn.open_session()
        again.send(audio[:chunk])
        again.close()
        again.wait()
        assert again.errors == []
    assert metric(limited_server, "streamasr_admitted_streams_total") - admitted0 == LIMIT + 1
    assert metric(limited_server, "streamasr_refused_streams_total") - refused0 == 2 * LIMIT


def test_refused_ends_are_not_counted_as_errors(limited_server, contract):
    """The client ENDs a refused stream at once (frees Triton's sequence slot); that
    END is answered without counting as a request error."""
    from streamasr_client.stream import AsrConnection

    with AsrConnection(limited_server.grpc_url) as conn:
        holders = [conn.open_session() for _ in range(LIMIT)]
        for s in holders:
            s.send(np.zeros(contract.chunk_samples, np.float32))
            s.wait()
        errors0 = metric(limited_server, "streamasr_request_errors_total")
        s = conn.open_session()
        s.send(np.zeros(contract.chunk_samples, np.float32))
        s.wait()
        assert s.refused and s.sent == 2  # START + the releasing END
        assert metric(limited_server, "streamasr_request_errors_total") == errors0
        for h in holders:
            h.close()
            h.wait()


def test_gateway_answers_busy_with_503_and_websocket_close_1013(limited_server, contract):
    pytest.importorskip("aiohttp")
    import aiohttp
    import aiohttp.test_utils

    from streamasr.protocol import SESSION_HEADER, WS_PATH, WS_TRY_AGAIN_LATER
    from streamasr.sagemaker.gateway.config import GatewayConfig
    from streamasr.sagemaker.gateway.http import Gateway
    from streamasr_client.stream import AsrConnection

    pcm = bytes(2 * contract.chunk_samples)

    async def go():
        gw = Gateway(GatewayConfig(triton_grpc=limited_server.grpc_url))
        server = aiohttp.test_utils.TestServer(gw.app())
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url + WS_PATH) as ws:
                    try:  # a client streams on: the refusal ends it
                        for _ in range(5):
                            await ws.send_bytes(pcm)
                        await ws.send_str(json.dumps({"type": "CloseStream"}))
                    except ConnectionError:
                        pass
                    texts = [
                        json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT
                    ]
                    ws_result = texts, ws.close_code
                async with http.post(
                    url + "/invocations",
                    data=pcm,
                    headers={SESSION_HEADER: "NEW_SESSION", "Content-Type": "audio/l16"},
                ) as r:
                    http_result = r.status, dict(r.headers), await r.json()
        finally:
            await server.close()
        return ws_result, http_result

    with AsrConnection(limited_server.grpc_url) as conn:
        holders = [conn.open_session() for _ in range(LIMIT)]
        for s in holders:
            s.send(np.zeros(contract.chunk_samples, np.float32))
            s.wait()
        (texts, code), (status, headers, body) = asyncio.run(go())
        for h in holders:
            h.close()
            h.wait()
    assert code == WS_TRY_AGAIN_LATER, (code, texts)
    assert [t["code"] for t in texts] == ["busy"], texts
    assert adm.CAPACITY_MARKER in texts[0]["message"]
    assert status == 503 and body["code"] == "busy", (status, body)
    assert headers.get("Retry-After") == "1"


def test_unary_infer_of_a_refused_start_is_grpc_unavailable(limited_server, contract):
    """On a unary call (not the stream) the status itself says: UNAVAILABLE."""
    import grpc
    import tritonclient.grpc as tc

    from streamasr_client.stream import AsrConnection

    with AsrConnection(limited_server.grpc_url) as conn:
        holders = [conn.open_session() for _ in range(LIMIT)]
        for s in holders:
            s.send(np.zeros(contract.chunk_samples, np.float32))
            s.wait()
        client = tc.InferenceServerClient(limited_server.grpc_url)
        x = tc.InferInput("AUDIO", [contract.chunk_samples], "FP32")
        x.set_data_from_numpy(np.zeros(contract.chunk_samples, np.float32))
        with pytest.raises(tc.InferenceServerException) as exc:
            client.infer("streaming_asr", [x], sequence_id=987654321, sequence_start=True)
        assert adm.CAPACITY_MARKER in exc.value.message()
        assert exc.value.status() in ("StatusCode.UNAVAILABLE", str(grpc.StatusCode.UNAVAILABLE))
        for h in holders:
            h.close()
            h.wait()


def test_a_refused_websocket_is_closed_at_once_even_if_it_stays_silent(limited_server):
    """A WebSocket whose START the server refused (at capacity) gets Error ``busy`` and
    close 1013 as soon as the refusal arrives, not when it next sends a frame (a silent
    one used to be held until the idle timeout)."""
    cfg = GatewayConfig(triton_grpc=limited_server.grpc_url, idle_timeout_s=30.0)
    with AsrConnection(limited_server.grpc_url) as conn:
        holders = [conn.open_session() for _ in range(LIMIT)]
        for h in holders:
            h.send(np.zeros(1600, np.float32))
        for h in holders:
            h.wait()
            assert not h.errors, h.errors

        async def go():
            gw = Gateway(cfg)
            server = aiohttp.test_utils.TestServer(gw.app())
            await server.start_server()
            url = str(server.make_url("")).rstrip("/")
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.ws_connect(url + WS_PATH) as ws:
                        t0 = time.monotonic()
                        await ws.send_bytes(np.zeros(3200, np.int16).tobytes())  # 0.2 s
                        msgs = [
                            json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT
                        ]
                        return msgs, ws.close_code, time.monotonic() - t0
            finally:
                await server.close()

        msgs, code, took = asyncio.run(go())
        for h in holders:
            h.close()
            h.wait()
    assert code == 1013 and [m["code"] for m in msgs if m["type"] == "Error"] == ["busy"], msgs
    assert took < 10, f"closed {took:.1f} s after its frame"


def test_gateway_refuses_new_sessions_while_the_queue_delay_is_over_its_bound(
    limited_server, contract
):
    """The live guard: with the canary's queue delay over its bound, a new WebSocket or
    HTTP session is answered busy before anything reaches Triton; once the slow
    measurement has left the window, sessions are admitted again."""
    from streamasr.protocol import SESSION_HEADER, WS_TRY_AGAIN_LATER
    from streamasr.sagemaker.gateway.health import Backend

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    guard = adm.QueueDelayGuard(bound_s=0.5, window_s=5.0, clock=clock)
    cfg = GatewayConfig(triton_grpc=limited_server.grpc_url)
    pcm = bytes(2 * contract.chunk_samples)

    async def sessions(http, url):  # each closes what it opens: the server is shared
        async with http.ws_connect(url + WS_PATH) as ws:
            try:
                await ws.send_bytes(pcm)
                await ws.send_str(json.dumps({"type": "CloseStream"}))
            except ConnectionError:
                pass
            texts = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
            ws_result = texts, ws.close_code
        async with http.post(
            url + "/invocations?close=true",
            data=pcm,
            headers={SESSION_HEADER: "NEW_SESSION", "Content-Type": "audio/l16"},
        ) as r:
            http_result = r.status, await r.json()
        return ws_result, http_result

    async def go():
        gw = Gateway(cfg, backend=Backend(cfg, queue_guard=guard))
        server = aiohttp.test_utils.TestServer(gw.app())
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        try:
            async with aiohttp.ClientSession() as http:
                guard.observe(0.9)
                late = await sessions(http, url)
                clock.now += 10
                on_time = await sessions(http, url)
        finally:
            await server.close()
        return late, on_time

    ((texts, code), (status, body)), ((texts2, code2), (status2, body2)) = asyncio.run(go())
    assert code == WS_TRY_AGAIN_LATER and [t["code"] for t in texts] == ["busy"], (code, texts)
    assert "queue delay 900 ms" in texts[0]["message"]
    assert status == 503 and body["code"] == "busy" and "queue delay" in body["message"]
    assert all(t.get("code") != "busy" for t in texts2) and code2 != WS_TRY_AGAIN_LATER, texts2
    assert status2 == 200, body2


# -- a real server that calibrates its own limit ------------------------------------------


def test_server_is_ready_only_after_calibrating_and_admits_what_it_measured(calibrated_server):
    """Triton reports ready (so the gateway's /ping can turn 200, health.Backend asks
    ModelReady first) only once the feature step has loaded, and its load includes the
    calibration: the calibration's line comes before the model's "successfully loaded",
    and the admission limit in force is the calibrated one."""
    lines = calibrated_server.log_path.read_text(errors="replace").splitlines()
    step = calibrated_server.model("feature_extractor")
    cal = [i for i, x in enumerate(lines) if "streams (calibrated in" in x and f"[{step}]" in x]
    loaded = [i for i, x in enumerate(lines) if f"successfully loaded '{step}'" in x]
    assert len(cal) == 1 and loaded, "\n".join(lines[-30:])
    assert cal[0] < loaded[0]
    m = re.search(r"admission limit (\d+) streams \(calibrated", lines[cal[0]])
    assert m
    capacity = metric(calibrated_server, "streamasr_stream_capacity")
    assert capacity == int(m.group(1))
