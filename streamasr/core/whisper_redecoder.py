"""Two-pass finals: re-decode a finished utterance with the Whisper tiny.en decoder.

Runtime code (numpy + onnxruntime only).  The graphs come from
``python -m streamasr.artifacts.export_whisper`` / ``make model``:

    <dir>/whisper_encoder.onnx   mel [B, T<=3000, 80] -> encoder_out, cross_k, cross_v
    <dir>/whisper_decoder.onnx   one step with a self-attention KV cache
    <dir>/vocabulary.txt, config.json   (copied from the CTranslate2 package)

``WhisperRedecoder(dir).transcribe_many(features, silence)`` takes utterances as streamasr
log-mel frames (the same features the streaming model saw) and decodes them greedily,
batched: the encoder sees each utterance's own frames padded to a length bucket
(:class:`EncoderWindow`), not Whisper's whole 30 s window, so a 2 s utterance pays for
10 s of encoder instead of 30 s.  Utterances with the same padded length share one
encoder call and one decoder loop.  An output that looks degenerate (:func:`degenerate`)
is decoded again padded to 30 s, the way Whisper was trained.  Callers refuse utterances
over 30 s (``streamasr.core.two_pass.MAX_UTTERANCE_SECONDS``).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EOT, SOT, NO_TIMESTAMPS, TIMESTAMP_BEGIN = 50256, 50257, 50362, 50363
#: File-name variant of the int8 graphs (streamasr/artifacts/quantize_whisper.py): half the CPU and
#: no WER lost on assets/eval, but activations are quantized per call, so a row's text may
#: depend on its batch: interim refreshes batch them, finals decode one utterance per call
#: (streamasr.pipeline.final_pass, parameter final_graphs).
INT8_GRAPHS = ".int8"
#: The files beside the graphs: the token vocabulary and the decoding config.
SUPPORT_FILES = ("vocabulary.txt", "config.json")


def graph_files(graphs: str = "") -> tuple[str, str]:
    """The (encoder, decoder) ONNX file names of a graph variant (``""``: float,
    ``INT8_GRAPHS``)."""
    return f"whisper_encoder{graphs}.onnx", f"whisper_decoder{graphs}.onnx"


#: Whisper's "previous text" marker: the prompt tokens follow it, then SOT.
START_OF_PREV = 50360
#: Whisper's whole window: 30 s of 10 ms frames.
WINDOW_FRAMES = 3000
#: Whisper's own decoding limit (half its 448-token context).
MAX_TOKENS = 224
#: A prompt (the settled words before a re-decoded tail) keeps its newest this many
#: tokens: enough context for a sentence; each token costs one position of the
#: decoder's first step.
MAX_PROMPT_TOKENS = 48


@dataclass(frozen=True)
class EncoderWindow:
    """How many frames the encoder sees for an utterance of ``T`` frames: ``T`` plus
    ``tail_frames`` of silence, at least ``min_frames``, rounded up to a multiple of
    ``bucket_frames`` (so utterances of similar length batch together), at most 30 s.

    Defaults measured on assets/eval, the 114 Asterisk test prompts and 15-30 s
    concatenations (docs/accuracy.md): at least 10 s, in 5 s buckets, decodes assets/eval
    exactly as the 30 s window does (WER 7.0 %) at 0.25 instead of 0.64 CPU s per
    utterance, the Asterisk prompts at 7.5 % instead of 6.1 %; shorter windows loop or
    hallucinate on short prompts far more often (without the guard, WER 72-1100 %).
    ``EncoderWindow.whole()`` is the old 30 s behaviour.

    Utterances of at most ``short_frames`` (2 s: a voice command, a short answer) get
    ``short_window_frames`` instead: on the 228 Asterisk single-word prompts of <= 2 s the
    10 s window repeated 4 words ("two two") and reached WER 45.6 % against 40.4 % at
    30 s (issue 24; docs/accuracy.md "Short utterances").
    """

    min_frames: int = 1000
    tail_frames: int = 0
    bucket_frames: int = 500
    short_frames: int = 200
    short_window_frames: int = WINDOW_FRAMES

    def __post_init__(self):
        for name in ("min_frames", "tail_frames", "bucket_frames", "short_frames"):
            v = getattr(self, name)
            if not 0 <= v <= WINDOW_FRAMES:
                raise ValueError(f"{name} must be in [0, {WINDOW_FRAMES}], got {v}")
        if self.short_window_frames % 2 or not 0 < self.short_window_frames <= WINDOW_FRAMES:
            raise ValueError(
                f"short_window_frames must be even and in (0, {WINDOW_FRAMES}], "
                f"got {self.short_window_frames}"
            )
        if self.bucket_frames < 2 or self.bucket_frames % 2:
            raise ValueError(
                f"bucket_frames must be even and >= 2 (the encoder halves "
                f"time), got {self.bucket_frames}"
            )

    @classmethod
    def whole(cls) -> "EncoderWindow":
        return cls(min_frames=WINDOW_FRAMES, tail_frames=0, bucket_frames=2, short_frames=0)

    def frames_for(self, n_frames: int) -> int:
        if n_frames <= self.short_frames:
            return self.short_window_frames
        want = max(n_frames + self.tail_frames, self.min_frames, 1)
        return min(WINDOW_FRAMES, self.bucket_frames * math.ceil(want / self.bucket_frames))


def token_budget(n_frames: int) -> int:
    """Most tokens an utterance of ``n_frames`` may decode to: ~10 tokens a second plus a
    margin, so a decoder stuck in a loop stops early (and is caught by ``degenerate``)."""
    return min(MAX_TOKENS, 16 + math.ceil(n_frames / 10))


def degenerate(tokens: list[int], text: str, n_frames: int, stopped: bool) -> str | None:
    """Why a decode looks like Whisper's failure modes on a short or padded input, or None.

    - ``stopped`` False: no end-of-text within ``token_budget`` (a loop);
    - empty text: the caller only re-decodes utterances the first pass heard words in;
    - a gzip compression ratio above 2.4 over 40+ characters: repeated text (Whisper's own
      temperature-fallback rule);
    - more than 6 words a second (plus 3): speech is rarely faster than ~4;
    - a word said again right after itself ("two two", "Y Y Y-"): on isolated ~1 s
      words the 10 s window repeats them (4 of 228 Asterisk single-word prompts), the 30 s
      window does not (issue 24); a real "no no" costs one 30 s decode, which keeps it.
    """
    if not stopped:
        return f"no end of text within {len(tokens)} tokens"
    words = text.split()
    if not words:
        return "empty text"
    spoken = [w for w in (_REPEAT_STRIP.sub("", w).lower() for w in words) if w]
    for a, b in zip(spoken, spoken[1:]):
        if a == b:
            return f"repeated word {a!r}"
    data = text.encode("utf-8")
    if len(data) >= 40 and len(data) / len(gzip.compress(data)) > 2.4:
        return "repeated text"
    if len(words) > 3 + 6 * n_frames / 100:
        return f"{len(words)} words in {n_frames / 100:.1f} s"
    return None


#: What is not part of a word when words are compared for repetition (punctuation, the
#: dash of a cut-off word).
_REPEAT_STRIP = re.compile(r"[^\w']+")


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
    """Token id -> text for the Whisper vocabulary (``vocabulary.txt``, one token a line),
    and words -> token ids for a prompt (:meth:`encode_words`)."""

    def __init__(self, vocabulary_file: str | Path):
        self.pieces = Path(vocabulary_file).read_text(encoding="utf-8").split("\n")
        if self.pieces and self.pieces[-1] == "":
            self.pieces.pop()
        self._bytes = _byte_unicode_table()
        self._chars = {b: ch for ch, b in self._bytes.items()}
        self._ids = {p: i for i, p in enumerate(self.pieces[:EOT])}
        self._longest = max((len(p) for p in self._ids), default=1)

    def encode_words(self, words: list[str]) -> list[int]:
        """Words (each after a space) -> text token ids by longest match against the
        vocabulary: not always BPE's own split of a rare word, but the same text, which
        is all a prompt needs (no merges file ships with the model)."""
        out: list[int] = []
        for word in words:
            s = "".join(self._chars[b] for b in (" " + word).encode("utf-8"))
            i = 0
            while i < len(s):
                for n in range(min(self._longest, len(s) - i), 0, -1):
                    tok = self._ids.get(s[i : i + n])
                    if tok is not None:
                        out.append(tok)
                        i += n
                        break
                else:  # every single byte is a token: unreachable with Whisper's vocabulary
                    raise ValueError(f"cannot encode {word!r}")
        return out

    def decode(self, ids) -> str:
        data = bytearray()
        for i in ids:
            if i < EOT:
                data.extend(self._bytes[ch] for ch in self.pieces[i])
        return data.decode("utf-8", errors="replace")


@dataclass
class Decoded:
    text: str
    window_frames: int  # what the encoder saw
    fallback: str | None = None  # why the 30 s decode replaced the short one
    rejected: str | None = None  # why a decode without the 30 s retry came back empty


class WhisperRedecoder:
    def __init__(
        self,
        directory: str | Path,
        threads: int = 1,
        gpu: bool = False,
        window: EncoderWindow | None = None,
        max_batch: int = 8,
        graphs: str = "",
    ):
        """``graphs``: the graph files' variant, e.g. ``INT8_GRAPHS`` for
        ``whisper_encoder.int8.onnx`` / ``whisper_decoder.int8.onnx``."""
        import onnxruntime as ort

        d = Path(directory)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        prov = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            prov.insert(0, "CUDAExecutionProvider")
        encoder, decoder = graph_files(graphs)
        self.enc = ort.InferenceSession(str(d / encoder), so, providers=prov)
        self.dec = ort.InferenceSession(str(d / decoder), so, providers=prov)
        cfg = json.loads((d / "config.json").read_text())
        self.suppress = np.asarray(cfg.get("suppress_ids", []), dtype=np.int64)
        self.suppress_begin = np.asarray(cfg.get("suppress_ids_begin", []), dtype=np.int64)
        self.tokens = WhisperTokens(d / "vocabulary.txt")
        self.window = window or EncoderWindow()
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch

    def one_per_call(self) -> "WhisperRedecoder":
        """This re-decoder (the same sessions) decoding one utterance per call."""
        one = copy.copy(self)
        one.max_batch = 1
        return one

    def encode_prompt(self, words: list[str]) -> list[int]:
        """The newest ``MAX_PROMPT_TOKENS`` tokens of ``words``, for ``transcribe_many``'s
        ``prompts``."""
        toks = self.tokens.encode_words(words)
        return toks[max(0, len(toks) - MAX_PROMPT_TOKENS) :]

    def greedy_batch(
        self, mels: np.ndarray, budgets: list[int], prompts: list[list[int]] | None = None
    ) -> list[tuple[list[int], bool]]:
        """mels [B, frames, 80] (one padded length) -> per row (token ids, stopped at EOT),
        English, no timestamps.  Rows are independent: a row decodes to the same tokens
        alone or in a batch (tests/integration/test_two_pass_batch.py).  ``prompts``: per
        row the text tokens said before this audio (all of one length: the decoder graph
        has no padding mask), fed after ``<|startofprev|>`` as Whisper's previous text."""
        _, ck, cv = self.enc.run(None, {"mel": mels.astype(np.float32, copy=False)})
        L, B, h, _, dh = ck.shape
        pk = pv = np.zeros((L, B, h, 0, dh), np.float32)
        if prompts and len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one batch must have one length")
        first = [
            [START_OF_PREV, *p, SOT, NO_TIMESTAMPS] if p else [SOT, NO_TIMESTAMPS]
            for p in (prompts or [[]] * B)
        ]
        toks = np.array(first, np.int64)
        out: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        stopped = np.zeros(B, bool)
        for step in range(max(budgets)):
            logits, pk, pv = self.dec.run(
                None, {"tokens": toks, "cross_k": ck, "cross_v": cv, "past_k": pk, "past_v": pv}
            )
            logits[:, self.suppress] = -np.inf
            logits[:, TIMESTAMP_BEGIN - 1 :] = -np.inf
            if step == 0:
                logits[:, self.suppress_begin] = -np.inf
            nxt = logits.argmax(axis=1)
            for b in range(B):
                if done[b]:
                    continue
                if nxt[b] == EOT:
                    done[b] = stopped[b] = True
                elif len(out[b]) >= budgets[b]:
                    done[b] = True  # out of budget: not stopped at EOT
                else:
                    out[b].append(int(nxt[b]))
            if done.all():
                break
            toks = np.where(done, EOT, nxt)[:, None].astype(np.int64)
        return [(o, bool(stopped[b])) for b, o in enumerate(out)]

    def greedy(self, mel: np.ndarray, max_tokens: int = MAX_TOKENS) -> list[int]:
        """mel [frames, 80] -> token ids (English, no timestamps)."""
        return self.greedy_batch(mel[None], [max_tokens])[0][0]

    def _decode_group(
        self,
        feats: list[np.ndarray],
        frames: int,
        silence: np.ndarray,
        prompts: list[list[int]] | None = None,
    ) -> list[tuple[str, list[int], bool]]:
        out = []
        for s in range(0, len(feats), self.max_batch):
            part = feats[s : s + self.max_batch]
            mels = np.stack(
                [np.concatenate([f[:frames], np.tile(silence, (frames - len(f), 1))]) for f in part]
            )
            budgets = [token_budget(len(f)) if frames < WINDOW_FRAMES else MAX_TOKENS for f in part]
            rows = None
            if prompts:  # one length per call: each row keeps its newest tokens
                rows = prompts[s : s + self.max_batch]
                keep = min(len(p) for p in rows)
                rows = [p[len(p) - keep :] for p in rows]
            for toks, stopped in self.greedy_batch(mels, budgets, rows):
                out.append((self.tokens.decode(toks).strip(), toks, stopped))
        return out

    def transcribe_many(
        self,
        features: list[np.ndarray],
        silence: np.ndarray,
        prompts: list[list[int]] | None = None,
        whole_window_retry: bool = True,
        window: EncoderWindow | None = None,
    ) -> list[Decoded]:
        """features: utterances [T_i <= 3000, 80] (streamasr log-mel), silence [80] (the
        feature vector of digital silence, ``streamasr.core.features.silence_frame``).
        ``prompts``: per utterance the text tokens said before it ([] for none; rows with
        prompts batch together, cut to their shortest prompt's length).
        ``whole_window_retry`` False (interim refreshes: best effort, and a tail may hold
        no words): a degenerate decode is not retried at 30 s but returned empty with
        ``rejected`` saying why, and empty text is accepted.  ``window``: the encoder
        window for this call (default: the redecoder's)."""
        for f in features:
            if len(f) > WINDOW_FRAMES:
                raise ValueError(
                    f"an utterance of {len(f)} frames is over Whisper's "
                    f"{WINDOW_FRAMES}-frame window"
                )
        if prompts is not None and len(prompts) != len(features):
            raise ValueError(f"{len(prompts)} prompts for {len(features)} utterances")
        results: list[Decoded | None] = [None] * len(features)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, f in enumerate(features):
            key = ((window or self.window).frames_for(len(f)), bool(prompts and prompts[i]))
            groups.setdefault(key, []).append(i)
        retry = []
        for (frames, prompted), idx in sorted(groups.items()):
            rows = [prompts[i] for i in idx] if prompts and prompted else None
            for i, (text, toks, stopped) in zip(
                idx, self._decode_group([features[i] for i in idx], frames, silence, rows)
            ):
                why = (
                    degenerate(toks, text, len(features[i]), stopped)
                    if frames < WINDOW_FRAMES
                    else None
                )
                if why is None or (not whole_window_retry and not text and stopped):
                    results[i] = Decoded(text, frames)
                elif not whole_window_retry:
                    results[i] = Decoded("", frames, rejected=why)
                else:
                    retry.append((i, why))
        if retry:
            redo = self._decode_group([features[i] for i, _ in retry], WINDOW_FRAMES, silence)
            for (i, why), (text, _, _) in zip(retry, redo):
                log.info("short-window decode looked degenerate (%s): decoded at 30 s", why)
                results[i] = Decoded(text, WINDOW_FRAMES, fallback=why)
        return results  # type: ignore[return-value]

    def transcribe(self, features: np.ndarray, silence: np.ndarray) -> str:
        """One utterance [T <= 3000, 80] -> text (see ``transcribe_many``)."""
        return self.transcribe_many([features], silence)[0].text
