"""Two-pass finals: re-decode a finished utterance with the Whisper tiny.en decoder.

Runtime code (numpy + onnxruntime only).  The graphs come from
``python -m training.export_whisper`` / ``make model``:

    <dir>/whisper_encoder.onnx   mel [B, T<=3000, 80] -> encoder_out, cross_k, cross_v
    <dir>/whisper_decoder.onnx   one step with a self-attention KV cache
    <dir>/vocabulary.txt, config.json   (copied from the CTranslate2 package)

``WhisperRescorer(dir).transcribe(features)`` takes the utterance's streamasr log-mel frames
(the same features the streaming model saw), pads them with silence to Whisper's 30 s
window and decodes greedily.  Utterances longer than 30 s are decoded in 30 s pieces.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EOT, SOT, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50256, 50257, 50362, 50363
WINDOW_FRAMES = 3000


def _byte_unicode_table() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class WhisperTokens:
    """Token id -> text for the Whisper vocabulary (``vocabulary.txt``, one token a line)."""

    def __init__(self, vocabulary_file: str | Path):
        self.pieces = Path(vocabulary_file).read_text(encoding="utf-8").split("\n")
        if self.pieces and self.pieces[-1] == "":
            self.pieces.pop()
        self._bytes = _byte_unicode_table()

    def decode(self, ids) -> str:
        data = bytearray()
        for i in ids:
            if i < EOT:
                data.extend(self._bytes[ch] for ch in self.pieces[i])
        return data.decode("utf-8", errors="replace")


class WhisperRescorer:
    def __init__(self, directory: str | Path, threads: int = 1, gpu: bool = False):
        import onnxruntime as ort

        d = Path(directory)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        prov = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            prov.insert(0, "CUDAExecutionProvider")
        self.enc = ort.InferenceSession(str(d / "whisper_encoder.onnx"), so, providers=prov)
        self.dec = ort.InferenceSession(str(d / "whisper_decoder.onnx"), so, providers=prov)
        cfg = json.loads((d / "config.json").read_text())
        self.suppress = np.asarray(cfg.get("suppress_ids", []), dtype=np.int64)
        self.suppress_begin = np.asarray(cfg.get("suppress_ids_begin", []), dtype=np.int64)
        self.tokens = WhisperTokens(d / "vocabulary.txt")

    def greedy(self, mel: np.ndarray, max_tokens: int = 224) -> list[int]:
        """mel [3000, 80] -> token ids (English, no timestamps)."""
        _, ck, cv = self.enc.run(None, {"mel": mel[None].astype(np.float32)})
        L, _, h, _, dh = ck.shape
        pk = pv = np.zeros((L, 1, h, 0, dh), np.float32)
        toks = np.array([[SOT, NO_TIMESTAMPS]], np.int64)
        out: list[int] = []
        for step in range(max_tokens):
            logits, pk, pv = self.dec.run(
                None, {"tokens": toks, "cross_k": ck, "cross_v": cv, "past_k": pk, "past_v": pv}
            )
            lg = logits[0]
            lg[self.suppress] = -np.inf
            lg[TIMESTAMP_BEGIN - 1 :] = -np.inf
            if step == 0:
                lg[self.suppress_begin] = -np.inf
            tok = int(lg.argmax())
            if tok == EOT:
                break
            out.append(tok)
            toks = np.array([[tok]], np.int64)
        return out

    def transcribe(self, features: np.ndarray, silence: np.ndarray) -> str:
        """features [T, 80] (streamasr log-mel of the utterance), silence [80] (the feature
        vector of digital silence, ``streamasr.features.silence_frame``)."""
        texts = []
        for start in range(0, max(len(features), 1), WINDOW_FRAMES):
            piece = features[start : start + WINDOW_FRAMES]
            pad = np.tile(silence, (WINDOW_FRAMES - len(piece), 1))
            texts.append(self.tokens.decode(self.greedy(np.concatenate([piece, pad]))).strip())
        return " ".join(t for t in texts if t)
