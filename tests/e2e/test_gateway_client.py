"""client/streamasr_client/sagemaker_stream.py: its framing against the real gateway
(docker/serve on this machine), the bidirectional stream through AWS's own HTTP/2 SDK (in
.venv-http2) and a local stand-in for SageMaker's runtime endpoint, the InvokeEndpoint
stateful-session fallback through the same headers SageMaker forwards, and the boto3
mapping under Stubber."""

from __future__ import annotations

import asyncio
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from streamasr.protocol import final_text
from streamasr_client import sagemaker_stream as sms

from ..helpers import DEMO_WAV, ROOT, needs_demo, post
from ..sagemaker_runtime_standin import RuntimeStandIn, make_certificates

HTTP2_PYTHON = ROOT / ".venv-http2" / "bin" / "python"
# Test credentials, known to the stand-in, which checks every signature with them.
ACCESS_KEY, SECRET_KEY, REGION = "AKIDSTREAMASRTEST", "streamasr-test-secret", "us-west-2"


def python_312() -> str | None:
    """A Python >= 3.12 on this machine (the Makefile's search for venv-http2), or None."""
    home = os.path.expanduser("~")
    for c in [
        "python3.12",
        "python3.13",
        *sorted(glob.glob(f"{home}/.pyenv/versions/3.1[23]*/bin/python3.1[23]")),
    ]:
        try:
            r = subprocess.run(
                [c, "-c", "import sys; sys.exit(sys.version_info < (3, 12))"],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return c
    return None


def http2_python() -> Path:
    if HTTP2_PYTHON.exists():
        return HTTP2_PYTHON
    if python_312() is None:
        pytest.skip(
            "no Python >= 3.12 on this machine, so AWS's HTTP/2 SDK "
            "(aws-sdk-sagemaker-runtime-http2) cannot be installed"
        )
    pytest.fail("a Python >= 3.12 exists but .venv-http2 does not: run `make venv-http2`")


def aws_profile(tmp: Path, secret: str = SECRET_KEY) -> dict[str, str]:
    """An environment whose only credentials are a named profile in shared files (the
    standard chain, not AWS_ACCESS_KEY_ID), with its region; no instance metadata."""
    (tmp / "credentials").write_text(
        f"[streamasr-test]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {secret}\n"
    )
    (tmp / "config").write_text(f"[profile streamasr-test]\nregion = {REGION}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "credentials"),
        AWS_CONFIG_FILE=str(tmp / "config"),
        AWS_PROFILE="streamasr-test",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


def run_bidi_cli(
    py: Path,
    standin: RuntimeStandIn,
    ca: Path,
    env: dict[str, str],
    audio: Path = DEMO_WAV,
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(py),
            "-m",
            "streamasr_client.sagemaker_stream",
            str(audio),
            "--endpoint",
            "streamasr",
            "--endpoint-url",
            standin.url,
            "--ca-bundle",
            str(ca),
            "--chunk-ms",
            "250",
            *[arg for o in options for arg in ("--option", o)],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_framing():
    f = sms.Framing(8000, chunk_ms=20, options={"interim_results": False, "hotwords": "a:2"})
    q = parse_qs(f.query_string())
    assert q == {
        "encoding": ["linear16"],
        "sample_rate": ["8000"],
        "interim_results": ["false"],
        "hotwords": ["a:2"],
    }
    frames = list(f.audio_frames(bytes(1000)))
    assert [len(x) for x in frames] == [320, 320, 320, 40]
    assert json.loads(f.control("CloseStream")) == {"type": "CloseStream"}
    with pytest.raises(ValueError):
        f.control("Bogus")


# ModelQueryString: keys and values of unreserved characters or %XX escapes (issue 22)
QUERY_ITEM = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-F]{2})+")
# hotwords long enough to push the query past its 2048 characters, short enough for the
# decoder's own limit (step_info.MAX_HOTWORDS_CHARS)
LONG_HOTWORDS = ",".join(
    f"word{chr(97 + i // 26)}{chr(97 + i % 26)}:2" for i in range(300)
)  # letters only: a hotword's characters must be in the model's vocabulary
TIME_OFFSET = 1000  # s: an option whose effect a result shows


def test_query_string_is_what_model_query_string_allows():
    f = sms.Framing(16000, options={"hotwords": "new york:3,san francisco", "two_pass": True})
    q = f.query_string()
    assert "+" not in q and "new%20york%3A3%2Csan%20francisco" in q
    for item in q.split("&"):
        key, _, value = item.partition("=")
        assert QUERY_ITEM.fullmatch(key) and QUERY_ITEM.fullmatch(value), item
    assert parse_qs(q)["hotwords"] == ["new york:3,san francisco"]
    assert parse_qs(q)["two_pass"] == ["true"]
    with pytest.raises(ValueError, match="'hotwords' has an empty value"):
        sms.Framing(16000, options={"hotwords": ""}).query_string()


def test_long_option_sets_go_in_a_configure_message():
    opts = {"hotwords": LONG_HOTWORDS, "time_offset": 100, "two_pass": True}
    f = sms.Framing(16000, options=opts)
    query, configure = f.wire()
    assert len(query) <= sms.MAX_QUERY_STRING
    assert parse_qs(query) == {"encoding": ["linear16"], "sample_rate": ["16000"]}
    assert json.loads(configure) == {
        "type": "Configure",
        "two_pass": True,
        "options": {"hotwords": LONG_HOTWORDS, "time_offset": 100},
    }
    with pytest.raises(ValueError, match="Configure"):
        f.query_string()
    assert sms.Framing(16000, options={"time_offset": 100}).wire()[1] is None


def test_model_stream_error_1000_after_close_stream_is_a_clean_end():
    """SageMaker passes every container close on as a ModelStreamError with its code."""
    assert sms.close_code_of("1000", None) == 1000
    assert sms.close_code_of(None, "the model closed the stream with code 1008") == 1008
    assert sms.close_code_of("StreamBroken", "connection reset") is None
    assert sms.ended_cleanly("1000", "closed", input_closed=True)
    assert not sms.ended_cleanly("1000", "closed", input_closed=False)  # cut short
    assert not sms.ended_cleanly("1008", "policy", input_closed=True)
    assert not sms.ended_cleanly("StreamBroken", "connection reset", input_closed=True)


@needs_demo
def test_ws_mode_sends_long_options_in_a_configure_message(serve):
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    framing = sms.Framing(
        rate, chunk_ms=250, options={"hotwords": LONG_HOTWORDS, "time_offset": TIME_OFFSET}
    )
    assert framing.wire()[1] is not None
    msgs = asyncio.run(sms.stream_websocket(serve.url, pcm, framing))
    # the Configure's options were applied: every word is TIME_OFFSET s later
    words = [w for m in msgs if m.get("is_final") for w in m["channel"]["alternatives"][0]["words"]]
    assert words and all(w["start"] >= TIME_OFFSET for w in words)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="checks the <3.12 refusal")
