"""The streaming acoustic model: frozen Whisper encoder on each window + a small CTC head.

Each window ``[left | chunk | right]`` of ``contract.window_frames`` feature frames goes
through the Whisper encoder on its own (positional encodings from index 0 of the window).
The head sees the encoder frames from ``head_left`` output frames before the chunk to the
end of the window (the look-ahead), and emits character CTC log-probabilities for the
chunk's output frames only.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from streamasr.protocol.contract import FeatureSpec, ModelContract

from .whisper import WhisperEncoder

log = logging.getLogger(__name__)

#: The bundled CTC head (package data, 6 MB): `make model` / `streamasr-artifacts` export
#: it on the packaged Whisper encoder; `python -m training.build_model --retrain` replaces it.
HEAD_FILE = Path(__file__).resolve().parent / "head.npz"
#: The Asterisk prompts' licence (training/asterisk.py reads them).
ASTERISK_LICENSE = "CC-BY-SA-3.0 (Asterisk core sounds, Allison Smith / Digium)"
#: max |onnx - torch| of log-probs accepted for an exported graph.
PARITY_TOLERANCE = 1e-3

VOCABULARY: tuple[str, ...] = ("<blank>", " ", *string.ascii_lowercase, "'")
CHAR_TO_ID = {c: i for i, c in enumerate(VOCABULARY) if i > 0}


def default_contract(**overrides: Any) -> ModelContract:
    kw: dict[str, Any] = dict(
        features=FeatureSpec(),
        chunk_frames=40,
        left_frames=100,
        right_frames=10,
        subsampling=2,
        vocabulary=VOCABULARY,
        blank_id=0,
        word_boundary="space",
        name="whisper-tiny-en-ctc",
        version="1",
        license="MIT",
        description="Frozen Whisper tiny.en encoder (MIT) on 1.5 s windows + "
        "character CTC head trained on synthetic speech",
    )
    kw.update(overrides)
    return ModelContract(**kw).validate()


def normalise_text(text: str) -> str:
    """Lower-case, keep a-z and apostrophes, single spaces: the CTC target alphabet."""
    text = text.lower().replace("\u2019", "'")
    out = [c if c in CHAR_TO_ID else " " for c in text]
    return " ".join("".join(out).split())


def encode_text(text: str) -> list[int]:
    return [CHAR_TO_ID[c] for c in normalise_text(text)]


@dataclass(frozen=True)
class HeadConfig:
    d_in: int = 384
    d: int = 256
    heads: int = 4
    layers: int = 2
    ff: int = 1024
    head_left: int = 10  # encoder frames before the chunk the head looks at
    dropout: float = 0.1
    vocab: int = len(VOCABULARY)


class HeadLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.h = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (
            p.view(b, t, self.h, d // self.h).transpose(1, 2)
            for p in self.qkv(self.ln1(x)).chunk(3, dim=-1)
        )
        att = ((q @ k.transpose(-1, -2)) * (d // self.h) ** -0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.ln2(x))))))


class CTCHead(nn.Module):
    """Encoder frames [B, n, d_in] (from head_left before the chunk to the window end) ->
    log-probs [B, chunk_out, V] for the chunk frames."""

    def __init__(self, cfg: HeadConfig, chunk_out: int):
        super().__init__()
        self.cfg, self.chunk_out = cfg, chunk_out
        self.inp = nn.Sequential(nn.LayerNorm(cfg.d_in), nn.Linear(cfg.d_in, cfg.d))
        self.pos = nn.Parameter(torch.zeros(1, 512, cfg.d))
        self.layers = nn.ModuleList(
            HeadLayer(cfg.d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln = nn.LayerNorm(cfg.d)
        self.proj = nn.Linear(cfg.d, cfg.vocab)

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        x = self.inp(enc) + self.pos[:, : enc.shape[1]]
        for layer in self.layers:
            x = layer(x)
        x = x[:, self.cfg.head_left : self.cfg.head_left + self.chunk_out]
        return F.log_softmax(self.proj(self.ln(x)), dim=-1)


def head_slice(contract: ModelContract, cfg: HeadConfig) -> slice:
    """Which encoder output frames of a window the head reads."""
    start = contract.left_frames // contract.subsampling - cfg.head_left
    if start < 0:
        raise ValueError("head_left exceeds the window's left context")
    return slice(start, None)


class AcousticModel(nn.Module):
    """features [B, W, n_mels] -> log_probs [B, chunk/sub, V]: the exported graph."""

    def __init__(self, encoder: WhisperEncoder, head: CTCHead, contract: ModelContract):
        super().__init__()
        if contract.subsampling != 2:
            raise ValueError("the Whisper encoder subsamples by exactly 2")
        self.encoder, self.head, self.contract = encoder, head, contract
        self.sl = head_slice(contract, head.cfg)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        enc = self.encoder(features)
        return self.head(enc[:, self.sl])


def export_onnx(
    model: AcousticModel, path: str | Path, opset: int = 17, idle_window: bool = True
) -> Path:
    """One ONNX graph (encoder + head), dynamic batch, contract in metadata_props; with
    ``idle_window`` the graph answers idle windows without computing
    (:mod:`streamasr.artifacts.idle_window`) and the contract says so."""
    import dataclasses

    import onnx

    from .idle_window import IDLE_WINDOW_VALUE, add_idle_window

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = model.contract
    model = model.eval()
    dummy = torch.zeros(1, c.window_frames, c.features.n_mels)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[c.input_name],
            output_names=[c.output_name],
            dynamic_axes={c.input_name: {0: "batch"}, c.output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(str(tmp))
    if idle_window:
        m = add_idle_window(m, (c.output_frames, len(c.vocabulary)), IDLE_WINDOW_VALUE)
        c = dataclasses.replace(c, idle_window=IDLE_WINDOW_VALUE)
    del m.metadata_props[:]
    for k, v in c.to_metadata().items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    tmp.unlink()
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def save_head(head: CTCHead, path: str | Path, **info) -> None:
    """Head weights as fp32 .npz (small, committed) with its config."""
    import json
    from dataclasses import asdict

    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in head.state_dict().items()}
    arrays["__config__"] = np.frombuffer(
        json.dumps({"head": asdict(head.cfg), "chunk_out": head.chunk_out, **info}).encode(),
        np.uint8,
    )
    np.savez_compressed(path, **arrays)


def load_head(path: str | Path) -> tuple[CTCHead, dict]:
    import json

    z = np.load(path)
    meta = json.loads(bytes(z["__config__"]).decode())
    head = CTCHead(HeadConfig(**meta["head"]), meta["chunk_out"])
    head.load_state_dict({k: torch.from_numpy(z[k]) for k in z.files if k != "__config__"})
    return head.eval(), meta


def describe(meta: dict) -> ModelContract:
    """The contract for a head, its description saying what data the head saw."""
    contract = default_contract()
    hours = meta.get("train", {}).get("hours", {})
    if "piper" in hours or "real_pseudo_labelled" in hours:
        contract = default_contract(
            description=contract.description.replace(
                "synthetic speech",
                "synthetic speech (espeak-ng, flite, Piper) + Whisper-pseudo-labelled real speech",
            )
        )
    if any(k.startswith("real:asterisk/") for k in hours):
        # The prompts' licence follows a head trained on them.
        contract = default_contract(
            description=contract.description + " + the Asterisk prompts (real, transcribed)",
            license=f"MIT (Whisper tiny.en encoder); CTC head trained on {ASTERISK_LICENSE}",
        )
    if "real_speech" in meta:
        contract = default_contract(
            description=contract.description + f"; real-speech WER "
            f"{100 * meta['real_speech']['wer']:.1f}% on {meta['real_speech']['words']} words "
            "(pocketsphinx test clips, greedy CTC)"
        )
    return contract


def build_onnx(
    out: str | Path, head: CTCHead | None = None, meta: dict | None = None
) -> "AcousticModel":
    """Export the packaged Whisper encoder + ``head`` (default: the bundled one) to ``out``
    and check what was written: the contract from its metadata, the graph's I/O against
    it, and ONNX against torch on a fixed input.  Returns the torch model."""
    import onnxruntime as ort

    from streamasr.protocol.contract import check_onnx_io

    from . import ct2, whisper

    if head is None:
        head, meta = load_head(HEAD_FILE)
    weights = ct2.load(ct2.packaged_whisper_dir())
    encoder = whisper.encoder_from_ct2(weights)
    model = AcousticModel(encoder, head, describe(meta or {})).eval()
    export_onnx(model, out)
    c = ModelContract.from_onnx(out)
    problems = check_onnx_io(out, c)
    if problems:
        raise RuntimeError("exported model breaks the contract: " + "; ".join(problems))
    # Log-mel-like input (the features' floor is -1.5 after Whisper's scaling): fixed seed.
    feats = np.random.default_rng(0).uniform(-1.5, 1.5, (2, c.window_frames, c.features.n_mels))
    feats = feats.astype(np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run([c.output_name], {c.input_name: feats})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(feats)).numpy()
    err = float(np.abs(got - ref).max())
    if err > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX differs from torch by {err} (> {PARITY_TOLERANCE})")
    log.info("checked %s: contract, I/O, ONNX vs torch max |diff| %.2g", out, err)
    return model
