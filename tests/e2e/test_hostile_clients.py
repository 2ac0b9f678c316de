"""Hostile clients against the gateway (issue 21): no client reaches into another
client's stream, no frame is free, every refusal is an Error then a close, and no
client text reaches the log.  Each attack runs beside a bystander whose transcript must
come out exactly as it does alone."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import aiohttp
import aiohttp.test_utils
import pytest

from benchmarks.server_stats import model_requests
from streamasr import protocol
from streamasr.core.decoding import DecoderConfig, EndpointConfig
from streamasr.core.decoding.config import SERVER_ONLY_PARAMETERS
from streamasr.protocol import CUSTOM_ATTRIBUTES_HEADER, SESSION_HEADER, WS_PATH, final_text
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.health import HEALTH_INTERVAL_S
from streamasr.sagemaker.gateway.http import Gateway
from streamasr.sagemaker.gateway.options import OptionError, client_message, client_options
from streamasr.sagemaker.gateway.ws import TokenBucket, WsSession, json_depth
from streamasr_client.stream import AsrConnection

from ..helpers import needs_demo, post
from .test_gateway import demo_int16, ws_session, ws_stream

# A word no test audio or option holds: wherever a client sends it, the log must not.
CANARY = "zebracanary"
# Every key a reserved request field: the first three are the exploit of issue 21.
RESERVED = ["sequence_id", "sequence_start", "sequence_end", "priority", "timeout"]


# -- units ---------------------------------------------------------------------------------


def test_stream_option_keys_are_the_decoders_fields():
    fields = {f for cls in (DecoderConfig, EndpointConfig) for f in cls.__dataclass_fields__}
    assert protocol.STREAM_OPTION_KEYS == fields - SERVER_ONLY_PARAMETERS


@pytest.mark.parametrize("key", [*RESERVED, "triton_enable_empty_final_response", "lm_path"])
def test_reserved_and_unknown_keys_are_refused_by_name(key):
    with pytest.raises(ValueError, match=key):
        protocol.check_stream_options({key: "1"})
    with pytest.raises(OptionError, match=key):
        client_options({key: "1"}, {"encoding"})


def test_reserved_name_is_said_to_be_reserved():
    with pytest.raises(ValueError, match="reserved request field"):
        protocol.check_stream_options({"sequence_id": 5})


@pytest.mark.parametrize(
    "options, word",
    [
        ({"beam_size": 2**70}, "64-bit"),
        ({"beam_size": "1180591620717411303424"}, "beam_size"),
        ({"beam_size": 65}, "beam_size"),
        ({"decoding": {"x": 1}}, "decoding"),
        ({"hotwords": "x" * 10_000}, "hotwords"),
    ],
)
def test_option_values_are_checked_before_conversion(options, word):
    with pytest.raises(OptionError, match=word):
        client_options(options)


def test_valid_options_pass_typed():
    opts, own = client_options(
        {"decoding": "beam", "beam_size": 4, "hotwords": [["triton", 2.0]], "two_pass": "true"},
        {"two_pass"},
    )
    assert opts == {"decoding": "beam", "beam_size": 4, "hotwords": '[["triton", 2.0]]'}
    assert own == {"two_pass": "true"}


def test_client_library_refuses_reserved_options_before_sending():
    conn = AsrConnection("127.0.0.1:1")  # never connected: nothing may be sent
    try:
        for key in RESERVED:
            with pytest.raises(ValueError, match=key):
                conn.open_session({key: 1})
        with pytest.raises(ValueError, match="sequence_end"):
            conn.transcribe_file([0.0], options={"sequence_end": True})
    finally:
        conn.close()


def test_sequence_ids_are_not_consecutive():
    conn = AsrConnection("127.0.0.1:1")
    try:
        ids = [conn.open_session().sequence_id for _ in range(50)]
    finally:
        conn.close()
    assert len(set(ids)) == 50 and all(0 < i < 2**63 for i in ids)
    # consecutive or close ids would let one client guess its neighbours'
    gaps = sorted(abs(a - b) for a, b in zip(ids, ids[1:]))
    assert gaps[0] > 2**20, gaps[:3]


def test_error_messages_never_show_the_sequence_id():
    m = {"type": "Error", "message": "stream 123456789 is already open: END it"}
    assert "123456789" not in client_message(m, 123456789)["message"]
    r = {"type": "Results", "channel": {}}
    assert client_message(r, 1) is r


def test_json_depth_and_token_bucket():
    assert json_depth({"a": [1, {"b": []}]}, 10) == 4
    assert json_depth(json.loads("[" * 50 + "]" * 50), 8) == 9  # counted only past the limit
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert b.wait_s() == pytest.approx(0.5)
    now[0] = 0.5
    assert b.take() and not b.take()


class _FakeSession:
    def __init__(self, pending: int, lead: float):
        self.pending, self._lead = pending, lead

    def lead_seconds(self) -> float:
        return self._lead


@pytest.mark.parametrize("lead, code", [(60.0, "backpressure"), (0.0, "overloaded")])
def test_a_real_time_client_is_not_blamed_for_a_slow_server(lead, code):
    """The window stays full past flood_timeout_s: a client far ahead of real time is
    flooding; one at real time is told the server is overloaded (1013, retry)."""
    from streamasr.sagemaker.gateway.ws import ProtocolError

    cfg = GatewayConfig(max_pending_requests=2, flood_timeout_s=0.0)

    async def go():
        gw = type("Gw", (), {"cfg": cfg, "backend": None})()
        ws = WsSession(gw, None, {})  # type: ignore[arg-type]
        ws.session = _FakeSession(pending=2, lead=lead)  # type: ignore[assignment]
        with pytest.raises(ProtocolError) as info:
            await ws._check_flood()
        return info.value

    exc = asyncio.run(go())
    assert exc.code == code
    assert exc.close_code == (1013 if code == "overloaded" else 1008)


# -- through docker/serve -------------------------------------------------------------------


def canaries_at_most(seconds: float) -> int:
    """Requests docker/serve's health canary may have sent through the streaming model in
    ``seconds`` (at most one per health check): they share the Triton counters."""
    return int(seconds / HEALTH_INTERVAL_S) + 1


def triton_requests(serve, model: str) -> float:
    """Requests Triton has counted for ``model`` (success + failure)."""
    hi = int(serve.env["SAGEMAKER_SAFE_PORT_RANGE"].split("-")[1])
    count = model_requests(f"http://127.0.0.1:{hi}/metrics", model)
    assert count is not None, "tritonserver's metrics port did not answer"
    return count


async def _bystander(url: str, pcm: bytes):
    """A well-behaved stream: 0.2 s frames sent at four times real time."""
    return await ws_stream(url, pcm, 6400, pace_s=0.05)


async def _beside_bystander(url: str, pcm: bytes, attack):
    """Run ``attack()`` while a bystander streams ``pcm``; both results."""
    by = asyncio.create_task(_bystander(url, pcm))
    await asyncio.sleep(0.3)  # the bystander's stream is open and answered
    result = await attack()
    return result, await by


@pytest.fixture(scope="module")
def alone(serve):
    """The bystander's transcript alone, and its audio (4 s of demo.wav)."""
    a, sr = demo_int16()
    pcm = a[: 4 * sr].tobytes()
    msgs, code = asyncio.run(_bystander(serve.url, pcm))
    assert code == 1000 and final_text(msgs)
    return pcm, final_text(msgs)