def test_bidi_mode_says_why_it_cannot_run_here():
    with pytest.raises(sms.StreamFailed, match="3.12"):
        asyncio.run(sms.stream_sagemaker("ep", b"", sms.Framing(16000), region="us-east-1"))


@needs_demo
def test_bidi_mode_through_the_sdk_and_a_sagemaker_standin(serve, tmp_path):
    """The real SDK client (0.12, CRT HTTP/2, credentials and region from a profile) ->
    HTTP/2 + signed event stream -> stand-in -> WebSocket -> the real gateway -> Triton:
    the transcript equals /invocations on the same file."""
    py = http2_python()
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed (the stand-in's TLS certificates)")
    ca, cert, key = make_certificates(tmp_path)
    with RuntimeStandIn(serve.url, {ACCESS_KEY: SECRET_KEY}, REGION, cert, key) as standin:
        r = run_bidi_cli(py, standin, ca, aws_profile(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert r.stdout.strip() == whole["transcript"] and whole["transcript"]
    (rec,) = standin.records
    assert rec.error is None and rec.endpoint == "streamasr" and rec.ws_close_code == 1000
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    assert parse_qs(rec.container_url.split("?", 1)[1])["sample_rate"] == [str(rate)]
    kinds = [k for k, _ in rec.parts_in]
    assert kinds == ["BINARY"] * (len(kinds) - 1) + ["UTF8"]  # audio, then CloseStream
    assert sum(n for k, n in rec.parts_in if k == "BINARY") == len(pcm)
    assert rec.signed_events >= len(rec.parts_in) and rec.events_out > 0


@needs_demo
def test_bidi_mode_a_non_normal_close_fails_and_long_options_travel_in_configure(serve, tmp_path):
    """A refusal (close 1008) reaches the client as ModelStreamError 1008: exit 1, named.
    Options too long for ModelQueryString go in a Configure part before the audio."""
    py = http2_python()
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed (the stand-in's TLS certificates)")
    ca, cert, key = make_certificates(tmp_path)
    env = aws_profile(tmp_path)
    with RuntimeStandIn(serve.url, {ACCESS_KEY: SECRET_KEY}, REGION, cert, key) as standin:
        bad = run_bidi_cli(py, standin, ca, env, options=("two_pass=maybe",))
        long = run_bidi_cli(
            py,
            standin,
            ca,
            env,
            options=(f"hotwords={LONG_HOTWORDS}", f"time_offset={TIME_OFFSET}"),
        )
    assert bad.returncode == 1 and not bad.stdout.strip()
    assert "ModelStreamError 1008" in bad.stderr and "Traceback" not in bad.stderr
    assert long.returncode == 0, long.stderr[-3000:]
    assert long.stdout.strip()
    first, second = standin.records
    assert first.ws_close_code == 1008 and second.ws_close_code == 1000
    assert "hotwords" not in second.container_url
    assert second.parts_in[0][0] == "UTF8"  # the Configure, then audio


@needs_demo
def test_bidi_mode_wrong_credentials_fail_clearly(serve, tmp_path):
    """The stand-in really checks SigV4: a profile with the wrong secret is refused, and
    the client exits 1 naming the refusal (no transcript, no traceback)."""
    py = http2_python()
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed (the stand-in's TLS certificates)")
    ca, cert, key = make_certificates(tmp_path)
    with RuntimeStandIn(serve.url, {ACCESS_KEY: SECRET_KEY}, REGION, cert, key) as standin:
        r = run_bidi_cli(py, standin, ca, aws_profile(tmp_path, secret="not-the-secret"))
    assert r.returncode == 1 and not r.stdout.strip()
    assert "AccessDenied" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "signature" in standin.records[0].error


@needs_demo
def test_ws_mode_against_the_gateway(serve):
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    msgs = asyncio.run(sms.stream_websocket(serve.url, pcm, sms.Framing(rate, chunk_ms=250)))
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert final_text(msgs) == whole["transcript"] and whole["transcript"]


@needs_demo
def test_invocations_fallback_against_the_gateway(serve):
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    s = sms.InvocationsSession(sms.http_invoker(serve.url), sms.Framing(rate))
    msgs = s.stream(pcm, chunk_ms=3000)
    assert s.session_id is None  # closed, and the container confirmed it
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert final_text(msgs) == whole["transcript"]


@needs_demo
def test_cli_against_the_gateway(serve, capsys):
    assert sms.main([str(DEMO_WAV), "--url", serve.url]) == 0
    out = capsys.readouterr().out.strip()
    _, _, whole = post(
        serve.url + "/invocations", DEMO_WAV.read_bytes(), {"Content-Type": "audio/wav"}
    )
    assert out == whole["transcript"]


def test_boto3_invoker_maps_the_session_api():
    boto3 = pytest.importorskip("boto3")
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    client = boto3.client(
        "sagemaker-runtime",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    stub = Stubber(client)

    def body(msgs):
        raw = json.dumps({"messages": msgs}).encode()
        return StreamingBody(io.BytesIO(raw), len(raw))

    final = {
        "type": "Results",
        "is_final": True,
        "channel": {"alternatives": [{"transcript": "hello"}]},
    }
    base = {
        "EndpointName": "asr",
        "ContentType": "audio/l16;rate=16000",
        "Accept": "application/json",
    }
    stub.add_response(
        "invoke_endpoint",
        {"Body": body([]), "NewSessionId": "abc; Expires=2026-11-25T00:00:00Z"},
        dict(
            base,
            Body=b"\x00\x00",
            SessionId="NEW_SESSION",
            CustomAttributes="interim_results=false",
        ),
    )
    stub.add_response(
        "invoke_endpoint",
        {"Body": body([final]), "ClosedSessionId": "abc"},
        dict(base, Body=b"\x01\x00", SessionId="abc", CustomAttributes="close=true"),
    )
    stub.activate()
    s = sms.InvocationsSession(
        sms.boto3_invoker("asr", client=client),
        sms.Framing(16000, options={"interim_results": "false"}),
    )
    s.send(b"\x00\x00")
    assert s.session_id == "abc"
    s.send(b"\x01\x00", close=True)
    stub.assert_no_pending_responses()
    assert final_text(s.messages) == "hello" and s.session_id is None
