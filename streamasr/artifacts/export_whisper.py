"""Whisper tiny.en as two ONNX graphs for re-decoding utterances (two-pass finals).

``whisper_encoder.onnx``: ``mel`` [B, T, 80] (T <= 3000, the streamasr log-mel) ->
``encoder_out`` [B, T/2, 384] and the decoder's cross-attention keys/values
``cross_k``/``cross_v`` [L, B, heads, T/2, 64], computed once per utterance.

``whisper_decoder.onnx``: one decoding step with a self-attention KV cache:
``tokens`` [B, n] int64, ``cross_k``, ``cross_v``, ``past_k``/``past_v``
[L, B, heads, P, 64] (P = 0 at the start) -> ``logits`` [B, V] of the last token and
``present_k``/``present_v`` [L, B, heads, P + n, 64].

Greedy decoding with them: ``streamasr.core.whisper_redecoder.WhisperRedecoder``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from . import ct2, whisper

log = logging.getLogger(__name__)


class EncoderWithCrossKV(nn.Module):
    def __init__(self, enc: whisper.WhisperEncoder, dec: whisper.WhisperDecoder):
        super().__init__()
        self.enc, self.dec = enc, dec

    def forward(self, mel):
        out = self.enc(mel)
        kv = self.dec.cross_kv(out)
        return out, torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


class CtcDecoderStep(nn.Module):
    def __init__(self, dec: whisper.WhisperDecoder):
        super().__init__()
        self.dec = dec

    def forward(self, tokens, cross_k, cross_v, past_k, past_v):
        n = tokens.shape[1]
        positions = torch.arange(n) + past_k.shape[3]
        x = self.dec.embed(tokens) + torch.index_select(self.dec.pos, 0, positions)
        mem = [(cross_k[i], cross_v[i]) for i in range(cross_k.shape[0])]
        caches = [(past_k[i], past_v[i]) for i in range(past_k.shape[0])]
        logits, new = self.dec.run_blocks(x, mem, caches)
        return (logits[:, -1], torch.stack([k for k, _ in new]), torch.stack([v for _, v in new]))


def export(out_dir: str | Path, model_dir: str | Path | None = None) -> tuple[Path, Path]:
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = ct2.load(model_dir or ct2.packaged_whisper_dir())
    enc, dec = whisper.encoder_from_ct2(m), whisper.decoder_from_ct2(m)
    L, h = len(dec.blocks), dec.blocks[0].self_attn.h
    dh = dec.pos.shape[1] // h
    ep, dp = out_dir / "whisper_encoder.onnx", out_dir / "whisper_decoder.onnx"
    with torch.no_grad():
        torch.onnx.export(
            EncoderWithCrossKV(enc, dec).eval(),
            (torch.zeros(1, 200, 80),),
            str(ep),
            dynamo=False,
            opset_version=17,
            input_names=["mel"],
            output_names=["encoder_out", "cross_k", "cross_v"],
            dynamic_axes={
                "mel": {0: "batch", 1: "frames"},
                "encoder_out": {0: "batch", 1: "enc_frames"},
                "cross_k": {1: "batch", 3: "enc_frames"},
                "cross_v": {1: "batch", 3: "enc_frames"},
            },
        )
        ck = torch.zeros(L, 1, h, 100, dh)
        past = torch.zeros(L, 1, h, 3, dh)
        torch.onnx.export(
            CtcDecoderStep(dec).eval(),
            (torch.tensor([[50257, 50362]]), ck, ck, past, past),
            str(dp),
            dynamo=False,
            opset_version=17,
            input_names=["tokens", "cross_k", "cross_v", "past_k", "past_v"],
            output_names=["logits", "present_k", "present_v"],
            dynamic_axes={
                "tokens": {0: "batch", 1: "n"},
                "cross_k": {1: "batch", 3: "enc_frames"},
                "cross_v": {1: "batch", 3: "enc_frames"},
                "past_k": {1: "batch", 3: "past"},
                "past_v": {1: "batch", 3: "past"},
                "logits": {0: "batch"},
                "present_k": {1: "batch", 3: "total"},
                "present_v": {1: "batch", 3: "total"},
            },
        )
    for p in (ep, dp):
        onnx.checker.check_model(str(p))
        log.info("exported %s (%.0f MB)", p, p.stat().st_size / 1e6)
    src = Path(model_dir or ct2.packaged_whisper_dir())
    for name in (
        "vocabulary.txt",
        "config.json",
    ):  # what streamasr.core.whisper_redecoder needs besides
        shutil.copyfile(src / name, out_dir / name)
    return ep, dp


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m streamasr.artifacts.export_whisper",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("build/whisper_onnx"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    export(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
