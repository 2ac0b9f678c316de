"""The streaming encoder (issue 26): chunk-by-chunk serving equals the parallel training
graph, chunk frames never depend on later chunks, and positions wrap as documented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamasr.artifacts import whisper
from training import streaming_encoder as se

D, HEADS, LAYERS, HIDDEN, N_MELS = 32, 4, 2, 64, 8


def small_encoder(seed: int = 0, n_pos: int = 64) -> whisper.WhisperEncoder:
    """A randomly initialised encoder of Whisper's architecture, small enough to be quick."""
    torch.manual_seed(seed)
    enc = whisper.WhisperEncoder(N_MELS, D, HEADS, LAYERS, HIDDEN, n_pos)
    enc.pos.normal_()
    return enc.eval()


CFG = se.StreamConfig(chunk=4, left_chunks=2, lookahead=2, right_features=6, period=40)


def feats(chunks: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2 * CFG.chunk * chunks + CFG.right_features, N_MELS, generator=g)


def test_step_by_step_equals_parallel_graph():
    model = se.StreamingEncoder(small_encoder(), CFG)
    x = feats(chunks=15)  # 60 frames > period 40: crosses a position wrap
    with torch.no_grad():
        main_p, look_p = model.forward_parallel(x)
        main_s, look_s = model.stream(x)
    assert main_p.shape == (2, 15 * CFG.chunk, D)
    assert look_p.shape == (2, 15, CFG.lookahead, D)
    np.testing.assert_allclose(main_s.numpy(), main_p.numpy(), atol=1e-5)
    np.testing.assert_allclose(look_s.numpy(), look_p.numpy(), atol=1e-5)


def test_chunk_frames_do_not_see_the_future_beyond_the_conv_look_ahead():
    model = se.StreamingEncoder(small_encoder(), CFG)
    x = feats(chunks=6)
    y = x.clone()
    # change everything from 2 feature frames after chunk 2's end onwards
    y[:, 2 * CFG.chunk * 3 + 2 :] += 5.0
    with torch.no_grad():
        a, _ = model.forward_parallel(x)
        b, _ = model.forward_parallel(y)
    upto = 3 * CFG.chunk
    np.testing.assert_allclose(a[:, :upto].numpy(), b[:, :upto].numpy(), atol=1e-6)
    assert not np.allclose(a[:, upto:].numpy(), b[:, upto:].numpy(), atol=1e-3)


def test_left_context_is_capped():
    model = se.StreamingEncoder(small_encoder(), CFG)
    x = feats(chunks=8)
    y = x.clone()
    y[:, : 2 * CFG.chunk] += 5.0  # chunk 0 (and the conv edge of chunk 1)
    with torch.no_grad():
        a, _ = model.forward_parallel(x)
        b, _ = model.forward_parallel(y)
    # chunk 0's keys reach chunk left_chunks at layer 1 and chunk 2*left_chunks at layer 2
    first_free = (CFG.left_chunks * LAYERS + 2) * CFG.chunk
    np.testing.assert_allclose(a[:, first_free:].numpy(), b[:, first_free:].numpy(), atol=1e-6)


def test_phase_only_shifts_positions_modulo_the_period():
    model = se.StreamingEncoder(small_encoder(), CFG)
    x = feats(chunks=3)
    with torch.no_grad():
        a, _ = model.forward_parallel(x, phase=5)
        b, _ = model.forward_parallel(x, phase=5 + CFG.period)
        c, _ = model.forward_parallel(x, phase=0)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert not np.allclose(a.numpy(), c.numpy(), atol=1e-3)


def test_bad_lengths_and_configs_are_refused():
    model = se.StreamingEncoder(small_encoder(), CFG)
    with pytest.raises(ValueError, match="whole chunks"):
        model.forward_parallel(torch.zeros(1, 2 * CFG.chunk + 1, N_MELS))
    with pytest.raises(ValueError, match="right feature"):
        se.StreamConfig(lookahead=5, right_features=10).check()
    with pytest.raises(ValueError, match="period"):
        se.StreamingEncoder(small_encoder(n_pos=10), CFG)


def test_cost_per_emitted_frame():
    assert se.frames_per_emitted(se.StreamConfig()) == pytest.approx(1.2)


def test_wrap_chunks_marks_the_chunks_that_see_a_wrap():
    cfg = se.StreamConfig(chunk=4, left_chunks=2, lookahead=2, right_features=6, period=40)
    w = se.wrap_chunks(cfg, phase=30, n_chunks=8)
    # positions 30.. : chunk 2 covers 38..43+2 -> wraps; chunks up to 2 + left_chunks see it
    assert w.tolist() == [False, False, True, True, True, False, False, False]


def test_streams_at_different_positions_share_a_batch():
    model = se.StreamingEncoder(small_encoder(), CFG)
    W = 2 * CFG.chunk + CFG.right_features
    x = feats(chunks=6)
    with torch.no_grad():
        # stream 0 runs 3 chunks ahead, then both step together in one batch
        s0 = model.initial_state(1)
        for c in range(3):
            _, s0 = model.step(x[:1, 2 * CFG.chunk * c : 2 * CFG.chunk * c + W], s0)
        s1 = model.initial_state(1)
        both = {k: torch.cat([s0[k], s1[k]], dim=1 if k in ("k", "v") else 0) for k in s0}
        step_in = torch.cat([x[:1, 6 * CFG.chunk : 6 * CFG.chunk + W], x[1:, :W]])
        out, _ = model.step(step_in, both)
        alone0, _ = model.step(step_in[:1], s0)
        alone1, _ = model.step(step_in[1:], s1)
    np.testing.assert_allclose(out[:1].numpy(), alone0.numpy(), atol=1e-5)
    np.testing.assert_allclose(out[1:].numpy(), alone1.numpy(), atol=1e-5)


def test_onnx_step_equals_torch_step(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = se.StreamingEncoder(small_encoder(), CFG)
    path = se.export_step_onnx(model, tmp_path / "step.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    W = 2 * CFG.chunk + CFG.right_features
    x = feats(chunks=12)
    state = model.initial_state(2)
    onnx_state = {k: v.numpy() for k, v in state.items()}
    for c in range(12):  # crosses the position wrap (period 40 = 10 chunks)
        chunk = x[:, 2 * CFG.chunk * c : 2 * CFG.chunk * c + W]
        with torch.no_grad():
            ref, state = model.step(chunk, state)
        got = sess.run(None, {"features": chunk.numpy(), **onnx_state})
        onnx_state = dict(zip(se.StepGraph.STATE, got[1:]))
        np.testing.assert_allclose(got[0], ref.numpy(), atol=1e-4)
