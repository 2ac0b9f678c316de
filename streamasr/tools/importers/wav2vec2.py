"""Hugging Face ``Wav2Vec2ForCTC``-style models (raw waveform in) -> contract ONNX.

The contract's features are ``type="waveform"``: a feature frame is ``hop_length`` raw
samples, so a window ``[B, W, hop]`` is ``W*hop`` consecutive samples.  The exported graph
is ``WindowModel`` below: flatten the window to a waveform, (optionally) normalise it,
run the model, keep the chunk's output frames, ``log_softmax``.

Alignment.  The convolutional feature encoder (kernels k_i, strides s_i, no padding) has
total stride ``S = prod(s_i)`` (320 for wav2vec2) and receptive field
``R = k_1 + sum_{i>1} (k_i - 1) * s_1*...*s_{i-1}`` (400); its output frame ``j`` sees
samples ``[j*S, j*S + R)`` of its input.  With ``subsampling = S / hop_length`` (1 by
default: ``hop_length = S``), the chunk starts at sample ``left*hop = (left/sub)*S`` of the
window, so the chunk's output frames are model frames ``left/sub ... left/sub + chunk/sub
- 1``.  The last one reaches ``R - S`` samples past the chunk, so ``right_frames`` must
cover at least ``ceil((R - S) / hop)`` frames (1 for wav2vec2; checked).  In the whole
recording the same frame is frame ``chunk_start/sub``: a stream's output frame ``k`` is
the model's frame ``k`` of the recording, computed with the window's context instead of
the whole file's.  Word times put frame ``k`` at ``k*S`` samples; its receptive field's
centre is ``(R - S)/2`` samples later (2.5 ms at 16 kHz for wav2vec2).

Not reproduced: Hugging Face's per-utterance ``do_normalize`` (zero mean, unit variance
over the whole recording) cannot be done on a stream; ``--normalize window`` applies it
to each window instead (the default when the model's feature extractor has
``do_normalize``), ``--normalize none`` feeds raw samples.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np

from streamasr.protocol.contract import FeatureSpec, ModelContract
from streamasr.tools.importers.common import (
    ImporterError,
    add_contract_arguments,
    contract_from_args,
    finish,
)

NORM_EPS = 1e-7  # as Hugging Face's zero_mean_unit_var_norm


def conv_geometry(config) -> tuple[int, int]:
    """(total stride S, receptive field R) in samples of the conv feature encoder."""
    kernels, strides = list(config.conv_kernel), list(config.conv_stride)
    if len(kernels) != len(strides) or not kernels:
        raise ImporterError("config.conv_kernel and config.conv_stride disagree")
    if getattr(config, "add_adapter", False):
        raise ImporterError(
            "models with add_adapter=True (extra strided adapter layers) are not supported"
        )
    stride, field = 1, 1
    for k, s in zip(kernels, strides):
        field += (k - 1) * stride
        stride *= s
    return stride, field


def model_frames(config, samples: int) -> int:
    """Output frames of the conv encoder for ``samples`` input samples (no padding)."""
    n = samples
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1
    return n


def chunk_output_range(config, contract: ModelContract) -> tuple[int, int]:
    """(first model frame of the chunk, number of them) in a window's model output."""
    stride, field = conv_geometry(config)
    hop, sub = contract.features.hop_length, contract.subsampling
    if hop * sub != stride:
        raise ImporterError(
            f"hop_length {hop} x subsampling {sub} must equal the model's conv stride {stride}"
        )
    first, count = contract.left_frames // sub, contract.chunk_frames // sub
    have = model_frames(config, contract.window_frames * hop)
    if first + count > have:
        need = math.ceil((field - stride) / hop)
        raise ImporterError(
            f"the window's last chunk frame needs {field - stride} samples of "
            f"look-ahead: right_frames must be >= {need}"
        )
    return first, count


def waveform_spec(stride: int, subsampling: int, sample_rate: int) -> FeatureSpec:
    if stride % subsampling:
        raise ImporterError(f"subsampling {subsampling} must divide the conv stride {stride}")
    hop = stride // subsampling
    return FeatureSpec(
        type="waveform", sample_rate=sample_rate, n_fft=hop, hop_length=hop, n_mels=hop
    )


def vocabulary_from_tokenizer(
    vocab: dict[str, int],
    size: int,
    word_delimiter: str | None,
) -> list[str]:
    """Index -> token for ``size`` classes; the word delimiter ("|") becomes " "; ids the
    tokenizer does not name become "<unused_i>"."""
    out = [f"<unused_{i}>" for i in range(size)]
    for tok, i in vocab.items():
        if not 0 <= i < size:
            raise ImporterError(
                f"tokenizer id {i} ({tok!r}) is outside the model's {size} output classes"
            )
        out[i] = " " if tok == word_delimiter else tok
    if word_delimiter is None or word_delimiter not in vocab:
        raise ImporterError(
            f"the tokenizer has no word delimiter token ({word_delimiter!r}); "
            "the contract needs one to split words"
        )
    if out.count(" ") != 1:
        raise ImporterError('the tokenizer has a " " token besides its word delimiter')
    return out