def _errors(msgs: list[dict]) -> list[dict]:
    return [m for m in msgs if m.get("type") == "Error"]


@needs_demo
@pytest.mark.parametrize(
    "how",
    [
        "configure",  # the reproduction of issue 21: a Configure naming the victim's id
        "query",  # ?sequence_id=...&sequence_start=false
        "string_query",  # a string id (orphan streams holding admission slots)
    ],
)
def test_reserved_fields_from_a_websocket_are_refused_and_the_bystander_is_exact(serve, alone, how):
    pcm, expected = alone
    a, sr = demo_int16()

    async def attack():
        if how == "configure":
            cfg = {"sequence_id": 2, "sequence_start": False, "sequence_end": True}
            return await ws_session(
                serve.url,
                texts=[{"type": "Configure", "options": cfg}],
                frames=[a[:sr].tobytes()],
            )
        if how == "query":
            q = "?sequence_id=2&sequence_start=false"
        else:
            q = "?sequence_id=victim&sequence_end=true"
        return await ws_session(serve.url, q, frames=[a[:sr].tobytes()])

    (msgs, code), (by, by_code) = asyncio.run(_beside_bystander(serve.url, pcm, attack))
    errors = _errors(msgs)
    assert code == 1008 and errors and errors[0]["code"] == "bad_request", msgs
    assert "sequence_id" in errors[0]["message"] and "reserved" in errors[0]["message"]
    assert not [m for m in msgs if m.get("type") == "Results"], "attacker got results"
    assert by_code == 1000 and final_text(by) == expected


