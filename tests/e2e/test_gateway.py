"""The SageMaker gateway end to end: ``docker/serve`` runs here as SageMaker would run it
(SAGEMAKER_* environment, a real tritonserver started by it, the gateway on
SAGEMAKER_BIND_TO_PORT), and the tests talk HTTP and WebSocket to it like SageMaker's
front end does.  Variants of the gateway's limits run in-process against the same
Triton over gRPC."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import aiohttp
import aiohttp.test_utils
import numpy as np
import pytest
import soundfile as sf

from streamasr.protocol import (
    CLOSED_SESSION_HEADER,
    CUSTOM_ATTRIBUTES_HEADER,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    WS_PATH,
    final_text,
)
from streamasr.sagemaker.gateway.audio import decode_body, parse_content_type
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.http import Gateway
from streamasr.triton.server import free_port
from streamasr_client.stream import AsrConnection

from ..helpers import DEMO_WAV, needs_demo, post, triton_children


def demo_int16() -> tuple[np.ndarray, int]:
    a, sr = sf.read(str(DEMO_WAV), dtype="int16", always_2d=False)
    return (a if a.ndim == 1 else a[:, 0]), sr


# -- units ---------------------------------------------------------------------------------


def test_content_type_parsing_and_raw_pcm():
    assert parse_content_type("audio/L16; rate=8000; channels=2") == (
        "audio/l16",
        {"rate": "8000", "channels": "2"},
    )
    pcm = (np.array([0, 16384, -32768, 32767], "<i2")).tobytes()
    out = decode_body(pcm, "audio/l16;rate=16000", 16000)
    np.testing.assert_allclose(out, [0, 0.5, -1, 32767 / 32768], atol=1e-6)
    stereo = np.array([[16384, 0], [0, -16384]], "<i2").tobytes()
    np.testing.assert_allclose(decode_body(stereo, "audio/l16;channels=2", 16000), [0.25, -0.25])
    with pytest.raises(ValueError, match="whole number"):
        decode_body(b"\x00\x01\x02", "audio/l16", 16000)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_body(b"not audio at all", "audio/wav", 16000)
    with pytest.raises(ValueError, match="empty"):
        decode_body(b"", "audio/wav", 16000)


def test_config_from_sagemaker_env():
    c = GatewayConfig.from_env(
        {"SAGEMAKER_BIND_TO_PORT": "9090", "STREAMASR_GATEWAY_MAX_PENDING": "7"}
    )
    assert (c.port, c.max_pending_requests, c.host) == (9090, 7, "0.0.0.0")
    assert GatewayConfig.from_env({}).port == 8080


def test_ping_is_503_when_triton_is_down():
    async def go():
        gw = Gateway(GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}"))
        async with aiohttp.test_utils.TestClient(aiohttp.test_utils.TestServer(gw.app())) as c:
            r = await c.get("/ping")
            return r.status, await r.text()

    status, text = asyncio.run(go())
    assert status == 503 and "unreachable" in text


def test_post_ping_answers_like_get_ping():
    """The bidirectional-stream container contract pings with POST (issue 22)."""

    async def go():
        gw = Gateway(GatewayConfig(triton_grpc=f"127.0.0.1:{free_port()}"))
        async with aiohttp.test_utils.TestClient(aiohttp.test_utils.TestServer(gw.app())) as c:
            got = await c.get("/ping"), await c.post("/ping")
            return [(r.status, await r.text()) for r in got]

    (get_status, get_text), (post_status, post_text) = asyncio.run(go())
    assert post_status == get_status == 503
    assert post_text == get_text


# -- docker/serve, HTTP --------------------------------------------------------------------


def test_ping_goes_from_not_ready_to_200(serve):
    assert serve.startup_pings[-1] == 200
    assert serve.ping() == 200
    # docker/serve started tritonserver itself, as a child, with our flags
    kids = triton_children(serve.proc.pid)
    assert len(kids) == 1
    argv = Path(f"/proc/{kids[0]}/cmdline").read_bytes().split(b"\0")
    assert b"--model-control-mode=explicit" in argv
    assert not any(a.startswith(b"--allow-sagemaker=true") for a in argv)
    assert f"--grpc-port={serve.grpc_port}".encode() in argv


@needs_demo
def test_invocations_wav_equals_offline_asr(serve):
    status, _, body = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert status == 200, body
    assert body["messages"] and body["messages"][0]["type"] == "Results"
    # the same answer as calling offline_asr directly over gRPC
    with AsrConnection(f"127.0.0.1:{serve.grpc_port}") as conn:
        from streamasr_client.audio import load_audio

        direct = conn.transcribe_file(load_audio(DEMO_WAV, conn.contract().sample_rate))
    assert body["messages"] == direct
    assert body["transcript"] == final_text(direct) and body["transcript"]


@needs_demo
def test_invocations_raw_pcm_equals_wav(serve):
    a, sr = demo_int16()
    _, _, from_wav = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    status, _, raw = post(
        serve.url + "/invocations",
        a.astype("<i2").tobytes(),
        {"Content-Type": f"audio/l16; rate={sr}"},
    )
    assert status == 200, raw
    assert raw["transcript"] == from_wav["transcript"]


def test_invocations_rejects_garbage(serve):
    status, _, body = post(
        serve.url + "/invocations", b"RIFF....garbage", {"Content-Type": "audio/wav"}
    )
    assert status == 400 and body["code"] == "bad_audio"


@needs_demo
def test_stateful_session_chunks_match_whole_file(serve):
    """Request-response fallback: NEW_SESSION, chunk by chunk, close."""
    a, sr = demo_int16()
    url = serve.url + "/invocations"
    status, headers, first = post(
        url,
        a[:sr].tobytes(),
        {SESSION_HEADER: "NEW_SESSION", "Content-Type": f"audio/l16;rate={sr}"},
    )
    assert status == 200, first
    sid, expires = headers[NEW_SESSION_HEADER].split("; Expires=")
    assert len(sid) == 32 and expires.endswith("Z")
    messages = list(first["messages"])
    step = 2 * sr
    for i in range(sr, len(a), step):
        status, _, b = post(
            url,
            a[i : i + step].tobytes(),
            {SESSION_HEADER: sid, "Content-Type": f"audio/l16;rate={sr}"},
        )
        assert status == 200, b
        messages += b["messages"]
    status, _, bad = post(url + "?close=maybe", b"", {SESSION_HEADER: sid})
    assert status == 400 and "close" in bad["message"]  # refused by name, session kept
    status, headers, last = post(url + "?close=true", b"", {SESSION_HEADER: sid})
    assert status == 200 and headers[CLOSED_SESSION_HEADER] == sid
    messages += last["messages"]
    _, _, whole = post(url, DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"})
    assert final_text(messages) == whole["transcript"]
    status, _, gone = post(url, a[:100].tobytes(), {SESSION_HEADER: sid})
    assert status == 404 and gone["code"] == "unknown_session"


# -- docker/serve, WebSocket ---------------------------------------------------------------


async def ws_stream(
    url: str,
    pcm: bytes,
    chunk: int,
    *,
    controls=(),
    close_msg=True,
    query: str = "",
    pace_s: float = 0.0,
) -> tuple[list[dict], int | None]:
    """Stream like SageMaker's platform does: binary frames of audio (``pace_s`` apart),
    text frames of control messages; collect every text frame until the server closes."""
    messages: list[dict] = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url + WS_PATH + query) as ws:

            async def reader():
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(m.data))

            r = asyncio.create_task(reader())
            for i in range(0, len(pcm), chunk):
                await ws.send_bytes(pcm[i : i + chunk])
                if pace_s:
                    await asyncio.sleep(pace_s)
                for at, ctl in controls:
                    if at == i:
                        await ws.send_str(json.dumps(ctl))
            if close_msg:
                await ws.send_str(json.dumps({"type": "CloseStream"}))
            await asyncio.wait_for(r, 120)
            return messages, ws.close_code


@needs_demo
def test_websocket_stream_equals_invocations(serve):
    a, sr = demo_int16()
    # odd-sized frames: samples split across frames must be reassembled
    msgs, code = asyncio.run(ws_stream(serve.url, a.tobytes(), 3201))
    assert code == 1000
    assert any(m["type"] == "Results" and not m["is_final"] for m in msgs), "no interims"
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert final_text(msgs) == whole["transcript"]


@needs_demo
def test_websocket_other_rate_and_finalize(serve):
    """8 kHz client audio (query string), Finalize mid-stream -> a from_finalize final."""
    a, sr = demo_int16()
    from streamasr_client.audio import resample

    a8 = (resample(a[: 6 * sr].astype(np.float32) / 32768, sr, 8000) * 32767).astype("<i2")
    pcm = a8.tobytes()
    chunk = 1600
    mid = (len(pcm) // 2) // chunk * chunk
    msgs, code = asyncio.run(
        ws_stream(
            serve.url,
            pcm,
            chunk,
            controls=[(mid, {"type": "Finalize"}), (0, {"type": "KeepAlive"})],
            query="?sample_rate=8000",
        )
    )
    assert code == 1000
    assert any(m.get("from_finalize") for m in msgs if m["type"] == "Results")
    assert not [m for m in msgs if m["type"] == "Error"]


@needs_demo
def test_websocket_two_pass_finals_keep_the_interims(serve):
    """?two_pass=true: finals re-decoded by Whisper, interims as the one-pass stream's;
    a value that is not a boolean is refused by name."""
    a, sr = demo_int16()
    pcm = a[: 12 * sr].tobytes()
    one, code1 = asyncio.run(ws_stream(serve.url, pcm, 6400))
    two, code2 = asyncio.run(ws_stream(serve.url, pcm, 6400, query="?two_pass=true"))
    assert code1 == code2 == 1000
    interims = [
        [m for m in msgs if m["type"] == "Results" and not m["is_final"]] for msgs in (one, two)
    ]
    assert interims[0] == interims[1] and interims[0]
    finals = [m for m in two if m["type"] == "Results" and m["is_final"]]
    assert finals and all(m["rescored"] for m in finals)
    assert [m["first_pass_transcript"] for m in finals] == [
        m["channel"]["alternatives"][0]["transcript"]
        for m in one
        if m["type"] == "Results" and m["is_final"]
    ]
    bad, code = asyncio.run(ws_stream(serve.url, pcm[:6400], 6400, query="?two_pass=maybe"))
    assert code == 1008 and bad[0]["code"] == "bad_request" and "two_pass" in bad[0]["message"]


def test_two_pass_default_from_env():
    assert GatewayConfig.from_env({}).stream_model() == "streaming_asr"
    c = GatewayConfig.from_env({"STREAMASR_TWO_PASS": "true"})
    assert c.stream_model() == "streaming_asr_two_pass"
    assert c.stream_model("false") == "streaming_asr"
    with pytest.raises(ValueError, match="STREAMASR_TWO_PASS"):
        GatewayConfig.from_env({"STREAMASR_TWO_PASS": "yes please"})


def test_websocket_bad_control_message_closes_1008(serve):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(serve.url + WS_PATH) as ws:
                await ws.send_str("not json")
                m = await ws.receive(timeout=10)
                closing = await ws.receive(timeout=10)
                return json.loads(m.data), closing.type, ws.close_code

    msg, kind, code = asyncio.run(go())
    assert msg["type"] == "Error" and msg["code"] == "bad_request"
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == 1008


def test_websocket_answers_ping_with_pong(serve):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(serve.url + WS_PATH, autoping=False) as ws:
                t0 = time.monotonic()
                await ws.ping(b"sagemaker")
                m = await ws.receive(timeout=5)
                accepted = time.monotonic() - t0
                await ws.send_str(json.dumps({"type": "CloseStream"}))
                return m, accepted

    m, dt = asyncio.run(go())
    assert m.type == aiohttp.WSMsgType.PONG and m.data == b"sagemaker"
    assert dt < 1.0


def test_websocket_accepted_within_250ms(serve):
    async def go():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.ws_connect(serve.url + WS_PATH) as ws:
                took = time.monotonic() - t0
                await ws.send_str(json.dumps({"type": "CloseStream"}))
                await ws.receive(timeout=5)
                return took, ws.close_code

    took, code = asyncio.run(go())
    assert took < 0.25 and code == 1000


@needs_demo
def test_flooding_client_gets_error_and_close(serve):
    """In-process gateway with tight limits on the same Triton: a client that sends far
    faster than the model keeps up is told so and closed with 1008; the stream to
    Triton stays usable for the next session."""
    a, sr = demo_int16()
    cfg = GatewayConfig(
        triton_grpc=f"127.0.0.1:{serve.grpc_port}",
        max_pending_requests=2,
        flood_timeout_s=0.0,
        # flood_timeout_s 0 judges the client at its first full window, before it can be
        # far ahead of real time: count any lead as flooding here
        flood_lead_s=float("-inf"),
    )

    async def go():
        gw = Gateway(cfg)
        server = aiohttp.test_utils.TestServer(gw.app())
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        try:
            flood = await ws_stream(url, a.tobytes(), 320)
            ok = await ws_stream(url, a[: 2 * sr].tobytes(), 2 * sr * 2)
        finally:
            await server.close()
        return flood, ok

    (flood, code), (ok, ok_code) = asyncio.run(go())
    errors = [m for m in flood if m["type"] == "Error"]
    assert code == 1008 and errors and errors[0]["code"] == "backpressure"
    assert ok_code == 1000 and not [m for m in ok if m["type"] == "Error"]


@needs_demo
def test_client_vanishing_mid_stream_is_survived(serve):
    """A socket dropped without CloseStream: the gateway ends the sequence itself and
    keeps serving."""
    a, sr = demo_int16()

    async def go():
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(serve.url + WS_PATH)
            await ws.send_bytes(a[:sr].tobytes())
            await ws.close()

    asyncio.run(go())
    msgs, code = asyncio.run(ws_stream(serve.url, a[: 2 * sr].tobytes(), 8000))
    assert code == 1000 and not [m for m in msgs if m["type"] == "Error"]
    assert serve.ping() == 200


@needs_demo
def test_no_transcript_or_audio_in_logs(serve):
    """Run last in this module: after all the traffic above, the container log holds no
    transcript text."""
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    texts = [
        m["channel"]["alternatives"][0]["transcript"]
        for m in whole["messages"]
        if m.get("type") == "Results"
    ]
    texts = [t for t in texts if len(t) >= 12]
    assert texts
    log = serve.log_path.read_text(errors="replace")
    assert '"transcript"' not in log
    leaked = [t for t in texts if t in log or t[:12] in log]
    assert not leaked, f"transcripts in the log: {leaked[:3]}"


@needs_demo
def test_concurrent_sessions_share_one_grpc_stream(serve):
    """Several WebSocket sessions at once, multiplexed on the gateway's one gRPC stream:
    each gets exactly its own transcript."""
    a, sr = demo_int16()
    pieces = [a[: 8 * sr], a[8 * sr : 16 * sr], a[16 * sr : 24 * sr]]
    expected = []
    for p in pieces:
        _, _, whole = post(
            serve.url + "/invocations",
            p.astype("<i2").tobytes(),
            {"Content-Type": f"audio/l16;rate={sr}"},
        )
        expected.append(whole["transcript"])
    assert len(set(expected)) == 3, "pieces should transcribe differently"

    async def go():
        return await asyncio.gather(
            *(ws_stream(serve.url, p.tobytes(), c) for p, c in zip(pieces, (3200, 8000, 1234)))
        )

    results = asyncio.run(go())
    for (msgs, code), want in zip(results, expected):
        assert code == 1000
        assert final_text(msgs) == want


# -- issue 12: one client must never hurt another --------------------------------------------
async def ws_session(
    url: str, query: str = "", frames=(), texts=(), close_msg=True, timeout: float = 120
) -> tuple[list[dict], int | None]:
    """Text frames first (e.g. Configure), then binary frames, then CloseStream; every
    text frame the server sends until it closes."""
    messages: list[dict] = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url + WS_PATH + query) as ws:
            try:
                for t in texts:
                    await ws.send_str(json.dumps(t))
                for f in frames:
                    await ws.send_bytes(f)
                if close_msg:
                    await ws.send_str(json.dumps({"type": "CloseStream"}))
            except ConnectionError:
                pass  # the server closed first: read what it sent
            async for m in ws:
                if m.type == aiohttp.WSMsgType.TEXT:
                    messages.append(json.loads(m.data))
            return messages, ws.close_code


def whole_transcript(serve, pcm: np.ndarray, sr: int) -> str:
    _, _, whole = post(
        serve.url + "/invocations",
        pcm.astype("<i2").tobytes(),
        {"Content-Type": f"audio/l16;rate={sr}"},
    )
    return whole["transcript"]


@needs_demo
def test_low_sample_rate_client_cannot_close_the_other_sessions(serve):
    """?sample_rate=50 and one 440 kB frame became a 281.6 MB gRPC request, which broke
    the gateway's shared stream and closed every session with 1011."""
    a, sr = demo_int16()
    pieces = [a[: 8 * sr], a[8 * sr : 16 * sr]]
    expected = [whole_transcript(serve, p, sr) for p in pieces]

    async def good(p, bad_done: asyncio.Event):
        messages: list[dict] = []
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(serve.url + WS_PATH) as ws:

                async def reader():
                    async for m in ws:
                        if m.type == aiohttp.WSMsgType.TEXT:
                            messages.append(json.loads(m.data))

                r = asyncio.create_task(reader())
                half = len(p) // 2
                for i in range(0, half, 3200):
                    await ws.send_bytes(p[i : min(i + 3200, half)].tobytes())
                await bad_done.wait()  # the attack happens mid-stream
                for i in range(half, len(p), 3200):
                    await ws.send_bytes(p[i : min(i + 3200, len(p))].tobytes())
                await ws.send_str(json.dumps({"type": "CloseStream"}))
                await asyncio.wait_for(r, 120)
                return messages, ws.close_code

    async def go():
        done = asyncio.Event()
        goods = [asyncio.create_task(good(p, done)) for p in pieces]
        await asyncio.sleep(0.5)  # the good sessions are streaming
        bad = await ws_session(serve.url, "?sample_rate=50", frames=[bytes(440_000)])
        done.set()
        return bad, await asyncio.gather(*goods)

    (bad_msgs, bad_code), results = asyncio.run(go())
    assert bad_code == 1008 and bad_msgs[-1]["type"] == "Error", (bad_code, bad_msgs)
    assert "sample_rate" in bad_msgs[-1]["message"]
    for (msgs, code), want in zip(results, expected):
        assert code == 1000 and not [m for m in msgs if m["type"] == "Error"], msgs[-3:]
        assert final_text(msgs) == want


