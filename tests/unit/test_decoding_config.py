"""Decoder / endpoint settings: typed parsing of Triton parameters and stream options."""

from __future__ import annotations

import dataclasses

import pytest

from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder
from streamasr.core.decoding.config import (
    DEFAULT_ENDPOINTING_MS,
    DEFAULT_HOTWORD_BOOST,
    DEFAULT_RULE1_MIN_TRAILING_SILENCE,
    DEFAULT_RULE2_MIN_TRAILING_SILENCE,
    DEFAULT_RULE3_MIN_UTTERANCE_LENGTH,
)

from ..helpers import CONTRACT


def test_defaults_are_sherpa_rules_and_greedy():
    e, d = EndpointConfig(), DecoderConfig()
    assert (
        e.rule1_min_trailing_silence,
        e.rule2_min_trailing_silence,
        e.rule3_min_utterance_length,
    ) == (2.4, 1.2, 20.0)
    assert (
        DEFAULT_RULE1_MIN_TRAILING_SILENCE,
        DEFAULT_RULE2_MIN_TRAILING_SILENCE,
        DEFAULT_RULE3_MIN_UTTERANCE_LENGTH,
    ) == (2.4, 1.2, 20.0)
    assert e.endpointing == DEFAULT_ENDPOINTING_MS and e.empty_finals is False
    assert d.decoding == "greedy" and d.hotwords == () and d.lm_path == ""


def test_string_parameters_are_parsed_to_types():
    d = DecoderConfig.from_parameters(
        {
            "decoding": "Beam",
            "beam_size": "4",
            "beam_top_k": "3",
            "hotwords": "tensor rt:2.5, triton",
            "time_offset": "1.5",
            "lm_beta": "-0.5",
        }
    )
    assert d.decoding == "beam" and d.beam_size == 4 and d.beam_top_k == 3
    assert d.hotwords == (("tensor rt", 2.5), ("triton", DEFAULT_HOTWORD_BOOST))
    assert d.time_offset == 1.5 and d.lm_beta == -0.5
    e = EndpointConfig.from_parameters(
        {
            "endpointing": "false",
            "empty_finals": "yes",
            "rule2_min_trailing_silence": "0.8",
            "utterance_end": "0",
        }
    )
    assert e.endpointing == 0 and e.empty_finals is True
    assert e.rule2_min_trailing_silence == 0.8 and e.utterance_end == 0.0
    # typed values (JSON stream options) are accepted as well
    assert EndpointConfig.from_parameters(
        {"endpointing": True, "rule3_min_utterance_length": 5}
    ) == EndpointConfig(endpointing=True, rule3_min_utterance_length=5.0)
    assert DecoderConfig.from_parameters({"beam_size": 6.0}).beam_size == 6


def test_endpointing_is_milliseconds_or_a_boolean_as_deepgrams():
    def ms(raw) -> int:
        return EndpointConfig.from_parameters({"endpointing": raw}).endpointing

    assert ms(True) == ms("true") == ms("on") == DEFAULT_ENDPOINTING_MS
    assert ms(False) == ms("false") == ms("0") == ms(0) == 0
    assert ms("300") == ms(300) == ms(300.0) == 300
    assert ms("1") == 1  # digits are milliseconds, never "true"
    for bad in ("-5", "1.5", "soon", 10**9):
        with pytest.raises(ValueError, match="endpointing"):
            ms(bad)


def test_hotword_forms():
    want = (("foo bar", 2.0), ("baz", 3.0))
    for raw in (
        '[["foo bar", 2], ["baz", "3"]]',
        [("foo bar", 2.0), ["baz", 3]],
        "foo bar:2,baz:3",
    ):
        assert DecoderConfig.from_parameters({"hotwords": raw}).hotwords == want
    assert DecoderConfig.from_parameters({"hotwords": '["x"]', "hotword_boost": "4"}).hotwords == (
        ("x", 4.0),
    )
    assert DecoderConfig(hotwords=[("y", 1)]).hotwords == (("y", 1.0),)


