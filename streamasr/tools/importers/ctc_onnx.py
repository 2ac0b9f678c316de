"""A NeMo/icefall-style log-mel CTC model (ONNX) + tokens file -> contract ONNX.

The source model takes features ``[B, T, F]`` or ``[B, F, T]`` (``--layout``), with or
without a lengths input ``[B]`` (int32/int64), and returns logits or log-probs
``[B, T', V]`` with ``T' ~ T / subsampling``.  The wrapper graph (onnx.helper +
onnx.compose, the source graph untouched under the prefix ``src/``) is::

    features [B, left+chunk+right, F] -> (Transpose) -> source model <- lengths = W (constant)
      -> output [B, T', V] -> Slice frames [left/sub + offset, +chunk/sub) -> LogSoftmax
      -> log_probs [B, chunk/sub, V]

LogSoftmax is applied whether the source emits logits or log-probs (it is idempotent on
log-probs); an output that looks like probabilities is refused.

Alignment: output frame ``j`` of the source is taken to belong to feature frames
``[j*sub, (j+1)*sub)`` (true for convolutional subsampling with "same" padding, as NeMo's
and icefall's); ``--frame-offset N`` shifts the chunk's frames by N output frames for a
model whose frame ``j`` belongs to ``j + N``.

Features are this project's log-mel (:class:`streamasr.protocol.contract.FeatureSpec`, set with
the ``--n-mels`` ... ``--scale`` flags).  The model must have been trained on features
computed that way: NeMo's preprocessor (dither, pre-emphasis, natural-log mel,
per-feature normalisation over the utterance) and kaldi fbank are NOT reproduced.

tokens.txt: one ``token id`` per line (icefall / sherpa-onnx style), ids 0..N-1.  If it
has one token fewer than the model's classes, the blank is appended last (NeMo's
convention).  The blank is ``--blank-id``, else the token ``<blk>``/``<blank>``, else the
appended one.  Word boundary: "sentencepiece" if tokens start with "\u2581", else "space"
(the token " ", or the one named by ``--space-token``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamasr.cli import argument_parser
from streamasr.protocol.contract import FeatureSpec, ModelContract
from streamasr.tools.importers.common import (
    ImporterError,
    add_contract_arguments,
    contract_from_args,
    finish,
)

PREFIX = "src/"
BLANK_NAMES = ("<blk>", "<blank>")
SP = "\u2581"


def read_tokens(path: Path) -> list[str]:
    """tokens.txt (``token id`` per line) -> tokens by id."""
    by_id: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ImporterError(f"{path}:{n}: expected 'token id', got {line!r}")
        tok, i = parts[0], int(parts[1])
        if i in by_id:
            raise ImporterError(f"{path}:{n}: id {i} given twice")
        by_id[i] = tok
    if sorted(by_id) != list(range(len(by_id))):
        raise ImporterError(f"{path}: ids must be 0..{len(by_id) - 1} without gaps")
    return [by_id[i] for i in range(len(by_id))]


def vocabulary(
    tokens: list[str], classes: int, blank_id: int | None, space_token: str | None
) -> tuple[list[str], int, str]:
    """(vocabulary, blank id, word boundary) for a model with ``classes`` outputs."""
    vocab = list(tokens)
    if len(vocab) == classes - 1:
        vocab.append("<blank>" if "<blank>" not in vocab else "<blank_>")
        if blank_id is None:
            blank_id = classes - 1
    elif len(vocab) != classes:
        raise ImporterError(
            f"the tokens file has {len(tokens)} tokens, the model {classes} output classes"
        )
    if blank_id is None:
        named = [i for i, t in enumerate(vocab) if t in BLANK_NAMES]
        if not named:
            raise ImporterError("no <blk>/<blank> token: pass --blank-id")
        blank_id = named[0]
    if not 0 <= blank_id < classes:
        raise ImporterError(f"--blank-id {blank_id} is outside 0..{classes - 1}")
    if space_token is not None:
        if space_token not in vocab:
            raise ImporterError(f"--space-token {space_token!r} is not in the tokens file")
        vocab = [" " if t == space_token else t for t in vocab]
        return vocab, blank_id, "space"
    if any(t.startswith(SP) for t in vocab):
        return vocab, blank_id, "sentencepiece"
    if " " in vocab:
        return vocab, blank_id, "space"
    raise ImporterError(
        "cannot tell where words start: no token begins with '\u2581' and "
        "there is no ' ' token; name the word separator with --space-token"
    )


# -- the source model's interface ----------------------------------------------------
def _dims(vi) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        for d in vi.type.tensor_type.shape.dim
    ]


def source_io(model: onnx.ModelProto, a: argparse.Namespace):
    """(features input, lengths input or None, output) ValueInfos of the source."""
    inits = {i.name for i in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    floats = [i for i in ins if i.type.tensor_type.elem_type == TensorProto.FLOAT]
    ints = [
        i for i in ins if i.type.tensor_type.elem_type in (TensorProto.INT32, TensorProto.INT64)
    ]
    byname = {i.name: i for i in ins}

    def named_or_only(name: str | None, candidates: list):
        """The input called ``name`` if given, else the only candidate (None if not one)."""
        if name:
            if name not in byname:
                raise ImporterError(f"no input {name!r} (inputs: {list(byname)})")
            return byname[name]
        return candidates[0] if len(candidates) == 1 else None

    feat = named_or_only(a.input, floats)
    if feat is None:
        raise ImporterError(
            f"cannot tell the features input among {[i.name for i in floats]}; pass --input"
        )
    lengths = named_or_only(a.lengths, ints)
    others = [i.name for i in ins if i is not feat and i is not lengths]
    if others:
        raise ImporterError(
            f"inputs {others} are not supported (only features and lengths; "
            "cache-carrying streaming exports are not)"
        )
    if len(_dims(feat)) != 3:
        raise ImporterError(f"features input {feat.name!r} has shape {_dims(feat)}, not 3-D")
    if lengths is not None and len(_dims(lengths)) != 1:
        raise ImporterError(f"lengths input {lengths.name!r} has shape {_dims(lengths)}, not [B]")
    outs = {o.name: o for o in model.graph.output}
    if a.source_output:
        if a.source_output not in outs:
            raise ImporterError(f"no output {a.source_output!r} (outputs: {list(outs)})")
        out = outs[a.source_output]
    else:
        cands = [
            o
            for o in model.graph.output
            if o.type.tensor_type.elem_type == TensorProto.FLOAT and len(_dims(o)) == 3
        ]
        if len(cands) != 1:
            raise ImporterError(
                f"cannot tell the logits output among {list(outs)}; pass --source-output"
            )
        out = cands[0]
    return feat, lengths, out


def layout_of(feat, n_mels: int, layout: str) -> str:
    if layout != "auto":
        return layout
    d = _dims(feat)
    if d[2] == n_mels and d[1] != n_mels:
        return "btf"
    if d[1] == n_mels and d[2] != n_mels:
        return "bft"
    raise ImporterError(
        f"cannot tell the layout of {feat.name!r} {d} with n_mels {n_mels}; "
        "pass --layout btf or bft"
    )


def run_source(
    model: onnx.ModelProto, feat, lengths, out, layout: str, window: np.ndarray
) -> np.ndarray:
    """The source model's ``out`` for windows ``[B, W, F]`` (onnxruntime)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = window if layout == "btf" else window.transpose(0, 2, 1)
    feeds = {feat.name: np.ascontiguousarray(x, np.float32)}
    if lengths is not None:
        dt = np.int32 if lengths.type.tensor_type.elem_type == TensorProto.INT32 else np.int64
        feeds[lengths.name] = np.full(len(window), window.shape[1], dt)
    return sess.run([out.name], feeds)[0]


