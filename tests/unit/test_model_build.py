"""The model build: our CTranslate2 reader and torch Whisper against the reference
CTranslate2 runtime, on real speech."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from streamasr.artifacts import ct2, whisper
from streamasr.core.features import silence_frame
from streamasr.protocol.contract import FeatureSpec

CLIP = (
    Path(__file__).resolve().parents[2]
    / "assets"
    / "eval"
    / "librivox-sense_and_sensibility_01_austen_64kb-0870.wav"
)
REFERENCE = (
    "and mister john dashwood had then leisure to consider how much there might be "
    "prudently in his power to do for them"
)
ENCODER_TOLERANCE = 1e-3  # max |ours - reference| on outputs of magnitude ~10


def _norm(text: str) -> list[str]:
    text = text.lower().replace("mr.", "mister")
    return re.sub(r"[^a-z' ]+", " ", text).split()


@pytest.fixture(scope="module")
def model():
    return ct2.load(ct2.packaged_whisper_dir())


@pytest.fixture(scope="module")
def clip_features():
    audio, sr = sf.read(CLIP, dtype="float32")
    assert sr == 16000
    f = whisper.log_mel(audio)
    pad = np.tile(silence_frame(FeatureSpec()), (3000 - len(f), 1))
    return np.concatenate([f, pad]).astype(np.float32)


def test_ct2_reader_header_and_aliases(model):
    assert model.binary_version == 6
    assert model.spec_name == "WhisperSpec" and model.revision == 3
    assert len(model.variables) == 148
    assert model["encoder/conv1/weight"].shape == (384, 80, 3)
    assert model["encoder/conv1/weight"].dtype == np.float16
    # the output projection is stored once, as an alias of the token embedding
    assert model.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert model["decoder/projection/weight"] is model["decoder/embeddings/weight"]
    assert model.scalar("encoder/num_heads") == 6


def test_ct2_reader_rejects_truncated_and_unknown(tmp_path):
    data = (ct2.packaged_whisper_dir() / "model.bin").read_bytes()
    with pytest.raises(ct2.CT2FormatError, match="truncated"):
        ct2.parse(data[:1000])
    with pytest.raises(ct2.CT2FormatError, match="binary version"):
        ct2.parse(struct.pack("<I", 99) + data[4:])
    with pytest.raises(ct2.CT2FormatError, match="trailing"):
        ct2.parse(data + b"\0")


def test_encoder_matches_ctranslate2(model, clip_features):
    ctranslate2 = pytest.importorskip("ctranslate2")
    ref = ctranslate2.models.Whisper(
        str(ct2.packaged_whisper_dir()), device="cpu", compute_type="float32", intra_threads=1
    )
    x = np.ascontiguousarray(clip_features.T[None])
    expected = np.array(ref.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))
    enc = whisper.encoder_from_ct2(model)
    with torch.no_grad():
        got = enc(torch.from_numpy(clip_features)[None]).numpy()
    assert got.shape == expected.shape == (1, 1500, 384)
    err = np.abs(got - expected).max()
    assert err < ENCODER_TOLERANCE, f"max abs error {err}"


def test_greedy_decoding_gives_the_reference_words(clip_features):
    w = whisper.Whisper()
    ids = w.greedy(torch.from_numpy(clip_features)[None])
    text = w.tokens.decode(ids)
    assert _norm(text) == REFERENCE.split(), text


def test_onnx_encoder_and_kv_cache_decoder(tmp_path, clip_features):
    """The exported graphs: encoder matches CTranslate2, cached greedy decoding gives the
    same tokens as the torch model (and so the reference words)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from streamasr.artifacts import export_whisper
    from streamasr.core.whisper_redecoder import WhisperRedecoder

    export_whisper.export(tmp_path)
    ow = WhisperRedecoder(tmp_path)
    ref = ctranslate2.models.Whisper(
        str(ct2.packaged_whisper_dir()), device="cpu", compute_type="float32", intra_threads=1
    )
    x = np.ascontiguousarray(clip_features.T[None])
    expected = np.array(ref.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))
    got = ow.enc.run(["encoder_out"], {"mel": clip_features[None]})[0]
    assert np.abs(got - expected).max() < ENCODER_TOLERANCE
    ids = ow.greedy(clip_features)
    assert _norm(ow.tokens.decode(ids)) == REFERENCE.split()
    # a cached step equals recomputing the whole prefix
    _, ck, cv = ow.enc.run(None, {"mel": clip_features[None]})
    L, _, h, _, dh = ck.shape
    empty = np.zeros((L, 1, h, 0, dh), np.float32)
    prefix = np.array([[whisper.SOT, whisper.NO_TIMESTAMPS] + ids[:3]], np.int64)
    full, _, _ = ow.dec.run(
        None, {"tokens": prefix, "cross_k": ck, "cross_v": cv, "past_k": empty, "past_v": empty}
    )
    _, pk, pv = ow.dec.run(
        None,
        {"tokens": prefix[:, :-1], "cross_k": ck, "cross_v": cv, "past_k": empty, "past_v": empty},
    )
    step, _, _ = ow.dec.run(
        None, {"tokens": prefix[:, -1:], "cross_k": ck, "cross_v": cv, "past_k": pk, "past_v": pv}
    )
    assert np.abs(full - step).max() < 1e-3
    # the runtime entry point: the utterance's features, padded inside
    audio, _ = sf.read(CLIP, dtype="float32")
    text = ow.transcribe(whisper.log_mel(audio), silence_frame(FeatureSpec()))
    assert _norm(text) == REFERENCE.split()
