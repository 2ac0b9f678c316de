"""The Deepgram dialect's query parameters (streamasr/sagemaker/gateway/deepgram.py), without
a server: every parameter of the table behaves as its policy says, mapped values reach the
stream options the decoder checks, and docs/deepgram.md's table is the code's table.  The
same parameters through Deepgram's real SDK and the gateway: tests/e2e/test_deepgram.py."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from streamasr.core.decoding import EndpointConfig
from streamasr.core.decoding.config import DEFAULT_ENDPOINTING_MS
from streamasr.sagemaker.gateway import deepgram as dg
from streamasr.sagemaker.gateway.audio import G711_TABLES, decode_pcm

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deepgram.md"
BASE = {"model": ["nova-3"], "encoding": ["linear16"], "sample_rate": ["16000"]}


def parse(**params: str | list[str]) -> dg.ListenRequest:
    q = dict(BASE)
    q.update({k: v if isinstance(v, list) else [v] for k, v in params.items()})
    return dg.parse_listen_query(q)


def refused(match: str, **params: str | list[str]) -> None:
    with pytest.raises(dg.ListenParameterError, match=match):
        parse(**params)


def test_defaults_are_deepgrams():
    r = parse()
    assert r.query == {"encoding": "linear16", "sample_rate": 16000, "utterance_end": 0.0}
    assert not (r.interim_results or r.punctuate or r.vad_events or r.utterance_end)


@pytest.mark.parametrize(
    "name", [n for n, (p, _) in dg.PARAMETERS.items() if p == dg.REFUSED], ids=str
)
def test_refused_parameters_are_named(name):
    refused(f"^{name}: not supported here", **{name: "x"})


@pytest.mark.parametrize(
    "name", [n for n, (p, _) in dg.PARAMETERS.items() if p == dg.FALSE_ONLY], ids=str
)
def test_false_only_parameters(name):
    assert parse(**{name: "false"}).query == parse().query
    refused(f"^{name}=true is not supported here", **{name: "true"})
    refused(f"^{name}: must be true or false", **{name: "maybe"})


@pytest.mark.parametrize(
    "name", [n for n, (p, _) in dg.PARAMETERS.items() if p == dg.IGNORED], ids=str
)
def test_ignored_parameters_change_nothing(name):
    assert parse(**{name: "anything"}) == parse()


def test_unknown_parameters_are_refused_by_name():
    refused("^beam_size: not a parameter of Deepgram's live API", beam_size="8")
    refused("^sequence_id: not a parameter", sequence_id="1")


@pytest.mark.parametrize(
    "name,value,two_pass",
    [
        ("model", "nova-3", None),
        ("model", "nova-2-phonecall", None),
        ("model", "base", None),
        ("model", "streaming_asr", False),
        ("model", "streaming_asr_two_pass", True),
    ],
)
def test_model_names(name, value, two_pass):
    assert parse(model=value).query.get("two_pass") == two_pass


@pytest.mark.parametrize("value", ["whisper-large", "nova-3-klingon", "flux-general-en", ""])
def test_unknown_models_are_refused(value):
    refused("^model: .* is not served here", model=value)


def test_format():
    q = parse(encoding="mulaw", sample_rate="8000", channels="2").query
    assert (q["encoding"], q["sample_rate"], q["channels"]) == ("mulaw", 8000, 2)
    refused("^encoding: 'opus' is not supported", encoding="opus")
    refused("^sample_rate: must be between", sample_rate="4000")
    refused("^channels: must be between", channels="9")
    with pytest.raises(dg.ListenParameterError, match="^encoding and sample_rate go together"):
        dg.parse_listen_query({"model": ["nova-3"], "encoding": ["linear16"]})
    wav = dg.parse_listen_query({"model": ["nova-3"]})
    assert wav.wav and "encoding" not in wav.query and not parse().wav


def wav_bytes(tag: int, bits: int, rate: int = 8000, channels: int = 1, extra=b"") -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, 1, bits)
    chunks = b"LIST" + struct.pack("<I", 3) + b"abc\0"  # odd size: padded
    chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    chunks += b"data" + struct.pack("<I", 0xFFFFFFFF)  # a live stream's unknown length
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + chunks + extra


@pytest.mark.parametrize(
    "tag,bits,encoding",
    [(1, 16, "linear16"), (3, 32, "float32"), (7, 8, "mulaw"), (6, 8, "alaw")],
)
def test_wav_header(tag, bits, encoding):
    head = wav_bytes(tag, bits, 8000, 2, extra=b"\x01\x02")
    found = dg.wav_header(head)
    assert found is not None
    assert found[:3] == (encoding, 8000, 2) and head[found[3] :] == b"\x01\x02"
    # byte by byte: None until the data chunk's header is there
    assert all(dg.wav_header(head[:n]) is None for n in range(found[3]))


def test_not_wav():
    with pytest.raises(dg.NotWav, match="not WAV and no encoding"):
        dg.wav_header(b"OggS" + bytes(40))
    with pytest.raises(dg.NotWav, match="WAV format 85 with 0-bit"):
        dg.wav_header(wav_bytes(85, 0))  # MP3 in WAV
    with pytest.raises(dg.NotWav, match="no WAV data chunk"):
        dg.wav_header(b"RIFF\0\0\0\0WAVE" + b"JUNK" + struct.pack("<I", 1 << 20) + bytes(70000))


def test_endpointing_ms_and_false():
    """Deepgram's endpointing (ms of silence after speech) -> our endpointing (ms, the
    voice-activity endpoint); true -> the server's default; false -> 0 (none)."""
    assert parse(endpointing="300").query["endpointing"] == 300
    assert EndpointConfig.from_parameters({"endpointing": 300}).endpointing == 300
    assert parse(endpointing="false").query["endpointing"] == 0
    assert parse(endpointing="true").query["endpointing"] == DEFAULT_ENDPOINTING_MS
    refused("^endpointing: must be milliseconds", endpointing="soon")
    refused("^endpointing: ", endpointing="-5")
    refused("^endpointing: ", endpointing="99999999")