# -- the wrapper graph ---------------------------------------------------------------
def wrap(
    model: onnx.ModelProto, contract: ModelContract, feat, lengths, out, layout: str, first: int
) -> onnx.ModelProto:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ImporterError(
            f"the source uses opset {opset}; convert it to >= 11 first (onnx.version_converter)"
        )
    src = onnx.compose.add_prefix(model, PREFIX)
    W, F, count = contract.window_frames, contract.features.n_mels, contract.output_frames
    p = "streamasr/"
    ops = [helper.make_opsetid(o.domain, o.version) for o in model.opset_import]

    # pre: features -> source features (+ constant lengths)
    nodes = [
        helper.make_node("Transpose", [contract.input_name], [PREFIX + feat.name], perm=[0, 2, 1])
        if layout == "bft"
        else helper.make_node("Identity", [contract.input_name], [PREFIX + feat.name])
    ]
    inits = []
    pre_outputs = [
        helper.make_tensor_value_info(
            PREFIX + feat.name,
            TensorProto.FLOAT,
            ["batch", F, W] if layout == "bft" else ["batch", W, F],
        )
    ]
    io_map = [(PREFIX + feat.name, PREFIX + feat.name)]
    if lengths is not None:
        ltype = lengths.type.tensor_type.elem_type
        np_t = np.int32 if ltype == TensorProto.INT32 else np.int64
        inits += [
            numpy_helper.from_array(np.array(W, np_t), p + "window_frames"),
            numpy_helper.from_array(np.array([0], np.int64), p + "zero"),
            numpy_helper.from_array(np.array([1], np.int64), p + "one"),
        ]
        nodes += [
            helper.make_node("Shape", [contract.input_name], [p + "shape"]),
            helper.make_node("Slice", [p + "shape", p + "zero", p + "one"], [p + "batch"]),
            helper.make_node("Expand", [p + "window_frames", p + "batch"], [PREFIX + lengths.name]),
        ]
        pre_outputs.append(helper.make_tensor_value_info(PREFIX + lengths.name, ltype, ["batch"]))
        io_map.append((PREFIX + lengths.name, PREFIX + lengths.name))
    pre = helper.make_model(
        helper.make_graph(
            nodes,
            "streamasr_pre",
            [
                helper.make_tensor_value_info(
                    contract.input_name, TensorProto.FLOAT, ["batch", W, F]
                )
            ],
            pre_outputs,
            inits,
        ),
        opset_imports=ops,
        ir_version=model.ir_version,
    )

    # post: source output -> chunk frames -> log-probs
    V = len(contract.vocabulary)
    post = helper.make_model(
        helper.make_graph(
            [
                helper.make_node(
                    "Slice",
                    [PREFIX + out.name, p + "starts", p + "ends", p + "axes"],
                    [p + "chunk"],
                ),
                helper.make_node("LogSoftmax", [p + "chunk"], [contract.output_name], axis=-1),
            ],
            "streamasr_post",
            [
                helper.make_tensor_value_info(
                    PREFIX + out.name, TensorProto.FLOAT, ["batch", "frames", V]
                )
            ],
            [
                helper.make_tensor_value_info(
                    contract.output_name, TensorProto.FLOAT, ["batch", count, V]
                )
            ],
            [
                numpy_helper.from_array(np.array([first], np.int64), p + "starts"),
                numpy_helper.from_array(np.array([first + count], np.int64), p + "ends"),
                numpy_helper.from_array(np.array([1], np.int64), p + "axes"),
            ],
        ),
        opset_imports=ops,
        ir_version=model.ir_version,
    )

    m = onnx.compose.merge_models(pre, src, io_map=io_map)
    m = onnx.compose.merge_models(
        m, post, io_map=[(PREFIX + out.name, PREFIX + out.name)], outputs=[contract.output_name]
    )
    m.graph.name = "streamasr_" + (model.graph.name or "ctc")
    del m.metadata_props[:]
    return m


