"""Streaming features and windows equal the whole-file ones, however the audio is cut."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr.core.features import (
    FeatureStream,
    StreamingFeatures,
    mel_filterbank,
    whole_file_windows,
)
from streamasr.core.state import StreamError, StreamStore
from streamasr.protocol.contract import ContractError, FeatureSpec, ModelContract
from streamasr.tools.tiny_model import tiny_contract


def test_features_equal_a_direct_stft_log_mel():
    torch = pytest.importorskip("torch")
    spec = FeatureSpec()
    a = np.random.default_rng(0).standard_normal(16000) * 0.1
    st = torch.stft(
        torch.tensor(a),
        spec.n_fft,
        spec.hop_length,
        window=torch.hann_window(spec.n_fft, dtype=torch.float64),
        center=False,
        return_complex=True,
    )
    mel = torch.tensor(mel_filterbank(16000, 400, 80, 0.0, 8000.0)) @ (st.abs() ** 2)
    ref = (
        (torch.clamp(torch.log10(torch.clamp(mel, min=1e-10)), min=spec.log_floor) + spec.offset)
        / spec.scale
    ).T.numpy()
    got = StreamingFeatures(spec).accept(a)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_windows_are_identical_for_any_cut(seed):
    c = tiny_contract()
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal(int(16000 * rng.uniform(0.01, 3))) * 0.1
    whole = whole_file_windows(c, audio)
    fs, parts, i = FeatureStream(c), [], 0
    while i < len(audio):
        n = int(rng.integers(0, 6000))
        parts.append(fs.accept(audio[i : i + n]))
        i += n
    parts.append(fs.finish())
    got = np.concatenate([p.features for p in parts])
    assert np.array_equal(got, whole.features)
    assert np.array_equal(np.concatenate([p.valid_outputs for p in parts]), whole.valid_outputs)
    # every real frame is covered once: output frames = ceil(frames / subsampling)
    frames = -(-len(audio) // c.features.hop_length)
    assert whole.valid_outputs.sum() == -(-frames // c.subsampling) or frames == 0


def test_contract_round_trips_and_names_bad_fields():
    c = tiny_contract()
    assert ModelContract.from_metadata(c.to_metadata()) == c
    assert ModelContract.from_json(c.to_json()) == c
    meta = c.to_metadata()
    meta["streamasr.chunk_frames"] = "seven"
    meta["streamasr.blank_id"] = "99"
    with pytest.raises(ContractError) as e:
        ModelContract.from_metadata(meta)
    assert "chunk_frames must be an integer" in str(e.value)
    assert "blank_id 99 is outside the vocabulary" in str(e.value)
    with pytest.raises(ContractError, match="no streamasr"):
        ModelContract.from_metadata({})


def test_store_sweeps_idle_streams_and_says_expired():
    now = [0.0]
    store = StreamStore(1.0, clock=lambda: now[0])
    store.create(1, "a")
    store.create(2, "b")
    now[0] = 0.6
    store.get(1)
    now[0] = 1.3
    assert store.sweep() == [(2, "b")] and len(store) == 1
    with pytest.raises(StreamError, match="expired"):
        store.get(2)
    with pytest.raises(StreamError, match="START"):
        store.get(3)
