"""Whisper tiny.en in plain torch, built from the CTranslate2 weights read by ``ct2``.

Encoder: conv1 (k3) -> GELU -> conv2 (k3, stride 2) -> GELU -> + stored positional
encodings -> pre-LN transformer blocks -> final LayerNorm.  Decoder: token embedding +
stored positions -> pre-LN blocks (causal self-attention with a KV cache, cross-attention
on the encoder output, MLP) -> LayerNorm -> logits tied to the token embedding.

Features go in time-major, ``[B, T, n_mels]`` (the contract's layout), not Whisper's
``[B, n_mels, T]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import ct2

log = logging.getLogger(__name__)

# Special tokens of the English-only Whisper vocabulary.
EOT = 50256
SOT = 50257
NO_TIMESTAMPS = 50362
TIMESTAMP_BEGIN = 50363


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


class Attention(nn.Module):
    """Multi-head attention with CTranslate2's fused projections.

    Self-attention: ``qkv`` [3d, d] fused; cross-attention: ``q`` [d, d] and ``kv`` [2d, d].
    """

    def __init__(self, d: int, heads: int, cross: bool):
        super().__init__()
        self.d, self.h, self.cross = d, heads, cross
        if cross:
            self.q = nn.Linear(d, d)
            self.kv = nn.Linear(d, 2 * d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, h, T, d/h]
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.d // self.h).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = x.shape
        return x.transpose(1, 2).reshape(b, t, h * dh)

    def project_kv(self, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(mem).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, *, causal: bool = False, cache=None, mem_kv=None):
        """Returns (output, new_cache). ``cache`` = (k, v) of earlier positions (self-attn);
        ``mem_kv`` = projected encoder keys/values (cross-attn)."""
        if self.cross:
            q = self._split(self.q(x))
            k, v = mem_kv
            new_cache = None
        else:
            q, k, v = (self._split(p) for p in self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            new_cache = (k, v)
        scale = (self.d // self.h) ** -0.5
        att = (q @ k.transpose(-1, -2)) * scale
        if causal:  # query i (at absolute position past+i) sees keys 0..past+i
            tq, tk = q.shape[2], k.shape[2]
            qpos = torch.arange(tq) + (tk - tq)
            mask = torch.arange(tk)[None, :] > qpos[:, None]
            att = att.masked_fill(mask, float("-inf"))
        y = att.softmax(dim=-1) @ v
        return self.out(self._merge(y)), new_cache


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, cross=False)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))[0]
        return x + self.mlp(self.ln2(x))


class WhisperEncoder(nn.Module):
    def __init__(self, n_mels=80, d=384, heads=6, layers=4, hidden=1536, n_pos=1500):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("pos", torch.zeros(n_pos, d))
        self.blocks = nn.ModuleList(EncoderBlock(d, heads, hidden) for _ in range(layers))
        self.ln_post = nn.LayerNorm(d)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, n_mels] -> [B, ceil(T/2), d]; positions from index 0."""
        x = F.gelu(self.conv1(feats.transpose(1, 2)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.pos[: x.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.ln_post(x)


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, heads, cross=False)
        self.ln2 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, heads, cross=True)
        self.ln3 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x, mem_kv, cache=None):
        y, cache = self.self_attn(self.ln1(x), causal=True, cache=cache)
        x = x + y
        x = x + self.cross_attn(self.ln2(x), mem_kv=mem_kv)[0]
        return x + self.mlp(self.ln3(x)), cache