@pytest.mark.parametrize(
    "cls,key,value",
    [
        (DecoderConfig, "decoding", "viterbi"),
        (DecoderConfig, "beam_size", "x"),
        (DecoderConfig, "beam_size", "0"),
        (DecoderConfig, "beam_size", "2.5"),
        (DecoderConfig, "beam_top_k", True),
        (DecoderConfig, "hotwords", "[not json"),
        (DecoderConfig, "hotwords", "foo:abc"),
        (DecoderConfig, "hotwords", '[["foo", 1, 2]]'),
        (DecoderConfig, "hotwords", ":2"),
        (DecoderConfig, "lm_alpha", "nan"),
        (DecoderConfig, "time_offset", "-1"),
        (DecoderConfig, "lm_path", "/no/such/lm.arpa"),
        (EndpointConfig, "endpointing", "maybe"),
        (EndpointConfig, "endpointing", "-1"),
        (EndpointConfig, "rule1_min_trailing_silence", "-2"),
        (EndpointConfig, "rule2_min_trailing_silence", "soon"),
        (EndpointConfig, "rule3_min_utterance_length", "inf"),
        (EndpointConfig, "utterance_end", ""),
    ],
)
def test_bad_values_raise_value_error_naming_the_key(cls, key, value):
    with pytest.raises(ValueError) as err:
        cls.from_parameters({key: value})
    assert str(err.value).startswith(f"{key}:"), str(err.value)


@pytest.mark.parametrize("cls", [DecoderConfig, EndpointConfig])
def test_unknown_keys_are_rejected(cls):
    with pytest.raises(ValueError, match="beam_sise") as err:
        cls.from_parameters({"beam_sise": "4"})
    assert "known" in str(err.value)


def test_decoder_and_endpoint_keys_are_disjoint():
    dec = {f.name for f in dataclasses.fields(DecoderConfig)}
    end = {f.name for f in dataclasses.fields(EndpointConfig)}
    assert not dec & end


def test_stream_level_errors_name_the_key():
    with pytest.raises(ValueError, match="^hotwords:.*beam"):
        StreamDecoder(CONTRACT, config=DecoderConfig(hotwords=[("cat", 1.0)]))
    with pytest.raises(ValueError, match="^hotwords:.*vocabulary"):
        StreamDecoder(
            CONTRACT, config=DecoderConfig(decoding="beam", hotwords=[("caf\u00e9", 1.0)])
        )
    # a capitalised hotword falls back to the lowercase vocabulary
    StreamDecoder(CONTRACT, config=DecoderConfig(decoding="beam", hotwords=[("Cat", 1.0)]))


def test_server_only_parameters_are_decoder_fields():
    from streamasr.core.decoding.config import SERVER_ONLY_PARAMETERS

    assert SERVER_ONLY_PARAMETERS == {"lm_path"}
    assert SERVER_ONLY_PARAMETERS <= {f.name for f in dataclasses.fields(DecoderConfig)}


@pytest.mark.parametrize(
    "key, bad",
    [
        ("time_offset", "1e308"),
        ("lm_alpha", "1e308"),
        ("lm_beta", "-1e6"),
        ("beam_size", "100000"),
        ("hotword_boost", "1e9"),
        ("hotwords", "triton:1e300"),
        ("lm_oov_letter_log10", "-1e300"),
        ("rule3_min_utterance_length", "1e12"),
        ("utterance_end", "1e12"),
    ],
)
def test_absurd_option_values_are_refused_by_name(key, bad):
    from streamasr.core.decoding.config import OPTION_RANGES

    cls = (
        EndpointConfig
        if key in {f.name for f in dataclasses.fields(EndpointConfig)}
        else DecoderConfig
    )
    with pytest.raises(
        ValueError, match=f"^{'hotword_boost' if key == 'hotwords' else key}: must be between"
    ):
        cls.from_parameters({key: bad})
    # every bound is itself accepted
    if key in OPTION_RANGES:
        for edge in OPTION_RANGES[key]:
            value = int(edge) if key in ("beam_size", "beam_top_k") else edge
            assert getattr(cls.from_parameters({key: value}), key) == value


def test_every_option_range_is_documented():
    from pathlib import Path

    from streamasr.core.decoding.config import OPTION_RANGES

    readme = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for key, (lo, _hi) in OPTION_RANGES.items():
        rows = [
            line
            for line in readme.splitlines()
            if line.startswith("|") and f"`{key}`" in line.split("|")[1]
        ]
        assert rows and f"{lo:g} to " in rows[0].split("|")[4], (key, rows)
