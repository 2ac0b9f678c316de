"""Deepgram's own clients against the gateway's /v1/listen route (docker/serve + Triton):
deepgram-sdk over a plain WebSocket, deepgram-sagemaker through the local SageMaker
stand-in (HTTP/2, SigV4, invocation path v1/listen), deepgram-captions on the finals.
The SDKs run in .venv-deepgram (``make venv-deepgram``), driven by
tests/deepgram_sdk_client.py as a user's code drives them; "our own client" is
streamasr_client.sagemaker_stream on the gateway's own route with the same options."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import numpy as np
import pytest

from streamasr.protocol import TWO_PASS_MODEL
from streamasr.sagemaker.gateway import deepgram as dg
from streamasr.sagemaker.gateway.audio import G711_TABLES
from streamasr_client import sagemaker_stream as sms
from streamasr_client.audio import resample

from ..helpers import DEMO_WAV, ROOT, needs_demo
from ..sagemaker_runtime_standin import RuntimeStandIn, make_certificates
from .test_gateway_client import ACCESS_KEY, REGION, SECRET_KEY, aws_profile, python_312

DG_PYTHON = ROOT / ".venv-deepgram" / "bin" / "python"
DRIVER = ROOT / "tests" / "deepgram_sdk_client.py"
EVAL = sorted((ROOT / "assets" / "eval").glob("*.wav"))
CHUNK_MS = 250  # what the driver sends per send_media
TELEPHONY_RATE = 8000
# What a Deepgram stream with no utterance_end_ms asks of the decoder beside the format.
DEEPGRAM_DEFAULTS = {"utterance_end": 0.0}
SDK_TYPES = {
    "ListenV1Results",
    "ListenV1Metadata",
    "ListenV1SpeechStarted",
    "ListenV1UtteranceEnd",
    "ListenV1Error",
    "ListenV1ConfigureFailure",
}


def deepgram_python() -> Path:
    if DG_PYTHON.exists():
        return DG_PYTHON
    if python_312() is None:
        pytest.skip("no Python >= 3.12 on this machine, so deepgram-sagemaker cannot be installed")
    pytest.fail("a Python >= 3.12 exists but .venv-deepgram does not: run `make venv-deepgram`")


def sdk(
    url: str,
    audio: Path,
    *params: str,
    flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict:
    """The driver's report of one stream (the SDK's parsed messages, its errors, captions)."""
    r = subprocess.run(
        [str(deepgram_python()), str(DRIVER), str(audio), *flags]
        + (["--url", url.replace("http", "ws", 1)] if url else [])
        + [arg for p in params for arg in ("--param", p)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Skipping unknown WebSocket message" not in r.stderr, r.stderr[-3000:]
    report = json.loads(r.stdout)
    kinds = {m["class"] for m in report["messages"]}
    assert kinds <= SDK_TYPES, f"messages the SDK did not parse as its own types: {kinds}"
    return report


def of(report: dict, kind: str) -> list[dict]:
    return [m["data"] for m in report["messages"] if m["class"] == kind]


def key(final: dict) -> tuple:
    """A final as compared: transcript and timed words."""
    alt = final["channel"]["alternatives"][0]
    return alt["transcript"], [(w["word"], w["start"], w["end"]) for w in alt["words"]]


def sdk_finals(report: dict) -> list[tuple]:
    return [key(m) for m in of(report, "ListenV1Results") if m["is_final"]]


def own_finals(url: str, pcm: bytes, rate: int, **options) -> list[tuple]:
    framing = sms.Framing(rate, chunk_ms=CHUNK_MS, options={**DEEPGRAM_DEFAULTS, **options})
    msgs = asyncio.run(sms.stream_websocket(url, pcm, framing))
    return [key(m) for m in msgs if m.get("type") == "Results" and m.get("is_final")]


def own(url: str, audio: Path, **options) -> list[tuple]:
    pcm, rate = sms.read_pcm16(audio)
    return own_finals(url, pcm, rate, **options)


def test_the_table_is_every_parameter_the_sdk_sends():
    """deepgram.PARAMETERS holds exactly the query parameters listen.v1.connect has."""
    code = (
        "import inspect, json; from deepgram.listen.v1.client import AsyncV1Client as C;"
        "print(json.dumps(sorted(inspect.signature(C.connect).parameters)))"
    )
    r = subprocess.run(
        [str(deepgram_python()), "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    not_query = {"self", "authorization", "request_options"}
    assert set(json.loads(r.stdout)) - not_query == set(dg.PARAMETERS)


@pytest.mark.parametrize("audio", EVAL, ids=lambda p: p.stem)
def test_sdk_finals_equal_our_clients_on_the_eval_set(serve, audio):
    report = sdk(serve.url, audio, "interim_results=true")
    assert report["errors"] == []
    results = of(report, "ListenV1Results")
    assert any(not m["is_final"] for m in results), "no interim arrived"
    assert sdk_finals(report) == own(serve.url, audio) and sdk_finals(report)
    assert all(m["channel_index"] == [0, 1] for m in results)
    assert report["messages"][-1]["class"] == "ListenV1Metadata"


@pytest.mark.parametrize("audio", EVAL, ids=lambda p: p.stem)
def test_two_pass_finals_equal_our_clients_on_the_eval_set(serve, audio):
    report = sdk(serve.url, audio, f"model={TWO_PASS_MODEL}")
    assert report["errors"] == []
    assert sdk_finals(report) == own(serve.url, audio, two_pass=True) and sdk_finals(report)


@needs_demo
def test_sdk_on_demo_with_deepgrams_defaults(serve):
    """No interim_results, vad_events or utterance_end_ms: finals only, as Deepgram sends;
    the finals are our client's; Metadata last, for the audio sent."""
    report = sdk(serve.url, DEMO_WAV)
    assert report["errors"] == []
    assert [m["class"] for m in report["messages"]][-1] == "ListenV1Metadata"
    assert {m["class"] for m in report["messages"]} == {"ListenV1Results", "ListenV1Metadata"}
    assert all(m["is_final"] for m in of(report, "ListenV1Results"))
    assert sdk_finals(report) == own(serve.url, DEMO_WAV) and sdk_finals(report)
    (meta,) = of(report, "ListenV1Metadata")
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    assert meta["duration"] == pytest.approx(len(pcm) / 2 / rate, abs=1e-3)
    results = of(report, "ListenV1Results")
    assert {m["metadata"]["request_id"] for m in results} == {meta["request_id"]}
    assert results[0]["metadata"]["model_info"]["name"] == "streaming_asr"
    assert "punctuated_word" not in results[0]["channel"]["alternatives"][0]["words"][0]


