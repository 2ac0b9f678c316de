"""Two-pass finals: interims from streaming CTC, finals re-decoded by Whisper.

The decoder step (``ctc_decoder``) records, for streams that come through the two-pass
ensemble, the audio features and CTC log-probs of the open utterance
(:class:`UtteranceRecorder`).  When it emits a final with words it attaches that
utterance (:class:`Utterance`, serialised with :meth:`Utterance.to_bytes`).  The next
ensemble step (``final_pass``, :class:`FinalPass`) re-decodes the utterance's features
with the Whisper tiny.en encoder-decoder (:class:`streamasr.rescore.WhisperRescorer`),
normalises the text to the acoustic model's vocabulary, and re-aligns it on the CTC
log-probs for word timings and confidences.  Interims are never touched, so live
captions keep CTC latency; only finals wait for the re-decode.

Pure numpy (+ onnxruntime through the rescorer); no Triton imports.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from .alignment import aligned_words
from .contract import ModelContract
from .decoding.stream import CONFIDENCE_DECIMALS, TIME_DECIMALS
from .evaluation import normalize

log = logging.getLogger("streamasr.two_pass")

#: The Whisper encoder sees at most 30 s (3000 frames of 10 ms); an utterance longer than
#: that keeps its first-pass final (the endpoint rule 3 default, 20 s, prevents it).
MAX_UTTERANCE_SECONDS = 30.0


def chunk_features(
    windows: np.ndarray, valid_outputs: list[int], contract: ModelContract
) -> np.ndarray:
    """[N, left+chunk+right, F] model windows -> the chunks' own feature frames,
    ``subsampling`` per real output frame: [sum(valid) * subsampling, F]."""
    left, sub = contract.left_frames, contract.subsampling
    parts = [windows[i, left : left + n * sub] for i, n in enumerate(valid_outputs)]
    if not parts:
        return np.zeros((0, windows.shape[-1]), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


@dataclass
class Utterance:
    """One final's utterance, sent from the decoder step to the final pass."""

    index: int  # position of the final in the response's RESULTS
    features: np.ndarray  # [T * subsampling, F] audio features
    log_probs: np.ndarray  # [T, V] CTC log-probs of the same output frames

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, index=np.int64(self.index), features=self.features, log_probs=self.log_probs)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Utterance":
        """Raises ValueError for anything but what ``to_bytes`` writes (no pickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(
                    int(z["index"]),
                    np.asarray(z["features"], np.float32),
                    np.asarray(z["log_probs"], np.float32),
                )
        except Exception as exc:  # noqa: BLE001 - zip, npy and key errors alike
            raise ValueError(
                f"UTTERANCES: not an utterance ({type(exc).__name__}: {str(exc)[:100]})"
            ) from None


class UtteranceRecorder:
    """One stream's output frames (log-probs + features) since its open utterance began.

    ``append`` each request's frames in stream order, ``cut`` a final's frames, ``trim``
    what the decoder has settled.  Holds at most ``max_frames`` output frames: past that
    the oldest are dropped and an utterance that needed them is not re-decoded.
    """

    def __init__(self, contract: ModelContract, max_seconds: float = MAX_UTTERANCE_SECONDS):
        self.sub = contract.subsampling
        self.max_frames = int(max_seconds / contract.output_frame_seconds)
        self.base = 0  # absolute output frame of the first kept frame
        self.lost_before = 0  # frames before this were dropped unrecorded
        self._lp: list[np.ndarray] = []
        self._feat: list[np.ndarray] = []

    @property
    def frames(self) -> int:
        return sum(len(x) for x in self._lp)

    def append(self, log_probs: np.ndarray, features: np.ndarray) -> None:
        if len(features) != len(log_probs) * self.sub:
            raise ValueError(
                f"internal: {len(features)} feature frames for {len(log_probs)} output frames"
            )
        if len(log_probs):
            self._lp.append(log_probs)
            self._feat.append(features)
        excess = self.frames - self.max_frames
        if excess > 0:
            self.lost_before = self.base + excess
            self.trim(self.lost_before)

    def trim(self, first: int) -> None:
        """Forget frames before absolute output frame ``first``."""
        drop = first - self.base
        if drop <= 0:
            return
        lp = np.concatenate(self._lp) if self._lp else np.zeros((0, 0), np.float32)
        feat = np.concatenate(self._feat) if self._feat else None
        self._lp = [lp[drop:]] if len(lp) > drop else []
        self._feat = [feat[drop * self.sub :]] if self._lp else []
        self.base = first

    def cut(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(features, log_probs) of output frames [first, end), or None if some of them
        were dropped (utterance longer than ``max_frames``)."""
        if first < self.lost_before or first < self.base or end > self.base + self.frames:
            return None
        lp = np.concatenate(self._lp)[first - self.base : end - self.base]
        feat = np.concatenate(self._feat)[
            (first - self.base) * self.sub : (end - self.base) * self.sub
        ]
        return feat, lp


#: Whisper writes titles abbreviated; the character model (and its training text) spells
#: what is said.
SPOKEN_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor"}