def test_frame_too_long_after_resampling_is_refused(serve):
    """800 kB at 8 kHz is 50 s of audio: more than one request may carry."""
    msgs, code = asyncio.run(ws_session(serve.url, "?sample_rate=8000", frames=[bytes(800_000)]))
    assert code == 1008 and msgs[-1]["type"] == "Error", (code, msgs)
    assert msgs[-1]["code"] == "frame_too_large" and "s of audio" in msgs[-1]["message"]


BAD_STREAM_PARAMETERS = {
    "sample_rate=abc": ("?sample_rate=abc", [], "sample_rate"),
    "sample_rate=0": ("?sample_rate=0", [], "sample_rate"),
    "sample_rate=-16000": ("?sample_rate=-16000", [], "sample_rate"),
    "channels=0": ("?channels=0", [], "channels"),
    "channels=x": ("?channels=x", [], "channels"),
    "Configure sample_rate": ("", [{"type": "Configure", "sample_rate": "abc"}], "sample_rate"),
    "Configure channels": ("", [{"type": "Configure", "channels": -1}], "channels"),
    "Configure options": ("", [{"type": "Configure", "options": ["x"]}], "options"),
    "Configure encoding": ("", [{"type": "Configure", "encoding": "mp3"}], "encoding"),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAM_PARAMETERS))
