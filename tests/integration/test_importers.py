"""Bring your own model (streamasr.tools.importers): small random models built here are
imported, validated against the contract, compared with the original model window by
window, and served by a real tritonserver whose streamed results must equal a whole-file
decode of the ORIGINAL model's log-probs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamasr.core.decoding import decode_whole
from streamasr.core.features import FeatureStream, whole_file_windows
from streamasr.pipeline import ctc_decoder
from streamasr.pipeline.common import read_config
from streamasr.protocol.contract import FeatureSpec, ModelContract
from streamasr.tools.importers import main as import_main
from streamasr.tools.tiny_model import tiny_contract
from streamasr_client.stream import AsrConnection

from ..helpers import finals_with_words, start_server

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

RATE = 16000
W2V_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ'"]


def synthetic_audio(seconds: float = 7.0, seed: int = 3) -> np.ndarray:
    """Noise bursts, tones and silences (a random model only needs varied input);
    it starts with sound, so every window differs from its neighbours."""
    rng = np.random.default_rng(seed)
    out = []
    while sum(map(len, out)) < seconds * RATE:
        n = int(rng.uniform(0.2, 0.9) * RATE)
        kind = rng.integers(3) if out else 2
        t = np.arange(n) / RATE
        if kind == 0:
            seg = np.zeros(n)
        elif kind == 1:
            seg = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) * rng.uniform(0.2, 1, n)
        else:
            seg = rng.normal(0, rng.uniform(0.02, 0.3), n)
        out.append(seg)
    return np.concatenate(out)[: int(seconds * RATE)].astype(np.float32)


def valid_concat(lp: np.ndarray, windows) -> np.ndarray:
    return windows.stream_log_probs(lp)


def run_import(*args) -> int:
    return import_main([str(a) for a in args])


def validate_cli(path) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "streamasr.protocol.contract", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def served_equals_original(
    repo, contract: ModelContract, audio: np.ndarray, original_log_probs, tmp_path
) -> None:
    """One real tritonserver on ``repo``: the streamed and the offline results equal the
    whole-file decode of the original model's log-probs."""
    windows = whole_file_windows(contract, audio)
    lp = valid_concat(original_log_probs(windows.features), windows)
    dec, end = ctc_decoder.build_defaults(read_config(repo / "ctc_decoder")).configs({})
    want = finals_with_words(decode_whole(contract, lp, dec, end))
    assert any(words for _, words in want), "the reference decode has no words"
    server = start_server(repo, tmp_path / "tritonserver.log")
    try:
        conn = AsrConnection(server.grpc_url)
        try:
            assert conn.contract() == contract
            s = conn.open_session()
            piece = int(0.37 * contract.sample_rate)  # not a multiple of the chunk
            for i in range(0, len(audio), piece):
                s.send(audio[i : i + piece])
            s.close()
            s.wait(timeout=300)
            assert s.errors == []
            assert finals_with_words(s.messages) == want
            assert finals_with_words(conn.transcribe_file(audio)) == want
        finally:
            conn.close()
    except BaseException:
        print(server.log_tail(60))
        raise
    finally:
        server.stop()


# -- waveform features (contract + features.py) --------------------------------------
WAVE = FeatureSpec(type="waveform", n_fft=320, hop_length=320, n_mels=320)


def test_waveform_spec_needs_frames_of_hop_length_samples():
    assert WAVE.problems() == []
    bad = FeatureSpec(type="waveform", hop_length=320)  # n_fft 400, n_mels 80
    assert any("n_fft == n_mels == hop_length" in p for p in bad.problems())
    c = tiny_contract(features=WAVE, chunk_frames=10, left_frames=4, right_frames=2, subsampling=1)
    assert ModelContract.from_metadata(c.to_metadata()) == c