@needs_demo
def test_vad_events_and_utterance_end(serve):
    report = sdk(
        serve.url,
        DEMO_WAV,
        "interim_results=true",
        "vad_events=true",
        "utterance_end_ms=1000",
        "extra=team:voice",
    )
    assert report["errors"] == []
    kinds = [m["class"] for m in report["messages"]]
    worded = [
        m for m in of(report, "ListenV1Results") if m["is_final"] and key(m)[1]
    ]  # finals with words
    started, ends = of(report, "ListenV1SpeechStarted"), of(report, "ListenV1UtteranceEnd")
    assert len(started) == len(ends) == len(worded) > 1
    # each SpeechStarted comes just before the first Results with words of its
    # utterance, at that word's start
    for i, kind in enumerate(kinds):
        if kind == "ListenV1SpeechStarted":
            after = report["messages"][i + 1]
            assert after["class"] == "ListenV1Results" and key(after["data"])[1]
            assert report["messages"][i]["data"]["timestamp"] == key(after["data"])[1][0][1]
    assert [s["timestamp"] for s in started] == pytest.approx(
        [key(m)[1][0][1] for m in worded], abs=0.5
    )
    assert [e["last_word_end"] for e in ends] == [key(m)[1][-1][2] for m in worded]
    assert all(e["channel"] == [0, 1] for e in ends)
    assert of(report, "ListenV1Results")[0]["metadata"]["extra"] == {"team": "voice"}
    assert sdk_finals(report) == own(serve.url, DEMO_WAV, utterance_end=1.0)


@needs_demo
@pytest.mark.parametrize(
    "value,options",
    [("500", {"endpointing": 500}), ("false", {"endpointing": 0})],
)
def test_endpointing_maps_onto_the_endpoint_rules(serve, value, options):
    report = sdk(serve.url, DEMO_WAV, f"endpointing={value}")
    finals = sdk_finals(report)
    assert finals == own(serve.url, DEMO_WAV, **options)
    if value == "false":  # only CloseStream ended the one utterance
        assert len([f for f in finals if f[1]]) == 1
    else:
        assert len(finals) > 1 and all(
            m["speech_final"] for m in of(report, "ListenV1Results")[:-1] if m["is_final"]
        )


