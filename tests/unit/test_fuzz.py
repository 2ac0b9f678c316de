"""Hostile input, in process (no server): property-based fuzz of the feature step and of
the decoder step's STEP_INFO, a per-stream duration limit, and hour-long streams whose
buffers stay bounded.

Invariants: a request is answered with well-formed output or refused with a
``StreamError`` (the adapters turn it into a clear error response) -- never another
exception; a refused request changes no stream; no stream disturbs another.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder
from streamasr.core.decoding.search import alignment
from streamasr.core.features import FeatureStream
from streamasr.core.state import StreamError
from streamasr.pipeline.common import FLAG_END, FLAG_START, ModelConfig
from streamasr.pipeline.ctc_decoder import CtcDecoderStep, DecoderDefaults, DecoderRequest
from streamasr.pipeline.feature_extractor import (
    DEFAULT_MAX_STREAM_SECONDS,
    FeatureExtractorStep,
    FeatureRequest,
    build_step,
)
from streamasr.pipeline.step_info import StepInfo, parse_step_info
from streamasr.tools.tiny_model import tiny_contract

C = tiny_contract()
RATE = C.sample_rate
V = len(C.vocabulary)
BYSTANDER = 999_999_999  # never drawn by the fuzzers below
IDS = st.sampled_from([1, 2, 3, 2**63 + 5, 2**64 - 1])
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def new_feature_step(**kw) -> FeatureExtractorStep:
    defaults = DecoderDefaults()
    args = dict(
        idle_timeout_s=30,
        max_chunk_seconds=2.0,
        max_windows_per_request=32,
        max_streams=8,
        validate_options=defaults.validate,
    )
    args.update(kw)
    return FeatureExtractorStep(C, **args)


# -- strategies --------------------------------------------------------------------------
finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32, allow_subnormal=False)
F32 = np.finfo(np.float32)
huge = st.sampled_from([0.0, 1.0, -1.0, float(F32.max), float(-F32.max), float(F32.tiny), 65504.0])
audio_arrays = st.one_of(
    st.none(),
    hnp.arrays(np.float32, st.integers(0, 3000), elements=st.one_of(finite_or_not, huge)),
    hnp.arrays(np.int16, st.integers(0, 3000)),
    hnp.arrays(
        st.sampled_from(
            [np.float64, np.int32, np.uint8, np.bool_, np.complex64, np.float16, np.int64]
        ),
        st.integers(0, 50),
    ),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=20)),
    st.lists(st.binary(max_size=8), max_size=4).map(lambda b: np.array(b, dtype=object)),
    st.just(np.zeros(int(2.5 * RATE), np.float32)),  # over max_chunk_seconds
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)
param_keys = st.one_of(
    st.sampled_from(
        [
            "finalize",
            "keepalive",
            "decoding",
            "beam_size",
            "hotwords",
            "lm_path",
            "time_offset",
            "endpointing",
            "utterance_end",
            "rule3_min_utterance_length",
        ]
    ),
    st.text(max_size=10),
)
parameters = st.dictionaries(
    param_keys, st.one_of(json_scalars, st.lists(json_scalars, max_size=3)), max_size=4
)
feature_requests = st.builds(
    FeatureRequest,
    corrid=IDS,
    flags=st.one_of(
        st.sampled_from([0, FLAG_START, FLAG_END, FLAG_START | FLAG_END]),
        st.integers(-(2**31), 2**31),
    ),
    audio=audio_arrays,
    sample_rate=st.one_of(st.none(), st.just(RATE), st.integers(-(2**31), 2**31 - 1)),
    parameters=parameters,
)


def stream_snapshot(step: FeatureExtractorStep, corrid) -> tuple | None:
    if corrid not in step.store:
        return None
    s = step.store._items[corrid][1]
    f = s.features
    return (
        s.requests,
        f.features.samples_seen,
        f.features.buffered_samples,
        f.windows.next_start,
        f.windows.total_frames,
        f.windows._frames.tobytes(),
        f.features._buf.tobytes(),
    )


def check_result(step: FeatureExtractorStep, res) -> None:
    feats, info = res.features, res.info
    assert feats.dtype == np.float32 and feats.ndim == 3
    assert feats.shape[1:] == (C.window_frames, C.features.n_mels)
    assert np.all(np.isfinite(feats)), "features must be finite whatever the audio"
    assert info.windows == len(info.valid_outputs) <= step.max_windows
    assert len(feats) == max(info.windows, 1)
    assert all(0 <= v <= C.output_frames for v in info.valid_outputs)
    # what the decoder step will receive must parse back
    assert parse_step_info(info.to_json().encode()) == info


@FUZZ
@given(st.lists(feature_requests, min_size=1, max_size=8))
def test_feature_step_answers_or_refuses_and_never_disturbs_another_stream(reqs):
    step = new_feature_step()
    rng = np.random.default_rng(1)
    by_audio = [rng.uniform(-1, 1, 3000).astype(np.float32) for _ in range(2)]
    step.process(FeatureRequest(BYSTANDER, FLAG_START, by_audio[0], None, {}))
    reference = FeatureStream(C)
    reference.accept(by_audio[0])
    for r in reqs:
        ids = list(step.store.keys())
        before = {k: stream_snapshot(step, k) for k in ids}
        try:
            res = step.process(r)
        except StreamError as exc:
            assert str(exc), "an error must say what is wrong"
            # the refused request changed nothing (a START may have replaced nothing)
            assert {k: stream_snapshot(step, k) for k in ids} == before
            continue
        check_result(step, res)
    got = step.process(FeatureRequest(BYSTANDER, FLAG_END, by_audio[1], None, {}))
    want_a, want_b = reference.accept(by_audio[1]), reference.finish()
    np.testing.assert_array_equal(got.features, np.concatenate([want_a.features, want_b.features]))


REFUSED_PARAMETERS = [
    ({"finalize": "\udcff"}, "finalize"),
    ({"keepalive": b"\xff".decode("latin-1")}, "keepalive"),
    ({"decoding": ["greedy"]}, "decoding"),
    # per-stream resource limits: one client must not buy unbounded CPU or memory
    ({"decoding": "beam", "beam_size": 2**70}, "beam_size"),
    ({"decoding": "beam", "beam_size": "100000"}, "beam_size"),
    ({"beam_top_k": 10**6}, "beam_top_k"),
    ({"hotwords": "a" * 100_000}, "hotwords"),
    ({"rule3_min_utterance_length": 1e308}, "rule3_min_utterance_length"),
    ({"utterance_end": "1e9"}, "utterance_end"),
]


@pytest.mark.parametrize("params,name", REFUSED_PARAMETERS)
def test_feature_step_refuses_odd_or_unbounded_options_clearly(params, name):
    step = new_feature_step()
    with pytest.raises(StreamError, match=name):
        step.process(FeatureRequest(1, FLAG_START, np.zeros(160, np.float32), None, params))
    assert len(step.store) == 0
    # the same options smuggled to the decoder model directly are refused too
    if name not in ("finalize", "keepalive"):
        with pytest.raises((StreamError, ValueError)):
            info = parse_step_info(json.dumps(good_info_dict(options=params)).encode())
            CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30).process(
                DecoderRequest(np.zeros((1, 20, V), np.float32), info)
            )


# -- STEP_INFO (the decoder step's other input) ------------------------------------------
def good_info_dict(**kw) -> dict:
    d = json.loads(StepInfo(stream=5, seq=0, start=True, windows=1, valid_outputs=[3]).to_json())
    d.update(kw)
    return d


json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
step_info_raw = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda v: json.dumps(v).encode()),
    # a valid message with one field replaced by garbage
    st.tuples(st.sampled_from(sorted(good_info_dict())), json_values).map(
        lambda kv: json.dumps(good_info_dict(**{kv[0]: kv[1]})).encode()
    ),
    st.just(b"\xff\xfe{}"),
    st.just('{"stream": 1, "seq": 0}'.encode("utf-16")),
)


@FUZZ
@given(step_info_raw)
def test_step_info_garbage_is_refused_with_a_stream_error(raw):
    try:
        info = parse_step_info(raw)
    except StreamError as exc:
        assert "STEP_INFO" in str(exc)
        return
    assert isinstance(info.stream, int) and 0 < info.stream < 2**64
    assert info.windows == len(info.valid_outputs)


def log_probs_for(text: str, frames: int) -> np.ndarray:
    """[frames, V] log-probs spelling text ('_' = blank) once, then blanks."""
    lp = np.full((frames, V), -30.0, np.float32)
    lp[:, C.blank_id] = 0.0
    for t, ch in enumerate(text[:frames]):
        lp[t] = -30.0
        lp[t, C.blank_id if ch == "_" else C.vocabulary.index(ch)] = 0.0
    return lp


decoder_infos = st.builds(
    StepInfo,
    stream=IDS,
    seq=st.integers(0, 4),
    start=st.booleans(),
    end=st.booleans(),
    windows=st.integers(0, 3),
    valid_outputs=st.lists(st.integers(0, 40), max_size=3),
    finalize=st.booleans(),
    keepalive=st.booleans(),
    options=st.dictionaries(param_keys, json_scalars, max_size=2),
)
log_prob_arrays = st.one_of(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(0, 3), st.integers(0, 12), st.just(V)),
        elements=st.one_of(st.floats(-50, 0, width=32), st.just(-np.inf)),
    ),
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=finite_or_not
    ),
)


@FUZZ
@given(st.lists(st.tuples(decoder_infos, log_prob_arrays), min_size=1, max_size=8))
def test_decoder_step_answers_or_refuses_and_never_disturbs_another_stream(items):
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30, max_streams=16)
    word = log_probs_for("_h_i_ _t_h_e_r_e", 40)[None]
    msgs = step.process(
        DecoderRequest(word, StepInfo(BYSTANDER, 0, start=True, windows=1, valid_outputs=[40]))
    )
    for info, lp in items:
        raw = info.to_json().encode()
        try:
            parsed = parse_step_info(raw)  # what the adapter does first
            step.process(DecoderRequest(lp, parsed))
        except (StreamError, ValueError) as exc:  # both become a clear error response
            assert str(exc)
    msgs += step.process(
        DecoderRequest(np.zeros((0, 20, V), np.float32), StepInfo(BYSTANDER, 1, end=True))
    )
    finals = [
        m["channel"]["alternatives"][0]["transcript"]
        for m in msgs
        if m.get("type") == "Results" and m["is_final"]
    ]
    assert finals == ["hi there"]
    assert BYSTANDER not in step.store


# -- per-stream duration limit -----------------------------------------------------------
def test_max_stream_seconds_refuses_audio_beyond_the_limit_and_keeps_the_stream():
    step = new_feature_step(max_stream_seconds=1.0)
    step.process(FeatureRequest(7, FLAG_START, np.zeros(int(0.6 * RATE), np.float32), None, {}))
    before = stream_snapshot(step, 7)
    with pytest.raises(StreamError, match=r"max_stream_seconds \(1 s"):
        step.process(FeatureRequest(7, 0, np.zeros(int(0.6 * RATE), np.float32), None, {}))
    assert stream_snapshot(step, 7) == before
    res = step.process(FeatureRequest(7, FLAG_END, np.zeros(int(0.4 * RATE), np.float32), None, {}))
    assert res.info.end and 7 not in step.store
    with pytest.raises(StreamError, match="max_stream_seconds"):
        new_feature_step(max_stream_seconds=0.5).process(
            FeatureRequest(8, FLAG_START, np.zeros(int(0.6 * RATE), np.float32), None, {})
        )


def test_max_stream_seconds_comes_from_config_with_a_four_hour_default(tmp_path):
    from streamasr.tools.tiny_model import build_tiny_model

    (tmp_path / "acoustic_model" / "1").mkdir(parents=True)
    build_tiny_model(tmp_path / "acoustic_model" / "1" / "model.onnx")

    def cfg(**params):
        base = {
            "stream_idle_timeout_s": "30",
            "max_chunk_seconds": "10",
            "max_windows_per_request": "32",
            **params,
        }
        raw = {
            "name": "feature_extractor",
            "parameters": {k: {"string_value": v} for k, v in base.items()},
            "sequence_batching": {"max_sequence_idle_microseconds": "60000000"},
        }
        return ModelConfig(raw, tmp_path / "feature_extractor", "feature_extractor")

    assert build_step(cfg()).max_stream_seconds == DEFAULT_MAX_STREAM_SECONDS == 4 * 3600
    assert build_step(cfg(max_stream_seconds="90")).max_stream_seconds == 90
    with pytest.raises(ValueError, match="max_stream_seconds"):
        build_step(cfg(max_stream_seconds="forever"))


# -- hour-long streams: nothing grows without bound --------------------------------------
LONG_S = 3700  # a little over an hour of audio


def test_feature_stream_buffers_stay_bounded_over_an_hour():
    fs = FeatureStream(C)
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(RATE * 10) * 0.05).astype(np.float32)
    sizes, windows = [], 0
    for i in range(LONG_S // 10):
        out = fs.accept(noise[: RATE * 10 - 37 * (i % 5)])  # uneven cuts
        windows += out.count
        sizes.append((fs.features.buffered_samples, len(fs.windows._frames)))
    buf, frames = np.array(sizes).T
    assert buf.max() < C.features.n_fft + C.features.hop_length
    assert frames.max() < C.window_frames + C.chunk_frames
    assert fs.seconds_seen > 3600
    # every complete window was emitted: less than one window's frames held back
    assert windows * C.chunk_frames == fs.windows.next_start
    assert fs.windows.total_frames - windows * C.chunk_frames < C.window_frames


def decoder_state_size(d: StreamDecoder) -> int:
    """Tokens held for the open utterance, over every hypothesis the search keeps."""
    s = d.search
    tails = [h.node for h in s.beams] if hasattr(s, "beams") else [s.tail]
    return max(len(alignment(t)) for t in tails)


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("speech", ["with_pauses", "never_pauses"])
def test_decoder_state_stays_bounded_over_an_hour(decoding, speech):
    d = StreamDecoder(
        C,
        config=DecoderConfig(decoding=decoding, beam_size=4, beam_top_k=4),
        endpoint=EndpointConfig(),
    )
    fps = 1 / C.output_frame_seconds  # output frames per second
    if speech == "with_pauses":  # 4 s of words, 2 s of silence
        block = log_probs_for("_h_e_l_l_o_ _w_o_r_l_d_ " * 8, int(6 * fps))
    else:  # talks for an hour, no pause
        block = log_probs_for("_a_b" * int(6 * fps), int(6 * fps))
    sizes, n_msgs, finals = [], 0, 0
    for _ in range(int(LONG_S / 6)):
        msgs = d.accept(block)
        n_msgs += len(msgs)
        finals += sum(1 for m in msgs if m.get("is_final"))
        sizes.append(decoder_state_size(d))
    assert d.frames_decoded * C.output_frame_seconds > 3600
    # the open utterance is cut by an endpoint (rule 2) or by its length (rule 3, 20 s)
    limit = int(EndpointConfig().rule3_min_utterance_length * fps) + len(block)
    assert max(sizes) <= limit
    assert max(sizes[len(sizes) // 2 :]) <= max(sizes[: len(sizes) // 2]), "state grows"
    assert finals >= LONG_S / 25
    d.close()


def test_a_second_start_for_a_live_stream_is_refused_and_changes_nothing():
    step = new_feature_step()
    step.process(FeatureRequest(5, FLAG_START, np.ones(3000, np.float32) * 0.1, None, {}))
    before = stream_snapshot(step, 5)
    with pytest.raises(StreamError, match="already open"):
        step.process(FeatureRequest(5, FLAG_START, np.zeros(1600, np.float32), None, {}))
    assert stream_snapshot(step, 5) == before
    step.process(FeatureRequest(5, FLAG_END, None, None, {}))
    # once ended, the id may start again
    step.process(FeatureRequest(5, FLAG_START, np.zeros(1600, np.float32), None, {}))