@pytest.mark.parametrize("seed", range(3))
def test_waveform_windows_are_the_samples_for_any_cut(seed):
    c = tiny_contract(features=WAVE, chunk_frames=10, left_frames=4, right_frames=2, subsampling=1)
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal(int(RATE * rng.uniform(0.05, 2))) * 0.1
    whole = whole_file_windows(c, audio)
    fs, parts, i = FeatureStream(c), [], 0
    while i < len(audio):
        n = int(rng.integers(0, 5000))
        parts.append(fs.accept(audio[i : i + n]))
        i += n
    parts.append(fs.finish())
    assert np.array_equal(np.concatenate([p.features for p in parts]), whole.features)
    # window k holds samples [(k*chunk - left)*hop, ...), zeros outside the recording
    hop = 320
    padded = np.concatenate(
        [
            np.zeros(c.left_frames * hop),
            audio,
            np.zeros((whole.count * c.chunk_frames + c.right_frames) * hop),
        ]
    )
    for k, w in enumerate(whole.features):
        start = k * c.chunk_frames * hop
        assert np.array_equal(
            w.reshape(-1), padded[start : start + c.window_frames * hop].astype(np.float32)
        )
    frames = -(-len(audio) // hop)
    assert whole.valid_outputs.sum() == frames


# -- wav2vec2 ------------------------------------------------------------------------
def tiny_wav2vec2(folder, seed=0, base_style=False):
    """A random Wav2Vec2ForCTC.  ``base_style``: wav2vec2-base's GroupNorm conv encoder
    and post-norm transformer, else the "large" layout (LayerNorm convs, pre-norm)."""
    transformers = pytest.importorskip("transformers")
    vocab_file = folder.parent / "vocab.json"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(W2V_VOCAB)}))
    tok = transformers.Wav2Vec2CTCTokenizer(
        str(vocab_file), word_delimiter_token="|", pad_token="<pad>"
    )
    # "layer" norm keeps the conv encoder local in time (the alignment test needs it).
    cfg = transformers.Wav2Vec2Config(
        vocab_size=len(W2V_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        pad_token_id=0,
        feat_extract_norm="group" if base_style else "layer",
        do_stable_layer_norm=not base_style,
    )
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(cfg).eval()
    with torch.no_grad():  # spread the logits: clear argmaxes, some blanks
        model.lm_head.weight.normal_(0, 0.6)
        model.lm_head.bias.zero_()
        model.lm_head.bias[0] = 3.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=False, sampling_rate=RATE).save_pretrained(
        folder
    )
    return model


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    d = tmp_path_factory.mktemp("w2v")
    model = tiny_wav2vec2(d / "source")
    out = d / "model.onnx"
    assert (
        run_import(
            "wav2vec2",
            d / "source",
            "-o",
            out,
            "--chunk-frames",
            25,
            "--left-frames",
            25,
            "--right-frames",
            2,
            "--name",
            "tiny-w2v",
            "--repository",
            d / "repo",
        )
        == 0
    )
    return model, out, ModelContract.from_onnx(out), d / "repo"


def test_wav2vec2_import_is_a_valid_contract_model(w2v):
    model, path, c, _ = w2v
    assert "OK: tiny-w2v" in validate_cli(path)
    assert c.features.type == "waveform" and c.features.hop_length == 320
    assert (c.chunk_frames, c.left_frames, c.right_frames, c.subsampling) == (25, 25, 2, 1)
    assert c.vocabulary[4] == " " and c.vocabulary[5] == "A" and c.blank_id == 0
    assert c.word_boundary == "space" and len(c.vocabulary) == model.config.vocab_size


def test_wav2vec2_onnx_gives_the_original_log_probs(w2v):
    from streamasr.tools.importers.wav2vec2 import reference_log_probs

    model, path, c, _ = w2v
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    windows = whole_file_windows(c, synthetic_audio(3.0)).features  # real windows
    got = sess.run([c.output_name], {c.input_name: windows})[0]
    want = reference_log_probs(model, windows, c)
    assert got.shape == (len(windows), 25, len(c.vocabulary))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # independently of the wrapper's slicing: HF's own forward on the window's samples
    with torch.no_grad():
        logits = model(torch.from_numpy(windows[:1].reshape(1, -1))).logits
    np.testing.assert_allclose(got[0], torch.log_softmax(logits[0, 25:50], -1).numpy(), atol=1e-4)


def assert_conv_frames_align(model, c: ModelContract) -> None:
    """The alignment: the conv encoder's frames picked for each chunk equal the frames the
    whole recording gives at the chunk's position (the encoder is local in time)."""
    from streamasr.tools.importers.wav2vec2 import chunk_output_range

    audio = synthetic_audio(3.0, seed=5)
    windows = whole_file_windows(c, audio)
    first, count = chunk_output_range(model.config, c)
    enc = model.wav2vec2.feature_extractor
    with torch.no_grad():
        whole = enc(torch.from_numpy(audio[None]))[0].T.numpy()  # [frames, C]
        per_window = enc(torch.from_numpy(windows.features.reshape(windows.count, -1)))
    chunks = per_window.transpose(1, 2).numpy()[:, first : first + count]
    stream = valid_concat(chunks, windows)
    n = len(whole)  # frames whose receptive field lies inside the audio
    assert n > 100 and len(stream) >= n
    np.testing.assert_allclose(stream[:n], whole, atol=1e-4)


