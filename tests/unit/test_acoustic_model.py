"""The streaming acoustic model: frozen Whisper encoder + CTC head as one ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamasr.artifacts import acoustic, ct2, whisper
from streamasr.artifacts.idle_window import IDLE_WINDOW_VALUE
from streamasr.protocol.contract import ModelContract, check_onnx_io


def test_vocabulary_and_text_normalisation():
    assert acoustic.VOCABULARY[0] == "<blank>" and " " in acoustic.VOCABULARY
    assert len(acoustic.VOCABULARY) == 29
    assert acoustic.normalise_text("Mr. Dashwood's  HOUSE, 1811!") == "mr dashwood's house"
    ids = acoustic.encode_text("a b'")
    assert [acoustic.VOCABULARY[i] for i in ids] == ["a", " ", "b", "'"]


def test_head_reads_only_the_window_tail():
    c = acoustic.default_contract()
    sl = acoustic.head_slice(c, acoustic.HeadConfig(head_left=10))
    assert sl.start == c.left_frames // c.subsampling - 10
    with pytest.raises(ValueError):
        acoustic.head_slice(c, acoustic.HeadConfig(head_left=c.left_frames))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    c = acoustic.default_contract()
    enc = whisper.encoder_from_ct2(ct2.load(ct2.packaged_whisper_dir()))
    model = acoustic.AcousticModel(
        enc, acoustic.CTCHead(acoustic.HeadConfig(), c.output_frames), c
    ).eval()
    path = acoustic.export_onnx(model, tmp_path_factory.mktemp("am") / "model.onnx")
    return model, path


def test_export_carries_the_contract(exported):
    model, path = exported
    c = ModelContract.from_onnx(path)
    # the exported graph answers idle windows without computing, and says so
    assert c == model.contract and c.idle_window == IDLE_WINDOW_VALUE
    assert check_onnx_io(path, c) == []


def test_onnx_matches_torch_for_any_batch(exported):
    import onnxruntime as ort

    model, path = exported
    c = model.contract
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for b in (1, 3):
        x = rng.normal(-0.5, 0.4, (b, c.window_frames, c.features.n_mels)).astype(np.float32)
        got = sess.run(["log_probs"], {"features": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (b, c.output_frames, len(c.vocabulary))
        assert np.abs(got - want).max() < 1e-3
        assert np.allclose(np.exp(got).sum(-1), 1, atol=1e-4)  # log-probabilities


def test_head_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    head = acoustic.CTCHead(acoustic.HeadConfig(layers=1, d=64, ff=128), 20).eval()
    acoustic.save_head(head, tmp_path / "h.npz", note="x")
    back, meta = acoustic.load_head(tmp_path / "h.npz")
    assert meta["note"] == "x"
    x = torch.randn(2, 35, 384)
    with torch.no_grad():
        assert torch.allclose(head(x), back(x))


def test_bundled_model_transcribes_real_speech():
    """The committed model.onnx, streaming windows + greedy CTC, on real speech it never
    saw. Bounds sit a little above the recorded numbers (training/README.md): a broken
    export, wrong windows or an untrained head land far outside them."""
    from pathlib import Path

    import onnxruntime as ort

    from training import train_ctc

    path = Path(__file__).resolve().parents[2] / "model_repository/acoustic_model/1/model.onnx"
    clips = train_ctc.real_speech_set()
    assert len(clips) >= 10
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = ModelContract.from_session(sess)
    res = train_ctc.evaluate(lambda f: sess.run(None, {c.input_name: f})[0], c, clips)
    assert res["cer"] < 0.35 and res["wer"] < 0.80, res