def test_bad_stream_parameters_get_an_error_and_close_1008(serve, case):
    query, texts, word = BAD_STREAM_PARAMETERS[case]
    msgs, code = asyncio.run(ws_session(serve.url, query, texts=texts, frames=[bytes(3200)] * 2))
    assert code == 1008, (code, msgs)
    assert msgs and msgs[-1]["type"] == "Error" and msgs[-1]["code"] == "bad_request", msgs
    assert word in msgs[-1]["message"]
    assert not [m for m in msgs if m["type"] == "Results"]


@pytest.mark.parametrize(
    "ctype",
    ["audio/l16; rate=abc", "audio/l16; rate=0", "audio/l16; channels=0", "audio/l16; rate=50"],
)
def test_invocations_bad_pcm_parameters_are_400(serve, ctype):
    status, _, body = post(serve.url + "/invocations", bytes(3200), {"Content-Type": ctype})
    assert status == 400 and body["code"] == "bad_audio", (status, body)


@pytest.mark.parametrize(
    "query, word",
    [
        ("?beam_size=100000", "beam_size"),
        ("?time_offset=1e308", "time_offset"),
        ("?lm_alpha=1e308", "lm_alpha"),
        ("?no_such_option=1", "no_such_option"),
    ],
)
def test_refused_start_ends_the_session_with_that_error(serve, query, word):
    """Triton refuses the START: the session ends with its error (1008), no carrying on
    with requests for a stream that does not exist."""
    msgs, code = asyncio.run(ws_session(serve.url, query, frames=[bytes(6400)] * 5))
    errors = [m for m in msgs if m["type"] == "Error"]
    assert code == 1008, (code, msgs)
    assert errors and word in errors[0]["message"], (errors, msgs)
    assert not [e for e in errors if "START" in e["message"]], errors  # no follow-ups
    assert not [m for m in msgs if m["type"] == "Results"]