@needs_demo
def test_two_pass_smart_format_keeps_whispers_punctuation_and_captions(serve):
    report = sdk(serve.url, DEMO_WAV, f"model={TWO_PASS_MODEL}", "smart_format=true")
    assert report["errors"] == []
    finals = [m for m in of(report, "ListenV1Results") if m["is_final"]]
    mine = own(serve.url, DEMO_WAV, two_pass=True)
    # the same words and times as our client's two-pass finals
    assert [w for _, w in map(key, finals)] == [w for _, w in mine]
    for f in finals:
        alt = f["channel"]["alternatives"][0]
        shown = [w["punctuated_word"] for w in alt["words"]]
        assert alt["transcript"] == " ".join(shown)
        assert alt["transcript"][0].isupper() and alt["transcript"][-1] in ".?!"
    assert f["metadata"]["model_info"]["name"] == TWO_PASS_MODEL
    first = finals[0]["channel"]["alternatives"][0]["words"]
    vtt, srt = report["webvtt"], report["srt"]
    assert vtt.startswith("WEBVTT") and " ".join(w["punctuated_word"] for w in first[:3]) in vtt
    assert "00:00:00,320 --> " in srt or "-->" in srt
    assert srt.count("-->") == vtt.count("-->") > len(finals) - 1


def g711(pcm16: np.ndarray, encoding: str) -> bytes:
    """16-bit samples G.711-encoded: the code whose decoded value is nearest."""
    table = G711_TABLES[encoding].astype(np.int32)
    order = np.argsort(table)
    pos = np.clip(np.searchsorted(table[order], pcm16.astype(np.int32)), 1, 255)
    lo, hi = order[pos - 1], order[pos]
    nearer_hi = np.abs(table[hi] - pcm16) < np.abs(table[lo] - pcm16)
    return np.where(nearer_hi, hi, lo).astype(np.uint8).tobytes()


@needs_demo
@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_telephony_audio_at_8khz(serve, tmp_path, encoding):
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    narrow = np.clip(resample(samples, rate, TELEPHONY_RATE) * 32768.0, -32768, 32767)
    coded = g711(narrow.astype(np.int16), encoding)
    raw = tmp_path / f"demo.{encoding}"
    raw.write_bytes(coded)
    report = sdk(
        serve.url,
        raw,
        f"encoding={encoding}",
        f"sample_rate={TELEPHONY_RATE}",
        flags=("--raw", "--width", "1"),
    )
    assert report["errors"] == []
    decoded = G711_TABLES[encoding][np.frombuffer(coded, np.uint8)].astype("<i2").tobytes()
    mine = own_finals(serve.url, decoded, TELEPHONY_RATE)
    assert sdk_finals(report) == mine and " ".join(t for t, _ in mine).strip()
    (meta,) = of(report, "ListenV1Metadata")
    assert meta["duration"] == pytest.approx(len(coded) / TELEPHONY_RATE, abs=1e-3)


@needs_demo
def test_a_wav_stream_without_encoding(serve):
    """No encoding or sample_rate: the stream's WAV header says the format (as Deepgram
    detects containers); the finals are those of the same audio sent raw."""
    report = sdk(serve.url, DEMO_WAV, "interim_results=true", flags=("--wav",))
    assert report["errors"] == []
    assert sdk_finals(report) == own(serve.url, DEMO_WAV) and sdk_finals(report)
    (meta,) = of(report, "ListenV1Metadata")
    pcm, rate = sms.read_pcm16(DEMO_WAV)
    assert meta["duration"] == pytest.approx(len(pcm) / 2 / rate, abs=1e-3)


def test_audio_that_is_not_wav_and_has_no_encoding_is_data_0000(serve, tmp_path):
    ogg = tmp_path / "fake.ogg"
    ogg.write_bytes(b"OggS" + bytes(8000))
    report = sdk(serve.url, ogg, flags=("--wav",))
    (error,) = of(report, "ListenV1Error")
    assert error["variant"] == dg.UNDECODABLE and "not WAV" in error["description"]
    assert len(report["errors"]) == 1 and "1008" in report["errors"][0]


@pytest.mark.parametrize(
    "param",
    [
        "callback=https://example.com/hook",
        "diarize=true",
        "model=whisper-large",
        "encoding=opus",
        "keywords=um:-5",
        "language=de",
        "no_such_thing=1",
    ],
)
def test_refusals_reach_the_sdk_as_deepgram_errors(serve, param):
    name = param.split("=")[0]
    report = sdk(serve.url, EVAL[0], param)
    (error,) = of(report, "ListenV1Error")
    assert error["variant"] == dg.BAD_PARAMETER and error["description"].startswith(name)
    assert not of(report, "ListenV1Results")
    assert len(report["errors"]) == 1 and "1008" in report["errors"][0]