@needs_demo
def test_reserved_fields_over_http_are_refused(serve):
    a, sr = demo_int16()
    body = a[:sr].astype("<i2").tobytes()
    pcm = {"Content-Type": f"audio/l16;rate={sr}"}
    for url, headers in [
        ("/invocations?sequence_id=2", pcm),
        ("/invocations", {**pcm, CUSTOM_ATTRIBUTES_HEADER: "sequence_end=true"}),
        ("/invocations?priority=1", {**pcm, SESSION_HEADER: protocol.NEW_SESSION}),
        ("/invocations", {**pcm, SESSION_HEADER: "x", CUSTOM_ATTRIBUTES_HEADER: "timeout=1"}),
    ]:
        status, _, answer = post(serve.url + url, body, headers)
        assert status == 400 and answer["code"] == "bad_request", (url, answer)
        assert "reserved" in answer["message"]


@needs_demo
def test_keepalive_flood_costs_triton_nothing_and_is_closed(serve, alone):
    """30,000 KeepAlives became 30,000 Triton requests: now a session over its control
    message rate is closed ("rate_limited"), KeepAlives coalesce, the bystander is exact."""
    pcm, expected = alone
    before, t0 = triton_requests(serve, protocol.STREAM_MODEL), time.monotonic()

    async def attack():
        keepalives = [{"type": "KeepAlive"}] * 5000
        return await ws_session(serve.url, texts=keepalives, close_msg=False)

    (msgs, code), (by, by_code) = asyncio.run(_beside_bystander(serve.url, pcm, attack))
    assert code == 1008 and _errors(msgs)[0]["code"] == "rate_limited", msgs[:3]
    assert by_code == 1000 and final_text(by) == expected
    bystander_requests = len(pcm) // 6400 + 2  # its chunks, START, END
    extra = triton_requests(serve, protocol.STREAM_MODEL) - before - bystander_requests
    canaries = canaries_at_most(time.monotonic() - t0)
    assert extra <= 3 + canaries, f"{extra:.0f} Triton requests for the KeepAlive flood"


@needs_demo
def test_keepalives_at_a_normal_rate_coalesce(serve):
    a, sr = demo_int16()
    before, t0 = triton_requests(serve, protocol.STREAM_MODEL), time.monotonic()

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(serve.url + WS_PATH) as ws:
                await ws.send_bytes(a[:sr].tobytes())
                for _ in range(12):  # 4 a second for 3 s, while the stream is idle
                    await ws.send_str(json.dumps({"type": "KeepAlive"}))
                    await asyncio.sleep(0.25)
                await ws.send_str(json.dumps({"type": "CloseStream"}))
                msgs = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
                return msgs, ws.close_code

    msgs, code = asyncio.run(go())
    assert code == 1000 and not _errors(msgs)
    # START+audio, END, at most one KeepAlive request per keepalive_interval_s (5 s), and
    # the health canary's; one request per KeepAlive would be 14 or more
    sent = triton_requests(serve, protocol.STREAM_MODEL) - before
    assert sent <= 3 + canaries_at_most(time.monotonic() - t0) < 14, sent