def test_access_log_redacts_query_values(serve):
    secret = "zebracornfluff"
    msgs, code = asyncio.run(
        ws_session(serve.url, f"?hotwords={secret}&sample_rate=16000", frames=[bytes(3200)])
    )
    assert code == 1000, msgs
    post(
        serve.url + f"/invocations?hotwords={secret}",
        bytes(3200),
        {"Content-Type": "audio/l16", CUSTOM_ATTRIBUTES_HEADER: f"hotwords={secret}"},
    )
    log = serve.log()
    assert WS_PATH in log, "the access log should still name the path"
    assert secret not in log


def ping_latencies(url: str, stop: "threading.Event", out: list[float]) -> None:
    import http.client

    host, port = url.split("//")[1].split(":")
    while not stop.is_set():
        t0 = time.monotonic()
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("GET", "/ping")
        status = c.getresponse().status
        c.close()
        out.append(time.monotonic() - t0)
        assert status == 200
        stop.wait(0.2)


PING_LIMIT_S = 2.0  # SageMaker's /ping timeout


@needs_demo
def test_ping_stays_fast_while_40_websocket_sessions_stream(serve):
    import threading

    a, sr = demo_int16()
    pcm = a[: 6 * sr].tobytes()
    stop, lat = threading.Event(), []
    pinger = threading.Thread(target=ping_latencies, args=(serve.url, stop, lat))
    pinger.start()

    async def go():
        return await asyncio.gather(
            *(
                ws_session(
                    serve.url,
                    "?decoding=greedy",
                    frames=[pcm[i : i + 6400] for i in range(0, len(pcm), 6400)],
                    timeout=300,
                )
                for _ in range(40)
            )
        )

    try:
        results = asyncio.run(go())
    finally:
        stop.set()
        pinger.join()
    # say which session ended how: a flake here (once, at load 4.3) must show whether a
    # close was lost or a backend timeout (1011, close_timeout_s) ended it
    bad = [(code, [m for m in msgs if m["type"] == "Error"]) for msgs, code in results]
    assert all(code == 1000 for code, _ in bad), [b for b in bad if b[0] != 1000]
    assert len(lat) >= 3 and max(lat) < PING_LIMIT_S, sorted(lat)[-5:]