def main(argv: list[str] | None = None) -> int:
    d = FeatureSpec()
    p = argument_parser(
        "python -m streamasr.tools.importers ctc-onnx",
        __doc__,
        "Import a log-mel CTC ONNX model (NeMo/icefall style) + tokens file.",
    )
    p.add_argument("model", type=Path, help="the source ONNX")
    p.add_argument("--tokens", type=Path, required=True, help="tokens.txt: 'token id' per line")
    p.add_argument(
        "--subsampling",
        type=int,
        required=True,
        help="feature frames per output frame (NeMo Conformer/FastConformer: 4/8)",
    )
    p.add_argument(
        "--layout",
        choices=("auto", "btf", "bft"),
        default="auto",
        help="source features layout: [B,T,F] or [B,F,T] (auto: from n_mels)",
    )
    p.add_argument("--input", help="source features input name (auto: the float input)")
    p.add_argument("--lengths", help="source lengths input name (auto: the integer input)")
    p.add_argument(
        "--source-output", help="source logits/log-probs output name (auto: the 3-D float output)"
    )
    p.add_argument(
        "--frame-offset",
        type=int,
        default=0,
        help="output frames by which the source's frames lag (default 0)",
    )
    p.add_argument("--blank-id", type=int, default=None)
    p.add_argument(
        "--space-token",
        default=None,
        help="the token that separates words (becomes ' '), e.g. '|' or '<space>'",
    )
    f = p.add_argument_group("features (this project's log-mel; see the description)")
    f.add_argument("--sample-rate", type=int, default=d.sample_rate)
    f.add_argument("--n-fft", type=int, default=d.n_fft)
    f.add_argument("--hop-length", type=int, default=d.hop_length)
    f.add_argument("--n-mels", type=int, default=d.n_mels)
    f.add_argument("--fmin", type=float, default=d.fmin)
    f.add_argument("--fmax", type=float, default=d.fmax)
    f.add_argument("--log-floor", type=float, default=d.log_floor)
    f.add_argument("--offset", type=float, default=d.offset)
    f.add_argument("--scale", type=float, default=d.scale)
    # 64 frames of 10 ms: a 640 ms chunk with 640 ms left context and 160 ms look-ahead.
    add_contract_arguments(p, chunk=64, left=64, right=16)
    a = p.parse_args(argv)

    spec = FeatureSpec(
        type="log_mel",
        sample_rate=a.sample_rate,
        n_fft=a.n_fft,
        hop_length=a.hop_length,
        n_mels=a.n_mels,
        fmin=a.fmin,
        fmax=a.fmax,
        log_floor=a.log_floor,
        offset=a.offset,
        scale=a.scale,
    )
    if spec.problems():
        raise ImporterError("; ".join(spec.problems()))
    model = onnx.load(str(a.model))
    feat, lengths, out = source_io(model, a)
    layout = layout_of(feat, spec.n_mels, a.layout)
    tokens = read_tokens(a.tokens)
    # Geometry first with a provisional vocabulary: the model tells its class count.
    probe = contract_from_args(a, spec, a.subsampling, ["<blank>", " "], 0, "space", "probe")
    d_in = _dims(feat)
    if isinstance(d_in[0], int) and d_in[0] not in (0,):
        raise ImporterError(
            f"the source's batch dimension is fixed ({d_in[0]}); export it "
            "with a dynamic batch axis"
        )
    t_axis = 1 if layout == "btf" else 2
    if isinstance(d_in[t_axis], int) and d_in[t_axis] != probe.window_frames:
        raise ImporterError(
            f"the source takes exactly {d_in[t_axis]} frames; the window is "
            f"{probe.window_frames} (left + chunk + right)"
        )
    x = np.random.default_rng(0).normal(0, 0.5, (2, probe.window_frames, spec.n_mels))
    y = run_source(model, feat, lengths, out, layout, x.astype(np.float32))
    if y.ndim != 3 or y.shape[0] != 2:
        raise ImporterError(
            f"the source output {out.name!r} has shape {list(y.shape)} for a "
            "batch of 2 windows; expected [B, frames, classes]"
        )
    first = a.left_frames // a.subsampling + a.frame_offset
    if first < 0 or first + probe.output_frames > y.shape[1]:
        raise ImporterError(
            f"a window of {probe.window_frames} frames gives {y.shape[1]} output frames; the "
            f"chunk needs frames {first}..{first + probe.output_frames - 1} (check "
            "--subsampling, --frame-offset, and give more --right-frames)"
        )
    if np.all(y >= 0) and np.allclose(y.sum(-1), 1, atol=1e-3):
        raise ImporterError(f"{out.name!r} looks like probabilities; export logits or log-probs")
    vocab, blank, boundary = vocabulary(tokens, y.shape[2], a.blank_id, a.space_token)
    contract = contract_from_args(
        a, spec, a.subsampling, vocab, blank, boundary, default_name=a.model.stem
    )
    return finish(wrap(model, contract, feat, lengths, out, layout, first), contract, a)