class WhisperDecoder(nn.Module):
    def __init__(self, vocab=51864, d=384, heads=6, layers=4, hidden=1536, n_pos=448):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.register_buffer("pos", torch.zeros(n_pos, d))
        self.blocks = nn.ModuleList(DecoderBlock(d, heads, hidden) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def cross_kv(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer encoder keys/values: computed once per utterance."""
        return [b.cross_attn.project_kv(enc) for b in self.blocks]

    def forward(self, tokens: torch.Tensor, mem_kv, caches=None, offset: int = 0):
        """tokens [B, n] at positions offset.. -> (logits [B, n, V], new caches)."""
        x = self.embed(tokens) + self.pos[offset : offset + tokens.shape[1]]
        return self.run_blocks(x, mem_kv, caches)

    def run_blocks(self, x, mem_kv, caches):
        new = []
        for i, b in enumerate(self.blocks):
            x, c = b(x, mem_kv[i], None if caches is None else caches[i])
            new.append(c)
        return self.ln(x) @ self.embed.weight.T, new


# --- loading from the CTranslate2 spec -------------------------------------------------
def _load_linear(lin: nn.Linear, m: ct2.CT2Model, prefix: str):
    lin.weight.data = _t(m[prefix + "/weight"])
    lin.bias.data = (
        _t(m[prefix + "/bias"]) if prefix + "/bias" in m else torch.zeros(lin.out_features)
    )


def _load_ln(ln: nn.LayerNorm, m: ct2.CT2Model, prefix: str):
    ln.weight.data = _t(m[prefix + "/gamma"])
    ln.bias.data = _t(m[prefix + "/beta"])


def _check_spec(m: ct2.CT2Model):
    if m.spec_name != "WhisperSpec":
        raise ct2.CT2FormatError(f"expected a WhisperSpec model, got {m.spec_name!r}")
    if m.scalar("decoder/activation") != 3:  # CTranslate2's ActivationType::GELU (erf)
        raise ct2.CT2FormatError("expected exact GELU activation")


def encoder_from_ct2(m: ct2.CT2Model) -> WhisperEncoder:
    _check_spec(m)
    pos = m["encoder/position_encodings/encodings"]
    d = pos.shape[1]
    layers = sum(
        1
        for n in m.variables
        if n.startswith("encoder/layer_") and n.endswith("/self_attention/linear_0/weight")
    )
    enc = WhisperEncoder(
        n_mels=m["encoder/conv1/weight"].shape[1],
        d=d,
        heads=int(m.scalar("encoder/num_heads")),
        layers=layers,
        hidden=m["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        n_pos=pos.shape[0],
    )
    enc.conv1.weight.data = _t(m["encoder/conv1/weight"])
    enc.conv1.bias.data = _t(m["encoder/conv1/bias"])
    enc.conv2.weight.data = _t(m["encoder/conv2/weight"])
    enc.conv2.bias.data = _t(m["encoder/conv2/bias"])
    enc.pos.copy_(_t(pos))
    for i, b in enumerate(enc.blocks):
        p = f"encoder/layer_{i}"
        _load_ln(b.ln1, m, p + "/self_attention/layer_norm")
        _load_linear(b.attn.qkv, m, p + "/self_attention/linear_0")
        _load_linear(b.attn.out, m, p + "/self_attention/linear_1")
        _load_ln(b.ln2, m, p + "/ffn/layer_norm")
        _load_linear(b.mlp.fc1, m, p + "/ffn/linear_0")
        _load_linear(b.mlp.fc2, m, p + "/ffn/linear_1")
    _load_ln(enc.ln_post, m, "encoder/layer_norm")
    return enc.eval()


def decoder_from_ct2(m: ct2.CT2Model) -> WhisperDecoder:
    _check_spec(m)
    emb = m["decoder/embeddings/weight"]
    pos = m["decoder/position_encodings/encodings"]
    layers = sum(
        1
        for n in m.variables
        if n.startswith("decoder/layer_") and n.endswith("/self_attention/linear_0/weight")
    )
    dec = WhisperDecoder(
        vocab=emb.shape[0],
        d=emb.shape[1],
        heads=int(m.scalar("decoder/num_heads")),
        layers=layers,
        hidden=m["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        n_pos=pos.shape[0],
    )
    dec.embed.weight.data = _t(emb)
    dec.pos.copy_(_t(pos))
    for i, b in enumerate(dec.blocks):
        p = f"decoder/layer_{i}"
        _load_ln(b.ln1, m, p + "/self_attention/layer_norm")
        _load_linear(b.self_attn.qkv, m, p + "/self_attention/linear_0")
        _load_linear(b.self_attn.out, m, p + "/self_attention/linear_1")
        _load_ln(b.ln2, m, p + "/attention/layer_norm")
        _load_linear(b.cross_attn.q, m, p + "/attention/linear_0")
        _load_linear(b.cross_attn.kv, m, p + "/attention/linear_1")
        _load_linear(b.cross_attn.out, m, p + "/attention/linear_2")
        _load_ln(b.ln3, m, p + "/ffn/layer_norm")
        _load_linear(b.mlp.fc1, m, p + "/ffn/linear_0")
        _load_linear(b.mlp.fc2, m, p + "/ffn/linear_1")
    _load_ln(dec.ln, m, "decoder/layer_norm")
    return dec.eval()


# --- tokens -> text: shared with the runtime redecoder ----------------------------------
from streamasr.core.whisper_redecoder import WhisperTokens as Tokens  # noqa: E402


# --- greedy decoding -----------------------------------------------------------------
class Whisper:
    """Encoder + decoder + vocabulary; greedy transcription of up to 30 s of features."""

    def __init__(self, model_dir: str | Path | None = None):
        model_dir = Path(model_dir) if model_dir else ct2.packaged_whisper_dir()
        m = ct2.load(model_dir)
        self.encoder = encoder_from_ct2(m)
        self.decoder = decoder_from_ct2(m)
        self.tokens = Tokens(model_dir / "vocabulary.txt")
        self.suppress = list(m.config.get("suppress_ids", []))
        self.suppress_begin = list(m.config.get("suppress_ids_begin", []))

    @torch.no_grad()
    def greedy(self, feats: torch.Tensor, max_tokens: int = 200) -> list[int]:
        """feats [1, T<=3000, n_mels] -> token ids (no timestamps, English)."""
        enc = self.encoder(feats)
        mem = self.decoder.cross_kv(enc)
        prompt = torch.tensor([[SOT, NO_TIMESTAMPS]])
        logits, caches = self.decoder(prompt, mem)
        out: list[int] = []
        offset = prompt.shape[1]
        for step in range(max_tokens):
            lg = logits[0, -1].clone()
            lg[self.suppress] = float("-inf")
            lg[TIMESTAMP_BEGIN - 1 :] = float("-inf")  # <|notimestamps|> and timestamps
            if step == 0:
                lg[self.suppress_begin] = float("-inf")
            tok = int(lg.argmax())
            if tok == EOT:
                break
            out.append(tok)
            logits, caches = self.decoder(torch.tensor([[tok]]), mem, caches, offset)
            offset += 1
        return out

    def transcribe_features(self, feats: np.ndarray) -> str:
        """feats [T, n_mels] (streamasr.core.features log-mel), padded to 30 s as Whisper expects."""
        from streamasr.core.features import silence_frame
        from streamasr.protocol.contract import FeatureSpec

        n = self.encoder.pos.shape[0] * 2
        if len(feats) > n:
            raise ValueError(f"at most {n} frames (30 s) per call")
        pad = np.tile(silence_frame(FeatureSpec()), (n - len(feats), 1))
        x = torch.from_numpy(np.concatenate([feats, pad]).astype(np.float32))[None]
        return self.tokens.decode(self.greedy(x)).strip()


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whole-file features exactly as the server computes them: [T, n_mels]."""
    from streamasr.core.features import StreamingFeatures
    from streamasr.protocol.contract import FeatureSpec

    sf = StreamingFeatures(FeatureSpec())
    return np.concatenate([sf.accept(audio), sf.flush()])
