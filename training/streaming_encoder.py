"""Whisper tiny's encoder made streaming: each encoder frame is computed once (issue 26).

Today's acoustic model re-encodes a 1.5 s window for every 0.4 s chunk (150 feature frames
in, 20 output frames kept: 3.75x the frames it emits). This encoder instead runs once per
chunk on ``chunk + look-ahead`` frames and keeps, per stream and per layer, the keys and
values of the last ``left_chunks`` chunks (block-causal attention over a cached left
context):

* a **chunk frame** attends to the cached chunks and to every frame of its own chunk;
* the **look-ahead frames** (the first ``lookahead`` frames of the next chunk, computed from
  the contract's right context) attend to the same plus each other, feed only the head, and
  are not cached: the next call computes them again as chunk frames. Frames computed per
  emitted frame: (chunk + lookahead) / chunk = 24 / 20 = 1.2x.
* **convolutions**: conv1 (k3) and conv2 (k3, stride 2) need 2 feature frames before the
  chunk (kept in the state) and 1 after it (the contract's right context has 10).
* **positions**: Whisper adds absolute positional encodings (1500 stored, 30 s) to the
  conv output, so a cached key carries the position it was computed at and cannot be
  re-based afterwards. Positions therefore run modulo ``period`` (= Whisper's 1500): every
  position is one Whisper was trained on, a stream of any length is stationary, and the
  only cost is a jump 1499 -> 0 every 30 s that the keys of the next ``left_chunks`` chunks
  see. Training draws a random phase so the student learns the jump; the held-out
  evaluation measures it separately (cosine on the chunks right after a wrap). Re-basing a
  sliding window instead would need the cached keys recomputed at new positions each
  chunk, which is the recomputation this encoder exists to remove.

``forward_parallel`` computes a whole utterance at once with an attention mask and the
look-ahead frames as extra copies; it equals chunk-by-chunk ``step`` calls exactly
(tests/unit/test_streaming_encoder.py), so training sees precisely what streaming serves.

Input sequence convention (training and evaluation): the contract's stream features with
``PAD_CHUNKS`` chunks of the stream-start silence padding in front (the first 80 of the
window assembler's 100 left-padding frames), the audio, the tail padding, and ``right``
frames of look-ahead: ``full_sequence(contract, whole_file_windows(...).features)[20:]``.
Student chunk ``c + PAD_CHUNKS`` is then exactly serving window ``c``'s chunk, and the
state after the padding chunks is a constant (the stream's initial state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from streamasr.artifacts import whisper

# Chunks of silence padding in front of every stream (the window assembler pads 100 frames
# = 2.5 chunks; the last 2 whole chunks are kept so chunk boundaries match the windows').
PAD_CHUNKS = 2
# Feature frames before a chunk that conv1 + conv2 need (kernel 3 each, conv2 stride 2).
CONV_LEFT = 2


@dataclass(frozen=True)
class StreamConfig:
    chunk: int = 20  # encoder frames per chunk = contract chunk_frames / subsampling
    left_chunks: int = 8  # cached left context: 8 chunks = 160 frames = 3.2 s
    lookahead: int = 4  # encoder frames of look-ahead (needs 2*4+1 = 9 <= 10 right frames)
    right_features: int = 10  # the contract's right context, in feature frames
    period: int = 1500  # positions wrap modulo this (Whisper's stored table)

    def check(self) -> StreamConfig:
        if 2 * self.lookahead + 1 > self.right_features:
            raise ValueError(
                f"lookahead {self.lookahead} needs {2 * self.lookahead + 1} right feature "
                f"frames, the contract has {self.right_features}"
            )
        if self.period <= 0 or self.chunk <= 0 or self.left_chunks < 0:
            raise ValueError("period and chunk must be positive, left_chunks >= 0")
        return self

    @property
    def cache_frames(self) -> int:
        return self.left_chunks * self.chunk

    def to_dict(self) -> dict:
        return asdict(self)


def sequence_chunks(cfg: StreamConfig, n_features: int) -> int:
    """Chunks in an input sequence of ``n_features`` frames (see the module docstring)."""
    body = n_features - cfg.right_features
    if body <= 0 or body % (2 * cfg.chunk):
        raise ValueError(
            f"{n_features} feature frames is not whole chunks of {2 * cfg.chunk} + "
            f"{cfg.right_features} right frames"
        )
    return body // (2 * cfg.chunk)


class StreamingEncoder(nn.Module):
    """Whisper's encoder weights with block-causal attention over a cached left context."""

    def __init__(self, encoder: whisper.WhisperEncoder, cfg: StreamConfig | None = None):
        super().__init__()
        self.cfg = (cfg or StreamConfig()).check()
        self.enc = encoder
        self.heads = encoder.blocks[0].attn.h
        self.d = encoder.pos.shape[1]
        if self.cfg.period > encoder.pos.shape[0]:
            raise ValueError(f"period {self.cfg.period} > {encoder.pos.shape[0]} stored positions")

    # --- shared pieces ------------------------------------------------------------------
    def _positions(self, start: torch.Tensor | int, n: int) -> torch.Tensor:
        idx = (torch.arange(n) + start) % self.cfg.period
        return self.enc.pos[idx]

    def _attend(self, block, x, keys_extra=None, mask=None):
        """One pre-LN block. ``keys_extra`` = (k, v) cached keys/values put before the
        block's own; ``mask`` [Tq, Tk] True = may attend. Returns (x, (k, v) of x)."""
        a = block.attn
        b, t, _ = x.shape
        q, k, v = (a._split(p) for p in a.qkv(block.ln1(x)).chunk(3, dim=-1))
        kk, vv = k, v
        if keys_extra is not None:
            kk = torch.cat([keys_extra[0], k], dim=2)
            vv = torch.cat([keys_extra[1], v], dim=2)
        att = (q @ kk.transpose(-1, -2)) * (a.d // a.h) ** -0.5
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        y = a._merge(att.softmax(dim=-1) @ vv)
        x = x + a.out(y)
        x = x + block.mlp(block.ln2(x))
        return x, (k, v)

    # --- training: a whole sequence at once ---------------------------------------------
    def forward_parallel(
        self, feats: torch.Tensor, phase: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, 2*C*chunk + right, n_mels] -> (chunk frames [B, C*chunk, d],
        look-ahead frames [B, C, lookahead, d]); positions start at ``phase``."""
        cfg = self.cfg
        C = sequence_chunks(cfg, feats.shape[1])
        K, R = cfg.chunk, cfg.lookahead
        x = F.gelu(self.enc.conv1(feats.transpose(1, 2)))
        x = F.gelu(self.enc.conv2(x)).transpose(1, 2)  # [B, C*K + right/2, d]
        n = C * K
        x = x[:, : n + R] + self._positions(phase, n + R)
        # look-ahead copies: group c = frames (c+1)K .. (c+1)K+R-1
        look_idx = (torch.arange(C)[:, None] + 1) * K + torch.arange(R)[None, :]
        seq = torch.cat([x[:, :n], x[:, look_idx.reshape(-1)]], dim=1)
        mask = self.parallel_mask(C)
        for block in self.enc.blocks:
            seq = self._attend(block, seq, mask=mask)[0]
        seq = self.enc.ln_post(seq)
        return seq[:, :n], seq[:, n:].reshape(seq.shape[0], C, R, self.d)

    def parallel_mask(self, C: int) -> torch.Tensor:
        """[N, N] attention mask over C*chunk chunk frames then C*lookahead copies."""
        K, R, L = self.cfg.chunk, self.cfg.lookahead, self.cfg.left_chunks
        main_c = torch.arange(C * K) // K
        copy_c = torch.arange(C * R) // R
        q_c = torch.cat([main_c, copy_c])
        k_main = (main_c[None, :] <= q_c[:, None]) & (main_c[None, :] >= q_c[:, None] - L)
        k_copy = torch.zeros(len(q_c), C * R, dtype=torch.bool)
        k_copy[C * K :] = copy_c[None, :] == copy_c[:, None]
        return torch.cat([k_main, k_copy], dim=1)

    # --- serving: one chunk per call ----------------------------------------------------
    def initial_state(self, batch: int = 1) -> dict[str, torch.Tensor]:
        cfg, L = self.cfg, len(self.enc.blocks)
        dh = self.d // self.heads
        z = torch.zeros(L, batch, self.heads, cfg.cache_frames, dh)
        return {
            "k": z.clone(),
            "v": z.clone(),
            "valid": torch.zeros(batch, cfg.cache_frames, dtype=torch.bool),
            "feats": torch.zeros(batch, CONV_LEFT, self.enc.conv1.in_channels),
            "frames": torch.zeros(batch, dtype=torch.long),  # chunk frames emitted so far
        }

    def step(self, feats: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """feats [B, 2*chunk + right, n_mels] (this chunk + its right context) -> (frames
        [B, chunk + lookahead, d], new state). Tensor operations only (exportable to ONNX);
        each stream of a batch has its own state, position included."""
        cfg = self.cfg
        K, R = cfg.chunk, cfg.lookahead
        if feats.shape[1] != 2 * K + cfg.right_features:
            raise ValueError(f"expected {2 * K + cfg.right_features} feature frames")
        first = state["frames"] == 0
        ext = torch.cat([state["feats"], feats], dim=1).transpose(1, 2)
        c1 = F.gelu(F.conv1d(ext, self.enc.conv1.weight, self.enc.conv1.bias))
        # c1[:, :, j] is conv1 at chunk-relative feature index j - 1; conv2 reads -1 .. 2K+7,
        # and at the stream start index -1 is conv2's zero padding.
        c1 = c1[:, :, : 2 * (K + R) + 1]
        c1 = torch.cat([c1[:, :, :1] * (~first).float()[:, None, None], c1[:, :, 1:]], dim=2)
        x = F.gelu(F.conv1d(c1, self.enc.conv2.weight, self.enc.conv2.bias, stride=2))
        x = x.transpose(1, 2)  # [B, K + R, d]
        # per-stream positions: streams of one batch may be at different frame counts
        idx = (torch.arange(K + R)[None, :] + state["frames"][:, None]) % cfg.period
        x = x + self.enc.pos[idx]
        valid = state["valid"]
        n_cache = cfg.cache_frames
        # queries: K chunk frames (see cache + chunk) then R look-ahead (see cache + all)
        see_new = torch.ones(K + R, K + R, dtype=torch.bool)
        see_new[:K, K:] = False
        mask = torch.cat(
            [
                valid[:, None, None, :].expand(-1, 1, K + R, n_cache),
                see_new.expand(valid.shape[0], 1, K + R, K + R),
            ],
            dim=-1,
        )
        new_k, new_v = [], []
        for i, block in enumerate(self.enc.blocks):
            x, (k, v) = self._attend(block, x, (state["k"][i], state["v"][i]), mask)
            new_k.append(torch.cat([state["k"][i], k[:, :, :K]], dim=2)[:, :, -n_cache:])
            new_v.append(torch.cat([state["v"][i], v[:, :, :K]], dim=2)[:, :, -n_cache:])
        out = self.enc.ln_post(x)
        new_valid = torch.cat([valid, torch.ones(valid.shape[0], K, dtype=torch.bool)], 1)
        return out, {
            "k": torch.stack(new_k),
            "v": torch.stack(new_v),
            "valid": new_valid[:, -n_cache:],
            "feats": feats[:, 2 * K - CONV_LEFT : 2 * K],
            "frames": state["frames"] + K,
        }

    def stream(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same result as ``forward_parallel`` (phase 0), chunk by chunk via ``step``."""
        C = sequence_chunks(self.cfg, feats.shape[1])
        K, W = self.cfg.chunk, 2 * self.cfg.chunk + self.cfg.right_features
        state = self.initial_state(feats.shape[0])
        main, look = [], []
        for c in range(C):
            out, state = self.step(feats[:, 2 * K * c : 2 * K * c + W], state)
            main.append(out[:, :K])
            look.append(out[:, K:])
        return torch.cat(main, dim=1), torch.stack(look, dim=1)


def frames_per_emitted(cfg: StreamConfig) -> float:
    """Encoder frames computed per frame emitted (today's windowed encoder: 75/20 = 3.75)."""
    return (cfg.chunk + cfg.lookahead) / cfg.chunk


def attention_keys_per_query(cfg: StreamConfig) -> float:
    """Mean keys a query attends to in steady state (cost of attention, not of linears)."""
    return (
        cfg.cache_frames + cfg.chunk + cfg.lookahead * (cfg.lookahead / (cfg.chunk + cfg.lookahead))
    )


def head_frames(
    cfg: StreamConfig, main: np.ndarray, look: np.ndarray, head_left: int, head_width: int
) -> np.ndarray:
    """The frames today's head reads per serving window, from the student: ``head_left``
    chunk frames before the chunk, the chunk, the look-ahead; padded to ``head_width`` by
    repeating the last look-ahead frame (the windowed encoder had 5 look-ahead frames,
    this one 4). Window w = student chunk w + PAD_CHUNKS. main [N, d], look [C, R, d]."""
    K = cfg.chunk
    C = len(look)
    out = []
    for c in range(PAD_CHUNKS, C):
        x = np.concatenate([main[c * K - head_left : (c + 1) * K], look[c]])
        if len(x) < head_width:
            x = np.concatenate([x, np.repeat(x[-1:], head_width - len(x), axis=0)])
        out.append(x[:head_width])
    return np.stack(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of [N, d] arrays."""
    na = np.linalg.norm(a, axis=-1) + 1e-8
    nb = np.linalg.norm(b, axis=-1) + 1e-8
    return (a * b).sum(-1) / (na * nb)


def wrap_chunks(cfg: StreamConfig, phase: int, n_chunks: int) -> np.ndarray:
    """Chunks whose attention span contains a position wrap (period -> 0)."""
    K = cfg.chunk
    out = np.zeros(n_chunks, dtype=bool)
    for c in range(n_chunks):
        lo = max(0, c - cfg.left_chunks) * K + phase
        hi = (c + 1) * K + cfg.lookahead + phase
        out[c] = math.floor((hi - 1) / cfg.period) != math.floor(lo / cfg.period)
    return out


class StepGraph(nn.Module):
    """``StreamingEncoder.step`` with the state as plain tensors, for ONNX export:
    (features, k, v, valid, feats, frames) -> (out, k, v, valid, feats, frames)."""

    STATE = ("k", "v", "valid", "feats", "frames")

    def __init__(self, student: StreamingEncoder):
        super().__init__()
        self.student = student

    def forward(self, features, k, v, valid, feats, frames):
        out, st = self.student.step(
            features, {"k": k, "v": v, "valid": valid, "feats": feats, "frames": frames}
        )
        return (out, *(st[n] for n in self.STATE))


def export_step_onnx(student: StreamingEncoder, path, opset: int = 17):
    """The per-chunk graph with a dynamic batch axis (state in, state out)."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = student.cfg
    state = student.initial_state(1)
    feats = torch.zeros(1, 2 * cfg.chunk + cfg.right_features, student.enc.conv1.in_channels)
    names = list(StepGraph.STATE)
    dyn = {n: {0: "batch"} for n in ["features", *names, "out", *[n + "_out" for n in names]]}
    for n in ("k", "v", "k_out", "v_out"):
        dyn[n] = {1: "batch"}
    with torch.no_grad():
        torch.onnx.export(
            StepGraph(student.eval()),
            (feats, *(state[n] for n in names)),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["features", *names],
            output_names=["out", *[n + "_out" for n in names]],
            dynamic_axes=dyn,
        )
    return path