def to_vocabulary(text: str, contract: ModelContract) -> str:
    """Whisper's text -> the character model's form: lower case, numbers and titles
    spelled out, characters outside the vocabulary dropped."""
    allowed = set(contract.vocabulary)
    t = "".join(c if c in allowed else " " for c in normalize(text))
    return " ".join(SPOKEN_ABBREVIATIONS.get(w, w) for w in t.split())


def worded_finals(
    finals: list[tuple[dict, int, int]], messages: list[dict]
) -> list[tuple[int, int, int]]:
    """(position in ``messages``, first frame, end frame) of each final reported by
    ``StreamDecoder.on_final`` that is among ``messages`` and has words: the finals to
    re-decode."""
    position = {id(m): i for i, m in enumerate(messages)}
    return [
        (position[id(msg)], first, end)
        for msg, first, end in finals
        if id(msg) in position and msg["channel"]["alternatives"][0]["transcript"]
    ]


def check_contract(contract: ModelContract) -> None:
    """The re-decoder reads Whisper-style features and writes characters split by spaces."""
    f = contract.features
    problems = []
    if f.type != "log_mel" or f.n_mels != 80 or f.sample_rate != 16000 or f.hop_length != 160:
        problems.append(
            "features must be 80-bin log-mel at 16 kHz with a 10 ms shift "
            f"(Whisper's), got {f.type}/{f.n_mels} bins/{f.sample_rate} Hz/"
            f"hop {f.hop_length}"
        )
    if contract.word_boundary != "space" or " " not in contract.vocabulary:
        problems.append("the vocabulary must be characters with ' ' between words")
    if problems:
        raise ValueError(
            "two-pass finals need a Whisper-compatible acoustic model: " + "; ".join(problems)
        )


class FinalPass:
    """Rewrites finals with the re-decoded text (see the module docstring).

    ``rescorer`` has ``transcribe(features, silence) -> str``
    (:class:`streamasr.rescore.WhisperRescorer`).
    """

    def __init__(self, contract: ModelContract, rescorer):
        from .features import silence_frame

        check_contract(contract)
        self.contract = contract
        self.rescorer = rescorer
        self.silence = silence_frame(contract.features)
        self.frame_seconds = contract.output_frame_seconds

    def text(self, utt: Utterance) -> str:
        return to_vocabulary(self.rescorer.transcribe(utt.features, self.silence), self.contract)

    def rewrite(self, message: dict, utt: Utterance) -> dict:
        """The final ``message`` with its transcript, words and confidence re-decoded;
        ``first_pass_transcript`` keeps the CTC text.  If the re-decoded text cannot be
        aligned to the frames, the first-pass final is kept (``rescored: false``)."""
        alt = message["channel"]["alternatives"][0]
        text = self.text(utt)
        try:
            words = (
                aligned_words(utt.log_probs, text, self.contract.vocabulary, self.contract.blank_id)
                if text
                else []
            )
        except ValueError as exc:
            log.warning("re-decoded final kept its first pass: %s", exc)
            return {**message, "rescored": False}
        start = message["start"]
        out_words = [
            {
                "word": w,
                "start": round(start + a * self.frame_seconds, TIME_DECIMALS),
                "end": round(start + b * self.frame_seconds, TIME_DECIMALS),
                "confidence": round(c, CONFIDENCE_DECIMALS),
            }
            for w, a, b, c in words
        ]
        conf = sum(c for *_, c in words) / len(words) if words else 0.0
        return {
            **message,
            "rescored": True,
            "first_pass_transcript": alt["transcript"],
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(w["word"] for w in out_words),
                        "confidence": round(conf, CONFIDENCE_DECIMALS),
                        "words": out_words,
                    }
                ]
            },
        }

    def check(self, utt: Utterance) -> None:
        """An utterance the decoder step could have sent: bounded (a caller of this model
        must not buy unbounded Whisper time), shapes that agree, finite values."""
        c, lp, f = self.contract, utt.log_probs, utt.features
        max_frames = int(MAX_UTTERANCE_SECONDS / c.output_frame_seconds)
        if lp.ndim != 2 or lp.shape[1] != len(c.vocabulary) or not 0 < len(lp) <= max_frames:
            raise ValueError(
                f"UTTERANCES: log_probs must be [1..{max_frames}, "
                f"{len(c.vocabulary)}], got {list(lp.shape)}"
            )
        if f.shape != (len(lp) * c.subsampling, c.features.n_mels):
            raise ValueError(
                f"UTTERANCES: features must be [{len(lp) * c.subsampling}, "
                f"{c.features.n_mels}], got {list(f.shape)}"
            )
        if not (np.isfinite(f).all() and (np.isfinite(lp) | (lp == -np.inf)).all()):
            raise ValueError("UTTERANCES: NaN or infinite values")

    def process(self, messages: list[dict], utterances: list[Utterance]) -> list[dict]:
        out = list(messages)
        for utt in utterances:
            self.check(utt)
        for utt in utterances:
            if not 0 <= utt.index < len(out) or not out[utt.index].get("is_final"):
                raise ValueError(
                    f"UTTERANCES: utterance for message {utt.index}, which is not a final"
                )
            out[utt.index] = self.rewrite(out[utt.index], utt)
        return out