def test_finalize_keepalive_and_configure(serve):
    """send_finalize -> a final from_finalize; send_keep_alive costs nothing visible;
    Deepgram's Configure (keyterms) -> ConfigureFailure, and the stream goes on."""
    audio = max(EVAL, key=lambda p: p.stat().st_size)
    report = sdk(
        serve.url,
        audio,
        "interim_results=true",
        flags=("--finalize", "--keepalive", "--configure"),
    )
    assert report["errors"] == []
    finals = [m for m in of(report, "ListenV1Results") if m["is_final"]]
    assert [m["from_finalize"] for m in finals].count(True) == 1
    (failure,) = of(report, "ListenV1ConfigureFailure")
    assert failure["code"] == "CONFIGURE_KEYTERMS_NOT_SUPPORTED"
    assert report["messages"][-1]["class"] == "ListenV1Metadata"


async def _raw_socket(url: str, query: str, text: str | None) -> tuple[list[str], int | None]:
    """A plain WebSocket client: the text frames until the server closes, and its code."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}{dg.LISTEN_PATH}?{query}") as ws:
            if text is not None:
                await ws.send_str(text)
            frames = []
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                frames.append(msg.data)
            return frames, ws.close_code


QUERY = "model=nova-3&encoding=linear16&sample_rate=16000"


def test_unknown_control_message_is_a_schema_error(serve):
    frames, code = asyncio.run(_raw_socket(serve.url, QUERY, '{"type":"Bogus"}'))
    (error,) = [json.loads(f) for f in frames]
    assert error["type"] == "Error" and error["variant"] == "SchemaError" and code == 1008
    assert '":"' in frames[0]  # compact JSON, as Deepgram's (its SageMaker transport looks)


def test_silent_stream_closes_1011_net_0001(serve):
    """Nothing sent for the idle timeout: the stream's summary, then Deepgram's NET-0001."""
    frames, code = asyncio.run(_raw_socket(serve.url, QUERY, None))
    meta, error = [json.loads(f) for f in frames]
    assert meta["type"] == "Metadata" and meta["duration"] == 0
    assert error["variant"] == dg.NO_AUDIO_REASON and code == 1011


@needs_demo
def test_deepgram_sagemaker_through_the_standin(serve, tmp_path):
    """deepgram-sagemaker -> HTTP/2 + SigV4 + event stream -> stand-in -> WebSocket on the
    invocation path v1/listen with the SDK's query -> the gateway: the same finals."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed (the stand-in's TLS certificates)")
    ca, cert, key_file = make_certificates(tmp_path)
    with RuntimeStandIn(serve.url, {ACCESS_KEY: SECRET_KEY}, REGION, cert, key_file) as standin:
        report = sdk(
            "",
            DEMO_WAV,
            "interim_results=true",
            "punctuate=true",
            flags=(
                "--sagemaker",
                "streamasr",
                "--endpoint-url",
                standin.url,
                "--ca-bundle",
                str(ca),
                "--region",
                REGION,
            ),
            env=aws_profile(tmp_path),
        )
    (rec,) = standin.records
    assert rec.error is None and rec.ws_close_code == 1000
    url = urlsplit(rec.container_url)
    assert url.path == dg.LISTEN_PATH
    assert parse_qs(url.query)["model"] == ["nova-3"]
    assert parse_qs(url.query)["interim_results"] == ["true"]
    # SageMaker passes every close, 1000 included, on as a ModelStreamError: the SDK
    # reports it after the Metadata (docs/deepgram.md, "What differs")
    assert len(report["errors"]) == 1 and "error_code='1000'" in report["errors"][0]
    assert report["messages"][-1]["class"] == "ListenV1Metadata"
    assert any(not m["is_final"] for m in of(report, "ListenV1Results"))
    assert sdk_finals(report) == own(serve.url, DEMO_WAV)


NODE_DIR = ROOT / "tests" / "deepgram_node"


@needs_demo
def test_deepgrams_node_sdk(serve):
    """@deepgram/sdk 5.13 (Node) on demo.wav: our client's finals, interims, Metadata, a
    normal close; @deepgram/captions renders them.  (@deepgram/sagemaker is not on the npm
    registry, so the Node SageMaker transport is not tested: docs/deepgram.md.)"""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@deepgram" / "sdk").exists():
        pytest.skip("node or tests/deepgram_node/node_modules missing (`make node-deepgram`)")
    r = subprocess.run(
        [
            node,
            "stream.mjs",
            str(DEMO_WAV),
            serve.url.replace("http", "ws", 1),
            "interim_results=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=NODE_DIR,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["errors"] == [] and report["close"] == 1000
    results = [m for m in report["messages"] if m["type"] == "Results"]
    assert any(not m["is_final"] for m in results)
    finals = [key(m) for m in results if m["is_final"]]
    assert finals == own(serve.url, DEMO_WAV) and finals
    assert report["messages"][-1]["type"] == "Metadata"
    assert report["webvtt"].startswith("WEBVTT") and finals[0][1][0][0] in report["webvtt"]