def window_model(model, first: int, count: int, normalize: bool):
    import torch

    class WindowModel(torch.nn.Module):
        """[B, W, hop] waveform frames -> [B, count, V] log-probs of the chunk."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, features):
            wav = features.flatten(1)
            if normalize:
                mean = wav.mean(dim=1, keepdim=True)
                var = ((wav - mean) ** 2).mean(dim=1, keepdim=True)
                wav = (wav - mean) / torch.sqrt(var + NORM_EPS)
            logits = self.model(wav, return_dict=False)[0]
            return torch.log_softmax(logits[:, first : first + count].float(), dim=-1)

    return WindowModel().eval()


def export(model, contract: ModelContract, normalize: bool):
    """The contract ONNX (a ModelProto) for a loaded CTC model."""
    import onnx
    import torch

    first, count = chunk_output_range(model.config, contract)
    wrapper = window_model(model, first, count, normalize)
    dummy = torch.zeros(2, contract.window_frames, contract.features.n_mels)
    with tempfile.TemporaryDirectory() as d, torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs
        # onnxscript (not installed); it still exports this graph exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        tmp = Path(d) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=17,
            input_names=[contract.input_name],
            output_names=[contract.output_name],
            dynamic_axes={contract.input_name: {0: "batch"}, contract.output_name: {0: "batch"}},
        )
        return onnx.load(str(tmp))


def load(source: str):
    """(model, vocab dict, word delimiter, pad/blank id, do_normalize, sample rate)."""
    import transformers

    model = transformers.AutoModelForCTC.from_pretrained(source, attn_implementation="eager")
    model = model.float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(source)
    normalize, rate = False, 16000
    try:
        fe = transformers.AutoFeatureExtractor.from_pretrained(source)
        normalize = bool(getattr(fe, "do_normalize", False))
        rate = int(getattr(fe, "sampling_rate", rate))
    except (OSError, ValueError):
        print(f"note: no feature extractor config in {source}: 16 kHz, no normalisation")
    blank = model.config.pad_token_id
    if blank is None:
        blank = tok.pad_token_id
    elif tok.pad_token_id is not None and tok.pad_token_id != blank:
        raise ImporterError(f"config.pad_token_id {blank} != tokenizer pad id {tok.pad_token_id}")
    delimiter = getattr(tok, "word_delimiter_token", None)
    return model, tok.get_vocab(), delimiter, blank, normalize, rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m streamasr.tools.importers wav2vec2",
        description="Import a Hugging Face Wav2Vec2ForCTC-style model (a local folder "
        "with config, weights, tokenizer files; or a hub id when online).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="folder or hub id for from_pretrained")
    p.add_argument(
        "--subsampling",
        type=int,
        default=1,
        help="output frames per feature frame: hop_length = conv stride / this",
    )
    p.add_argument(
        "--normalize",
        choices=("auto", "none", "window"),
        default="auto",
        help="window: zero-mean/unit-variance per window (auto: if the model's "
        "feature extractor has do_normalize)",
    )
    # 25 frames of 20 ms = a 500 ms chunk, 1 s of left context, 100 ms look-ahead.
    add_contract_arguments(p, chunk=25, left=50, right=5)
    a = p.parse_args(argv)
    model, vocab, delimiter, blank, do_norm, rate = load(a.source)
    stride, _ = conv_geometry(model.config)
    spec = waveform_spec(stride, a.subsampling, rate)
    vocabulary = vocabulary_from_tokenizer(vocab, model.config.vocab_size, delimiter)
    normalize = do_norm if a.normalize == "auto" else a.normalize == "window"
    contract = contract_from_args(
        a,
        spec,
        a.subsampling,
        vocabulary,
        blank,
        "space",
        default_name=Path(a.source.rstrip("/")).name or "wav2vec2",
    )
    if normalize:
        contract = _with_extra(contract, normalize="window")
    onnx_model = export(model, contract, normalize)
    return finish(onnx_model, contract, a)


def _with_extra(c: ModelContract, **extra) -> ModelContract:
    from dataclasses import replace

    return replace(c, extra={**c.extra, **extra})


def reference_log_probs(
    model, windows: np.ndarray, contract: ModelContract, normalize: bool = False
) -> np.ndarray:
    """The original torch model on windows ``[N, W, hop]`` -> ``[N, chunk/sub, V]``
    log-probs, computed without the wrapper (for tests and checks)."""
    import torch

    first, count = chunk_output_range(model.config, contract)
    wav = torch.from_numpy(np.asarray(windows, np.float32).reshape(len(windows), -1))
    if normalize:
        wav = torch.stack(
            [(w - w.mean()) / torch.sqrt(w.var(unbiased=False) + NORM_EPS) for w in wav]
        )
    with torch.no_grad():
        logits = model(wav).logits
    return torch.log_softmax(logits[:, first : first + count], dim=-1).numpy()