def test_wav2vec2_chunk_frames_are_the_recordings_frames(w2v):
    model, _, c, _ = w2v
    assert_conv_frames_align(model, c)


def test_wav2vec2_with_subsampling_2_frames_of_10_ms(w2v, tmp_path):
    from streamasr.tools.importers.wav2vec2 import reference_log_probs

    model, path, _, _ = w2v
    out = tmp_path / "sub2.onnx"
    assert (
        run_import(
            "wav2vec2",
            path.parent / "source",
            "-o",
            out,
            "--subsampling",
            2,
            "--chunk-frames",
            20,
            "--left-frames",
            10,
            "--right-frames",
            2,
        )
        == 0
    )
    c = ModelContract.from_onnx(out)
    assert (c.features.hop_length, c.subsampling, c.output_frames) == (160, 2, 10)
    windows = whole_file_windows(c, synthetic_audio(2.0)).features
    got = ort.InferenceSession(str(out)).run(None, {"features": windows})[0]
    np.testing.assert_allclose(got, reference_log_probs(model, windows, c), atol=1e-4)
    assert_conv_frames_align(model, c)


def test_wav2vec2_window_normalisation_and_look_ahead_check(w2v, tmp_path):
    from dataclasses import replace

    from streamasr.tools.importers.wav2vec2 import chunk_output_range, reference_log_probs

    model, path, _, _ = w2v
    out = tmp_path / "norm.onnx"
    assert (
        run_import(
            "wav2vec2",
            path.parent / "source",
            "-o",
            out,
            "--normalize",
            "window",
            "--chunk-frames",
            10,
            "--left-frames",
            6,
            "--right-frames",
            1,
        )
        == 0
    )
    c = ModelContract.from_onnx(out)
    assert c.extra["normalize"] == "window"
    x = np.random.default_rng(2).standard_normal((3, c.window_frames, 320)) * 0.05 + 0.01
    x = x.astype(np.float32)
    got = ort.InferenceSession(str(out)).run(None, {"features": x})[0]
    np.testing.assert_allclose(got, reference_log_probs(model, x, c, normalize=True), atol=1e-4)
    assert not np.allclose(got, reference_log_probs(model, x, c), atol=1e-3)
    with pytest.raises(ValueError, match="right_frames must be >= 1"):
        chunk_output_range(model.config, replace(c, right_frames=0))


def test_wav2vec2_base_style_model_imports_with_the_same_log_probs(tmp_path):
    from streamasr.tools.importers.wav2vec2 import reference_log_probs

    model = tiny_wav2vec2(tmp_path / "source", seed=4, base_style=True)
    out = tmp_path / "base.onnx"
    assert (
        run_import(
            "wav2vec2",
            tmp_path / "source",
            "-o",
            out,
            "--chunk-frames",
            10,
            "--left-frames",
            10,
            "--right-frames",
            1,
        )
        == 0
    )
    c = ModelContract.from_onnx(out)
    windows = whole_file_windows(c, synthetic_audio(1.5, seed=2)).features
    got = ort.InferenceSession(str(out)).run(None, {"features": windows})[0]
    np.testing.assert_allclose(got, reference_log_probs(model, windows, c), atol=1e-4)


def test_wav2vec2_served_by_triton_equals_the_original(w2v, tmp_path):
    from streamasr.tools.importers.wav2vec2 import reference_log_probs

    model, _, c, repo = w2v
    served_equals_original(
        repo, c, synthetic_audio(), lambda feats: reference_log_probs(model, feats, c), tmp_path
    )