@needs_demo
def test_tiny_audio_frames_are_joined_into_few_requests(serve):
    """One Triton request per frame let 10 ms frames cost 40 requests a chunk (and a
    flood of them crashed tritonserver once): frames are joined to min_request_s."""
    a, sr = demo_int16()
    pcm = a[: 2 * sr].tobytes()
    before, t0 = triton_requests(serve, protocol.STREAM_MODEL), time.monotonic()
    msgs, code = asyncio.run(ws_stream(serve.url, pcm, sr // 100 * 2))  # 10 ms frames
    assert code == 1000 and final_text(msgs)
    sent = triton_requests(serve, protocol.STREAM_MODEL) - before
    joined = 2 / GatewayConfig().min_request_s  # 2 s of audio
    assert sent <= joined + 2 + canaries_at_most(time.monotonic() - t0) < 200, sent


@needs_demo
@pytest.mark.parametrize(
    "text, word",
    [
        ("[" * 200_000, "at most"),  # the 200,000 nested brackets: too long
        ("[" * 5_000 + "]" * 5_000, "nested"),
        ('{"type": "Configure", "options": {"beam_size": 1180591620717411303424}}', "64-bit"),
        ('{"type": "Configure", "options": {"beam_size": 100}}', "beam_size"),
        ('{"type": "Configure", "sequence_id": 3}', "unknown field"),
        ('{"type": "Nope"}', "unknown message type"),
    ],
)
def test_bad_control_messages_get_an_error_frame_then_1008(serve, text, word):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(serve.url + WS_PATH, max_msg_size=0) as ws:
                await ws.send_str(text)
                msgs = [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
                return msgs, ws.close_code

    msgs, code = asyncio.run(go())
    assert code == 1008 and len(msgs) == 1, msgs
    assert msgs[0]["type"] == "Error" and msgs[0]["code"] == "bad_request"
    assert word in msgs[0]["message"]
    assert serve.ping() == 200


@needs_demo
def test_no_client_text_reaches_the_log(serve):
    """A canary word through every way a client can send text: none of it in the log
    (gateway and tritonserver both write to it)."""
    a, sr = demo_int16()
    pcm = a[:sr].tobytes()
    wav = {"Content-Type": f"audio/l16;rate={sr}"}
    body = a[:sr].astype("<i2").tobytes()

    async def sockets():
        return [
            await ws_session(serve.url, f"?hotwords={CANARY}", frames=[pcm]),  # valid
            await ws_session(serve.url, f"?hotwords={CANARY}:x", frames=[pcm]),  # bad boost
            await ws_session(serve.url, f"?{CANARY}=1", frames=[pcm]),  # unknown key
            await ws_session(
                serve.url,
                texts=[{"type": "Configure", "options": {"hotwords": [[CANARY, "x"]]}}],
            ),
            await ws_session(serve.url, texts=[{"type": CANARY}]),
            await ws_session(serve.url, texts=[{"type": "Configure", CANARY: 1}]),
            await ws_session(serve.url, f"?encoding={CANARY}", frames=[pcm]),
        ]

    results = asyncio.run(sockets())
    assert results[0][1] == 1000 and all(code == 1008 for _, code in results[1:])
    for url, headers in [
        (f"/invocations?hotwords={CANARY}:x", wav),
        (f"/invocations?{CANARY}=1", wav),
        ("/invocations", {**wav, CUSTOM_ATTRIBUTES_HEADER: f"hotwords={CANARY}:x"}),
        ("/invocations", {**wav, CUSTOM_ATTRIBUTES_HEADER: CANARY}),
        ("/invocations", {"Content-Type": f"audio/{CANARY}"}),
        (f"/invocations?hotwords={CANARY}:x", {**wav, SESSION_HEADER: protocol.NEW_SESSION}),
        ("/invocations", {**wav, SESSION_HEADER: CANARY}),
    ]:
        status, _, _ = post(serve.url + url, body, headers)
        assert status in (400, 404, 415), (url, status)
    req = urllib.request.Request(f"{serve.url}/{CANARY}?{CANARY}=1", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 404
    time.sleep(0.5)  # the log is written by other processes: let them flush
    log = serve.log_path.read_text(errors="replace")
    assert CANARY not in log, [line for line in log.splitlines() if CANARY in line][:5]


# -- in-process gateways with tight limits, on the same Triton ------------------------------


async def _gateway(cfg: GatewayConfig):
    gw = Gateway(cfg)
    server = aiohttp.test_utils.TestServer(gw.app())
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")


@needs_demo
def test_an_idle_socket_is_ended_with_its_final(serve):
    """A client that stops sending (an abandoned socket) holds its stream (and an
    admission place) no longer than idle_timeout_s; its final still goes out."""
    a, sr = demo_int16()
    cfg = GatewayConfig(triton_grpc=f"127.0.0.1:{serve.grpc_port}", idle_timeout_s=1.0)

    async def go():
        server, url = await _gateway(cfg)
        try:
            t0 = time.monotonic()
            msgs, code = await ws_session(url, frames=[a[: 3 * sr].tobytes()], close_msg=False)
            return msgs, code, time.monotonic() - t0
        finally:
            await server.close()

    msgs, code, took = asyncio.run(go())
    assert code == 1008 and _errors(msgs)[-1]["code"] == "idle_timeout"
    assert final_text(msgs), "the open utterance's final was lost"
    assert took < 10


@needs_demo
def test_a_refused_client_is_disconnected_even_if_it_never_answers_the_close(serve):
    cfg = GatewayConfig(triton_grpc=f"127.0.0.1:{serve.grpc_port}", ws_close_timeout_s=0.5)

    async def go():
        server, url = await _gateway(cfg)
        try:
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(url + WS_PATH + "?sequence_id=1", autoclose=False)
                kinds = []
                t0 = time.monotonic()
                while len(kinds) < 3 and time.monotonic() - t0 < 10:
                    m = await ws.receive(timeout=10)
                    kinds.append(m.type)
                    if m.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                return kinds, time.monotonic() - t0
        finally:
            await server.close()

    kinds, took = asyncio.run(go())
    assert kinds[:2] == [aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.CLOSE], kinds
    assert kinds[-1] in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), kinds
    assert took < 5


@needs_demo
def test_slow_chunked_bodies_time_out(serve, monkeypatch):
    """A client trickling a chunked /invocations body is answered 504 at the deadline
    and its connection closed (the deadline used to start after the body was read)."""
    monkeypatch.setenv("STREAMASR_INVOKE_TIMEOUT", "1")
    cfg = GatewayConfig(triton_grpc=f"127.0.0.1:{serve.grpc_port}")

    async def go():
        server, url = await _gateway(cfg)
        host, port = url.split("//")[1].split(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            t0 = time.monotonic()
            head = b""
            for _ in range(40):  # one byte every 0.1 s: 4 s if never cut
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                try:
                    head = await asyncio.wait_for(reader.read(4096), 0.1)
                except asyncio.TimeoutError:
                    continue
                break
            took = time.monotonic() - t0
            writer.close()
            return head, took
        finally:
            await server.close()

    head, took = asyncio.run(go())
    assert head.startswith(b"HTTP/1.1 504"), head[:80]
    assert took < 3


@needs_demo
def test_whole_file_invocations_have_a_concurrency_limit(serve):
    from streamasr.sagemaker.gateway.config import GatewayConfig as Cfg

    from ..helpers import DEMO_WAV

    cfg = Cfg(triton_grpc=f"127.0.0.1:{serve.grpc_port}", max_concurrent_invocations=1)
    body = DEMO_WAV.read_bytes()

    async def go():
        server, url = await _gateway(cfg)
        try:
            async with aiohttp.ClientSession() as s:

                async def one():
                    async with s.post(
                        url + "/invocations", data=body, headers={"Content-Type": "audio/wav"}
                    ) as r:
                        return r.status, r.headers.get("Retry-After"), await r.json()

                return await asyncio.gather(*(one() for _ in range(3)))
        finally:
            await server.close()

    results = asyncio.run(go())
    statuses = sorted(r[0] for r in results)
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    busy = [r for r in results if r[0] == 503]
    assert all(r[1] and r[2]["code"] == protocol.BUSY_CODE for r in busy)
