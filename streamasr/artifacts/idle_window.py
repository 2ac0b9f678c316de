"""Teach an acoustic model's ONNX graph to answer idle windows without computing.

A request that completes no model window still sends the acoustic model one window
(Triton cannot send a batch of zero).  With 100 ms client chunks three requests in four
are such; each cost a full encoder pass (~16 ms of a core for Whisper tiny's 1.5 s
window), so small chunks cost 3-12x the CPU of 400 ms ones
(benchmarks/results/finals/README.md).  :func:`add_idle_window` wraps a contract model's
graph in an ``If``: a batch whose every value is ``IDLE_WINDOW_VALUE`` gets zeros of the
output's shape; any other batch runs the original graph unchanged (its rows that are idle
windows are computed and discarded).  The value is declared in the contract
(``streamasr.idle_window``), so the feature step sends it only to a model that skips it,
and a model without the key keeps getting windows of silence.  Works in any runtime that
runs ONNX ``If`` (onnxruntime CPU and CUDA, Triton's native onnxruntime backend).
"""

from __future__ import annotations

import numpy as np

#: The idle-window fill: far outside any feature's range (normalised log-mel is within
#: about [-1.5, 3], waveforms within [-1, 1]) and exact in float16 and float32.
IDLE_WINDOW_VALUE = -10000.0


def has_idle_window(model) -> bool:
    """Whether ``model``'s graph was made by :func:`add_idle_window`."""
    return any(n.op_type == "If" and n.name == "idle_window" for n in model.graph.node)


def add_idle_window(model, out_dims: tuple[int, int], value: float = IDLE_WINDOW_VALUE):
    """The ``onnx.ModelProto`` ``model`` (one input [B, W, F], one output [B, T, V],
    ``out_dims`` = (T, V) from its contract) with its graph moved into the ``else`` branch of an ``If`` whose
    ``then`` branch returns zeros for an all-``value`` batch; metadata and opsets are kept."""
    import onnx
    from onnx import TensorProto, helper

    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise ValueError("add_idle_window takes a graph with one input and one output")
    (inp,), (out,) = g.input, g.output
    dims = [int(d) for d in out_dims]
    if len(dims) != 2 or min(dims) <= 0:
        raise ValueError(f"out_dims must be two positive sizes (T, V), got {dims}")
    if has_idle_window(model):
        raise ValueError("the graph already answers idle windows")

    computed = out.name + "_computed"
    body = list(g.node)
    for node in body:
        node.output[:] = [computed if o == out.name else o for o in node.output]
    branch_out = helper.make_tensor_value_info(computed, TensorProto.FLOAT, ["batch", *dims])
    # the weights move into the branch: onnxruntime folds constants within a subgraph
    # only from the subgraph's own initializers (from the outer scope: ~10 % slower)
    else_branch = helper.make_graph(
        body, "computed", [], [branch_out], initializer=list(g.initializer)
    )
    del g.initializer[:]

    zeros = out.name + "_idle"
    then_branch = helper.make_graph(
        [
            # Shape + Slice, not Shape(start, end): that needs opset 15, imports may be older
            helper.make_node("Shape", [inp.name], ["idle_in_shape"]),
            helper.make_node("Slice", ["idle_in_shape", "idle_zero", "idle_one"], ["idle_batch"]),
            helper.make_node("Concat", ["idle_batch", "idle_out_dims"], ["idle_out_shape"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                ["idle_out_shape"],
                [zeros],
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
            ),
        ],
        "idle",
        [],
        [helper.make_tensor_value_info(zeros, TensorProto.FLOAT, ["batch", *dims])],
    )

    test = [
        helper.make_node("Equal", [inp.name, "idle_value"], ["idle_equal"]),
        helper.make_node("Cast", ["idle_equal"], ["idle_equal_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMin", ["idle_equal_f"], ["idle_all_f"], keepdims=0),
        helper.make_node("Cast", ["idle_all_f"], ["idle_all"], to=TensorProto.BOOL),
        helper.make_node(
            "If",
            ["idle_all"],
            [out.name],
            name="idle_window",
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]
    del g.node[:]
    g.node.extend(test)
    g.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(value, np.float32), "idle_value"),
            onnx.numpy_helper.from_array(np.array(dims, np.int64), "idle_out_dims"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "idle_zero"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "idle_one"),
        ]
    )
    # shape inference of the old body's intermediates no longer applies at top level
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model
