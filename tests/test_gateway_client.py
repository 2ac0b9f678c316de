"""client/streamasr_client/sagemaker_stream.py: its framing against the real gateway
(docker/serve on this machine), the InvokeEndpoint stateful-session fallback through the
same headers SageMaker forwards, and the boto3 mapping under Stubber."""
from __future__ import annotations

import asyncio
import io
import json
import sys
from urllib.parse import parse_qs

import pytest

from streamasr_client import sagemaker_stream as sms

from .test_gateway import DEMO_WAV, needs_demo, post, serve  # noqa: F401  (fixture)


def test_framing():
    f = sms.Framing(8000, chunk_ms=20, options={"interim_results": False, "hotwords": "a:2"})
    q = parse_qs(f.query_string())
    assert q == {"encoding": ["linear16"], "sample_rate": ["8000"],
                 "interim_results": ["false"], "hotwords": ["a:2"]}
    frames = list(f.audio_frames(bytes(1000)))
    assert [len(x) for x in frames] == [320, 320, 320, 40]
    assert json.loads(f.control("CloseStream")) == {"type": "CloseStream"}
    with pytest.raises(ValueError):
        f.control("Bogus")


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="checks the <3.12 refusal")
def test_bidi_mode_says_why_it_cannot_run_here():
    with pytest.raises(sms.StreamFailed, match="3.12"):
        asyncio.run(sms.stream_sagemaker("ep", b"", sms.Framing(16000), region="us-east-1"))


@needs_demo
def test_ws_mode_against_the_gateway(serve):  # noqa: F811
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    msgs = asyncio.run(sms.stream_websocket(serve.url, pcm, sms.Framing(rate, chunk_ms=250)))
    _, _, whole = post(serve.url + "/invocations", DEMO_WAV.read_bytes(),
                       {"Content-Type": "audio/wav"})
    assert sms.transcript(msgs) == whole["transcript"] and whole["transcript"]


@needs_demo
def test_invocations_fallback_against_the_gateway(serve):  # noqa: F811
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    s = sms.InvocationsSession(sms.http_invoker(serve.url), sms.Framing(rate))
    msgs = s.stream(pcm, chunk_ms=3000)
    assert s.session_id is None          # closed, and the container confirmed it
    _, _, whole = post(serve.url + "/invocations", DEMO_WAV.read_bytes(),
                       {"Content-Type": "audio/wav"})
    assert sms.transcript(msgs) == whole["transcript"]


@needs_demo
def test_cli_against_the_gateway(serve, capsys):  # noqa: F811
    assert sms.main([str(DEMO_WAV), "--url", serve.url]) == 0
    out = capsys.readouterr().out.strip()
    _, _, whole = post(serve.url + "/invocations", DEMO_WAV.read_bytes(),
                       {"Content-Type": "audio/wav"})
    assert out == whole["transcript"]


def test_boto3_invoker_maps_the_session_api():
    boto3 = pytest.importorskip("boto3")
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    client = boto3.client("sagemaker-runtime", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)

    def body(msgs):
        raw = json.dumps({"messages": msgs}).encode()
        return StreamingBody(io.BytesIO(raw), len(raw))

    final = {"type": "Results", "is_final": True,
             "channel": {"alternatives": [{"transcript": "hello"}]}}
    base = {"EndpointName": "asr", "ContentType": "audio/l16;rate=16000",
            "Accept": "application/json"}
    stub.add_response("invoke_endpoint",
                      {"Body": body([]), "NewSessionId": "abc; Expires=2026-11-25T00:00:00Z"},
                      dict(base, Body=b"\x00\x00", SessionId="NEW_SESSION",
                           CustomAttributes="interim_results=false"))
    stub.add_response("invoke_endpoint", {"Body": body([final]), "ClosedSessionId": "abc"},
                      dict(base, Body=b"\x01\x00", SessionId="abc", CustomAttributes="close=true"))
    stub.activate()
    s = sms.InvocationsSession(sms.boto3_invoker("asr", client=client),
                               sms.Framing(16000, options={"interim_results": "false"}))
    s.send(b"\x00\x00")
    assert s.session_id == "abc"
    s.send(b"\x01\x00", close=True)
    stub.assert_no_pending_responses()
    assert sms.transcript(s.messages) == "hello" and s.session_id is None