# -- ctc-onnx (NeMo / icefall style) ---------------------------------------------------
class TinyConvCtc(torch.nn.Module):
    """Two stride-2 'same' convolutions (subsampling 4) and a linear layer: frame j
    belongs to input frames [4j, 4j+4) and sees frames 4j-6 .. 4j+6."""

    def __init__(
        self,
        layout: str,
        with_lengths: bool,
        log_softmax: bool,
        classes: int,
        F: int = 80,
        H: int = 32,
    ):
        super().__init__()
        self.layout, self.with_lengths, self.log_softmax = layout, with_lengths, log_softmax
        self.c1 = torch.nn.Conv1d(F, H, 5, stride=2, padding=2)
        self.c2 = torch.nn.Conv1d(H, H, 5, stride=2, padding=2)
        self.lin = torch.nn.Linear(H, classes)
        with torch.no_grad():
            self.lin.weight.mul_(6.0)

    def forward(self, x, length=None):
        if self.layout == "btf":
            x = x.transpose(1, 2)
        y = self.lin(torch.relu(self.c2(torch.relu(self.c1(x)))).transpose(1, 2))
        if self.log_softmax:
            y = torch.log_softmax(y, -1)
        if self.with_lengths:
            return y, (length + 3) // 4
        return y

    def run(self, feats_btf: np.ndarray) -> np.ndarray:
        """Original model on [B, T, F] features -> its raw output [B, T/4, V]."""
        x = torch.from_numpy(np.ascontiguousarray(feats_btf, np.float32))
        if self.layout == "bft":
            x = x.transpose(1, 2)
        with torch.no_grad():
            y = self(x, torch.full((len(x),), x.shape[-1 if self.layout == "bft" else 1]))
        return (y[0] if self.with_lengths else y).numpy()


CTC_VARIANTS = {
    # NeMo-like: [B, F, T] + lengths, logits, tokens without the blank (appended last)
    "nemo": dict(
        layout="bft",
        with_lengths=True,
        log_softmax=False,
        tokens=["<unk>", "\u2581the", "\u2581a", "s", "t", *[f"\u2581w{i}" for i in range(20)]],
        classes=26,
        blank=25,
    ),
    # icefall-like: [B, T, F], no lengths, log-probs, "<blk>" first
    "icefall": dict(
        layout="btf",
        with_lengths=False,
        log_softmax=True,
        tokens=["<blk>", "<sos/eos>", "\u2581he", "llo", "\u2581x", "y"],
        classes=6,
        blank=0,
    ),
}
CHUNK, LEFT, RIGHT, SUB = 32, 16, 8, 4


def build_ctc_source(d, name):
    v = CTC_VARIANTS[name]
    torch.manual_seed(1)
    m = TinyConvCtc(v["layout"], v["with_lengths"], v["log_softmax"], v["classes"]).eval()
    T = 100
    x = torch.zeros(1, 80, T) if v["layout"] == "bft" else torch.zeros(1, T, 80)
    t_axis = 2 if v["layout"] == "bft" else 1
    names_in = ["audio_signal", "length"] if v["with_lengths"] else ["x"]
    names_out = ["logits", "encoded_lengths"] if v["with_lengths"] else ["log_probs"]
    axes = {names_in[0]: {0: "B", t_axis: "T"}, names_out[0]: {0: "B", 1: "T4"}}
    if v["with_lengths"]:
        axes.update({"length": {0: "B"}, "encoded_lengths": {0: "B"}})
    args = (x, torch.tensor([T])) if v["with_lengths"] else (x,)
    path = d / f"{name}.onnx"
    torch.onnx.export(
        m,
        args,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names_in,
        output_names=names_out,
        dynamic_axes=axes,
    )
    tokens = d / f"{name}-tokens.txt"
    tokens.write_text("".join(f"{t} {i}\n" for i, t in enumerate(v["tokens"])), encoding="utf-8")
    return m, path, tokens


def import_ctc(d, name):
    m, path, tokens = build_ctc_source(d, name)
    out = d / "model.onnx"
    assert (
        run_import(
            "ctc-onnx",
            path,
            "--tokens",
            tokens,
            "--subsampling",
            SUB,
            "--chunk-frames",
            CHUNK,
            "--left-frames",
            LEFT,
            "--right-frames",
            RIGHT,
            "-o",
            out,
            "--repository",
            d / "repo",
        )
        == 0
    )
    return name, m, out, ModelContract.from_onnx(out), d / "repo"


@pytest.fixture(scope="module", params=sorted(CTC_VARIANTS))
def ctc(request, tmp_path_factory):
    return import_ctc(tmp_path_factory.mktemp(f"ctc-{request.param}"), request.param)


