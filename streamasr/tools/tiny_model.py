"""A tiny random acoustic model that satisfies the contract (tests and smoke runs).

It reads the chunk frames of each window, stacks ``subsampling`` frames, and maps them
linearly to the vocabulary.  Its transcripts are noise; what it exercises is the path:
windows, batching, decoding, parity.  Built with onnx.helper, so no torch is needed.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamasr.protocol.contract import FeatureSpec, ModelContract

CHAR_VOCABULARY = ("<blank>", " ", *string.ascii_lowercase, "'")


def tiny_contract(**overrides) -> ModelContract:
    fields: dict[str, Any] = dict(
        features=FeatureSpec(),
        chunk_frames=40,
        left_frames=20,
        right_frames=10,
        subsampling=2,
        vocabulary=CHAR_VOCABULARY,
        blank_id=0,
        word_boundary="space",
        name="tiny-random",
        version="1",
        license="MIT",
        description="random weights, for tests only",
    )
    fields.update(overrides)
    return ModelContract(**fields)


def build_tiny_model(
    path: str | Path, contract: ModelContract | None = None, seed: int = 0
) -> ModelContract:
    c = (contract or tiny_contract()).validate()
    F, V, sub = c.features.n_mels, len(c.vocabulary), c.subsampling
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((sub * F, V)).astype(np.float32) * 0.5
    b = rng.standard_normal(V).astype(np.float32)
    b[c.blank_id] += 2.0  # mostly blank, as a CTC model is
    nodes = [
        helper.make_node("Slice", ["features", "starts", "ends", "axes"], ["chunk"]),
        helper.make_node("Reshape", ["chunk", "shape"], ["stacked"]),
        helper.make_node("MatMul", ["stacked", "w"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], [c.output_name], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.array([c.left_frames], np.int64), "starts"),
        numpy_helper.from_array(np.array([c.left_frames + c.chunk_frames], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([0, c.output_frames, sub * F], np.int64), "shape"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_acoustic_model",
        [
            helper.make_tensor_value_info(
                c.input_name, TensorProto.FLOAT, ["batch", c.window_frames, F]
            )
        ],
        [
            helper.make_tensor_value_info(
                c.output_name, TensorProto.FLOAT, ["batch", c.output_frames, V]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in c.to_metadata().items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return c