@needs_demo
def test_ping_stays_fast_during_concurrent_long_invocations(serve):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    body = DEMO_WAV.read_bytes()
    stop, lat = threading.Event(), []
    pinger = threading.Thread(target=ping_latencies, args=(serve.url, stop, lat))
    pinger.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: post(serve.url + "/invocations", body, {"Content-Type": "audio/wav"}),
                    range(8),
                )
            )
    finally:
        stop.set()
        pinger.join()
    # beyond max_concurrent_invocations (4) whole files are refused 503 busy, not queued
    ok = [a for a in answers if a[0] == 200]
    assert len(ok) >= GatewayConfig().max_concurrent_invocations
    assert all(
        status == 503 and body["code"] == "busy" for status, _, body in answers if status != 200
    )
    assert len(lat) >= 3 and max(lat) < PING_LIMIT_S, sorted(lat)[-5:]


def test_oversize_body_is_refused_by_content_length_before_reading(serve):
    """The body is never sent: the gateway must answer from the header alone."""
    with socket.create_connection(("127.0.0.1", serve.port), timeout=15) as s:
        s.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: 209715200\r\n\r\n" + bytes(65536)
        )
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"too_large" in head or b"Content-Length" in head


def test_oversize_chunked_body_is_refused_at_the_limit(serve):
    cfg = GatewayConfig(triton_grpc=f"127.0.0.1:{serve.grpc_port}", max_body_bytes=1 << 20)
    sent = {"n": 0}

    async def body():
        for _ in range(64):
            sent["n"] += 65536
            yield bytes(65536)

    async def go():
        gw = Gateway(cfg)
        server = aiohttp.test_utils.TestServer(gw.app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(
                    server.make_url("/invocations"),
                    data=body(),
                    headers={"Content-Type": "audio/wav"},
                ) as r:
                    return r.status, await r.json()
        finally:
            await server.close()

    status, answer = asyncio.run(go())
    assert status == 413 and answer["code"] == "too_large", answer
