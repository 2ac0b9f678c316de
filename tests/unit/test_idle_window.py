"""Idle windows (streamasr.artifacts.idle_window): a request that completes no model window
costs the acoustic model nothing when its contract declares ``idle_window``, and exactly
what it did before (a window of silence) when it does not."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from streamasr.artifacts.idle_window import IDLE_WINDOW_VALUE, add_idle_window
from streamasr.core.features import silence_frame
from streamasr.pipeline.common import FLAG_START
from streamasr.pipeline.feature_extractor import FeatureExtractorStep, FeatureRequest
from streamasr.protocol.contract import ContractError, ModelContract
from streamasr.tools.tiny_model import build_tiny_model, tiny_contract

C = tiny_contract()


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("idle") / "model.onnx"
    build_tiny_model(path, C)
    plain = onnx.load(str(path))
    wrapped = add_idle_window(onnx.load(str(path)), (C.output_frames, len(C.vocabulary)))
    return session(plain), session(wrapped), wrapped


def windows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.5, 1.5, (n, C.window_frames, C.features.n_mels)).astype(np.float32)


def idle(n: int) -> np.ndarray:
    return np.full((n, C.window_frames, C.features.n_mels), IDLE_WINDOW_VALUE, np.float32)


def run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run([C.output_name], {C.input_name: x})[0]


def test_real_windows_are_computed_exactly_as_before(models):
    plain, wrapped, _ = models
    x = windows(3)
    np.testing.assert_array_equal(run(wrapped, x), run(plain, x))


def test_an_idle_batch_gets_zeros_of_the_output_shape(models):
    _, wrapped, _ = models
    out = run(wrapped, idle(4))
    assert out.shape == (4, C.output_frames, len(C.vocabulary))
    assert not out.any()


def test_a_mixed_batch_computes_every_row(models):
    """A batch with one real window runs the model: the real rows are what they would be
    alone (the idle rows are computed too, and discarded by the server)."""
    plain, wrapped, _ = models
    x = windows(2)
    mixed = np.concatenate([x[:1], idle(1), x[1:]])
    out = run(wrapped, mixed)
    np.testing.assert_array_equal(out[[0, 2]], run(plain, x))


def test_a_window_partly_idle_is_real(models):
    plain, wrapped, _ = models
    x = idle(1)
    x[0, 3, 5] = 0.25
    np.testing.assert_array_equal(run(wrapped, x), run(plain, x))


def test_wrapping_keeps_io_and_refuses_to_wrap_twice(models):
    _, _, model = models
    assert [i.name for i in model.graph.input] == [C.input_name]
    assert [o.name for o in model.graph.output] == [C.output_name]
    with pytest.raises(ValueError, match="already"):
        add_idle_window(model, (C.output_frames, len(C.vocabulary)))


def test_the_contract_carries_the_value_in_metadata_not_to_clients():
    c = dataclasses.replace(C, idle_window=IDLE_WINDOW_VALUE)
    meta = c.to_metadata()
    assert ModelContract.from_metadata(meta).idle_window == IDLE_WINDOW_VALUE
    assert ModelContract.from_metadata(C.to_metadata()).idle_window is None
    assert "idle_window" not in json.loads(c.to_json())
    # a client reading a newer server's contract skips keys it does not know
    newer = dict(json.loads(C.to_json()), some_future_field=1)
    assert ModelContract.from_json(json.dumps(newer)) == C


@pytest.mark.parametrize("bad", ["nan", "inf", "minus one"])
def test_a_bad_idle_window_value_is_named(bad):
    meta = dict(C.to_metadata(), **{"streamasr.idle_window": bad})
    with pytest.raises(ContractError, match="idle_window"):
        ModelContract.from_metadata(meta)


@pytest.mark.parametrize("declared", [True, False])
def test_the_feature_step_sends_the_declared_idle_window_else_silence(declared):
    contract = dataclasses.replace(C, idle_window=IDLE_WINDOW_VALUE) if declared else C
    step = FeatureExtractorStep(
        contract, idle_timeout_s=30, max_chunk_seconds=2.0, max_windows_per_request=32
    )
    short = np.zeros(160, np.float32)  # 10 ms: completes no window
    res = step.process(FeatureRequest(1, FLAG_START, short, None, {}))
    assert res.info.windows == 0
    assert res.features.shape == (1, C.window_frames, C.features.n_mels)
    expected = IDLE_WINDOW_VALUE if declared else silence_frame(C.features)
    np.testing.assert_array_equal(res.features, np.broadcast_to(expected, res.features.shape))