def test_utterance_end_ms():
    r = parse(utterance_end_ms="1500")
    assert r.utterance_end and r.query["utterance_end"] == pytest.approx(1.5)
    refused("^utterance_end_ms: must be an integer", utterance_end_ms="soon")


def test_keywords_and_keyterms_become_hotwords():
    q = parse(keywords=["Triton:2", "SageMaker"], keyterm="Route 66, Open-Source").query
    assert json.loads(q["hotwords"]) == [
        ["triton", 2.0],
        "sagemaker",
        "route sixty six open source",
    ]
    refused("^keyterm: empty phrase", keyterm="?!")
    refused("^keywords: negative boosts", keywords="um:-5")
    refused("^keywords: ", keywords="x:lots")
    # the decoder's own check, named by Deepgram's parameter
    refused("^keyterm: .*hotwords", keyterm="word " * 1000)


def test_language():
    for v in ("en", "en-US", "en-gb"):
        assert parse(language=v) == parse()
    refused("^language: 'de' is not served here", language="de")
    refused("^language_hint: 'multi' is not served", language_hint="multi")
    refused("^version: only 'latest'", version="2024-01-01")
    assert parse(version="latest") == parse()


def test_flags_and_extra():
    r = parse(
        interim_results="true",
        punctuate="false",
        smart_format="true",
        vad_events="true",
        extra=["team:voice", "env:a:b"],
    )
    assert r.interim_results and r.punctuate and r.vad_events
    assert r.extra == {"team": "voice", "env": "a:b"}
    refused("^extra: must be key:value", extra="nokey")
    refused("^interim_results: given 2 times", interim_results=["true", "false"])


def test_doc_table_is_the_code_table():
    """docs/deepgram.md's parameter table row by row: deepgram.PARAMETERS."""
    rows = {}
    section = DOC.read_text().split("## Parameters", 1)[1].split("\n#", 1)[0]
    for line in section.splitlines():
        m = re.fullmatch(r"\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    assert rows == dg.PARAMETERS, (
        f"{DOC.name}'s parameter table differs from deepgram.PARAMETERS: "
        f"{ {k: v for k, v in rows.items() if dg.PARAMETERS.get(k) != v} } "
        f"missing {sorted(set(dg.PARAMETERS) - set(rows))}"
    )


def test_g711_matches_the_standard_reference():
    audioop = pytest.importorskip("audioop")  # Python <= 3.12 still ships it
    codes = bytes(range(256))
    for name, ref in (("mulaw", audioop.ulaw2lin), ("alaw", audioop.alaw2lin)):
        want = np.frombuffer(ref(codes, 2), "<i2")
        assert np.array_equal(G711_TABLES[name], want), name
        assert np.allclose(decode_pcm(codes, name), want / 32768.0)