def original_chunk_log_probs(m: TinyConvCtc, feats: np.ndarray) -> np.ndarray:
    y = torch.from_numpy(m.run(feats)[:, LEFT // SUB : LEFT // SUB + CHUNK // SUB])
    return torch.log_softmax(y, -1).numpy()


def test_ctc_onnx_import_is_a_valid_contract_model(ctc):
    name, _, path, c, _ = ctc
    v = CTC_VARIANTS[name]
    assert "OK:" in validate_cli(path)
    assert c.features == FeatureSpec()
    assert (c.chunk_frames, c.left_frames, c.right_frames, c.subsampling) == (
        CHUNK,
        LEFT,
        RIGHT,
        SUB,
    )
    assert len(c.vocabulary) == v["classes"] and c.blank_id == v["blank"]
    assert c.vocabulary[: len(v["tokens"])] == tuple(v["tokens"])
    assert c.word_boundary == "sentencepiece"


def test_ctc_onnx_gives_the_original_log_probs(ctc):
    _, m, path, c, _ = ctc
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feats = whole_file_windows(c, synthetic_audio(2.0)).features
    for batch in (feats[:1], feats):  # dynamic batch
        got = sess.run([c.output_name], {c.input_name: batch})[0]
        assert got.shape == (len(batch), CHUNK // SUB, len(c.vocabulary))
        np.testing.assert_allclose(got, original_chunk_log_probs(m, batch), atol=1e-4)


def test_ctc_onnx_stream_equals_the_original_on_the_whole_recording(ctc):
    """Alignment: with enough context, the windowed frames are the whole recording's
    frames (where the receptive field, 4j-6 .. 4j+6, lies inside the recording)."""
    _, m, path, c, _ = ctc
    audio = synthetic_audio(3.0, seed=9)
    windows = whole_file_windows(c, audio)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stream = valid_concat(sess.run(None, {c.input_name: windows.features})[0], windows)
    fs = FeatureStream(c)
    feats = np.concatenate([fs.features.accept(audio), fs.features.flush()])
    whole = torch.log_softmax(torch.from_numpy(m.run(feats[None])[0]), -1).numpy()
    assert len(stream) == len(whole)
    inner = slice(2, (len(feats) - 7) // 4 + 1)
    np.testing.assert_allclose(stream[inner], whole[inner], atol=1e-4)


def test_ctc_onnx_import_refuses_what_it_cannot_serve(ctc, tmp_path, capsys):
    name, _, _, _, _ = ctc
    d = tmp_path
    _, path, tokens = build_ctc_source(d, name)
    bad_tokens = d / "bad.txt"
    bad_tokens.write_text("a 0\nb 1\n")
    common = ["--subsampling", SUB, "-o", d / "x.onnx"]
    assert run_import("ctc-onnx", path, "--tokens", bad_tokens, *common) == 1
    assert "the tokens file has 2 tokens" in capsys.readouterr().err
    # a wrong subsampling leaves the chunk without output frames: caught at import time
    assert (
        run_import(
            "ctc-onnx",
            path,
            "--tokens",
            tokens,
            "--subsampling",
            2,
            "--chunk-frames",
            CHUNK,
            "--left-frames",
            LEFT,
            "--right-frames",
            RIGHT,
            "-o",
            d / "y.onnx",
        )
        == 1
    )
    assert "output frames" in capsys.readouterr().err
    assert not (d / "x.onnx").exists() and not (d / "y.onnx").exists()


def test_importer_runs_as_a_module(ctc, tmp_path):
    name, _, _, _, _ = ctc
    _, path, tokens = build_ctc_source(tmp_path, name)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamasr.tools.importers",
            "ctc-onnx",
            str(path),
            "--tokens",
            str(tokens),
            "--subsampling",
            str(SUB),
            "-o",
            str(tmp_path / "cli.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "acoustic_model/config.pbtxt needs" in r.stdout
    assert "dims: 144 dims: 80" in r.stdout  # default window: 64 left + 64 + 16 right
    validate_cli(tmp_path / "cli.onnx")
    r = subprocess.run(
        [sys.executable, "-m", "streamasr.tools.importers"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "wav2vec2" in r.stderr


def test_ctc_onnx_served_by_triton_equals_the_original(tmp_path):
    """One server start, for the NeMo-like variant ([B,F,T] + lengths, logits); the
    icefall-like one shares the wrapper and is checked in process above."""
    _, m, _, c, repo = import_ctc(tmp_path, "nemo")
    served_equals_original(
        repo, c, synthetic_audio(), lambda feats: original_chunk_log_probs(m, feats), tmp_path
    )


@pytest.mark.parametrize("kind", ["wav2vec2", "ctc-onnx"])
def test_every_importer_option_is_documented(kind, capsys):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "byo-model.md").read_text()
    with pytest.raises(SystemExit):
        import_main([kind, "--help"])
    flags = {w.strip(",[]") for w in capsys.readouterr().out.split() if w.startswith("--")}
    flags = {f.split("=")[0] for f in flags} - {"--help"}
    assert flags, "no options parsed from --help"
    missing = sorted(f for f in flags if f"`{f}`" not in doc)
    assert missing == [], f"docs/byo-model.md does not document {missing}"
