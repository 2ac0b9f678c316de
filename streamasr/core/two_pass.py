"""Two-pass finals: interims from streaming CTC, finals re-decoded by Whisper.

The decoder step (``ctc_decoder``) records, for streams that come through the two-pass
ensemble, the audio features and CTC log-probs of the open utterance
(:class:`UtteranceRecorder`).  When it emits a final with words it attaches that
utterance (:class:`Utterance`, serialised with :meth:`Utterance.to_bytes`).  The next
ensemble step (``final_pass``, :class:`FinalPass`) re-decodes the utterance's features
with the Whisper tiny.en encoder-decoder (:class:`streamasr.core.whisper_redecoder.WhisperRedecoder`),
normalises the text to the acoustic model's vocabulary, and re-aligns it on the CTC
log-probs for word timings and confidences.  Interims are never touched, so live
captions keep CTC latency; only finals wait for the re-decode.

Pure numpy (+ onnxruntime through the redecoder); no Triton imports.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from streamasr import protocol
from streamasr.core.alignment import aligned_words
from streamasr.core.decoding.stream import CONFIDENCE_DECIMALS, TIME_DECIMALS
from streamasr.core.text import normalize
from streamasr.protocol.contract import ModelContract

if TYPE_CHECKING:
    from streamasr.core.whisper_redecoder import EncoderWindow

log = logging.getLogger("streamasr.core.two_pass")

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


#: The encoder window of an interim refresh (EncoderWindow fields): its tail after the
#: stable words is short, and the encoder's cost grows with its window (0.05 CPU s at
#: 5 s, 0.11 at 10 s on this machine's core); a refresh whose short-window decode looks
#: degenerate is dropped (the last interim stands), not retried at 30 s.
REFRESH_WINDOW = {"min_frames": 400, "tail_frames": 0, "bucket_frames": 200}

#: Utterance kinds: a final to re-decode; for streams with Whisper interims
#: (``interims=whisper``) the open utterance to re-decode for an interim, or (no frames)
#: an interim between re-decodes, shown as the last re-decode plus the CTC words after it.
FINAL, INTERIM, CARRY = "final", "interim", "carry"
KINDS = (FINAL, INTERIM, CARRY)


@dataclass
class Utterance:
    """One utterance, sent from the decoder step to the final pass."""

    index: int  # position of its message in the response's RESULTS
    features: np.ndarray  # [T * subsampling, F] audio features
    log_probs: np.ndarray  # [T, V] CTC log-probs of the same output frames
    kind: str = FINAL
    stream: int = 0  # stream id (interims: whose agreement state)
    seq: int = 0  # the request's index in its stream
    start_frame: int = 0  # the utterance's first output frame in its stream

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            index=np.int64(self.index),
            features=self.features,
            log_probs=self.log_probs,
            kind=np.int64(KINDS.index(self.kind)),
            stream=np.uint64(self.stream),
            frames=np.array([self.seq, self.start_frame], np.int64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Utterance":
        """Raises ValueError for anything but what ``to_bytes`` writes (no pickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                stream = int(z["stream"])
                seq, start = (int(x) for x in np.asarray(z["frames"]).reshape(2))
                return cls(
                    int(z["index"]),
                    np.asarray(z["features"], np.float32),
                    np.asarray(z["log_probs"], np.float32),
                    KINDS[int(z["kind"])],
                    stream,
                    seq,
                    start,
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
#: Characters around a written word that are not part of it (for ``punctuated_word``).
PUNCTUATION = "\"'.,;:!?()[]{}-\u2026\u2019\u2018\u201c\u201d"


def to_vocabulary(text: str, contract: ModelContract) -> str:
    """Whisper's text -> the character model's form: lower case, numbers and titles
    spelled out, characters outside the vocabulary dropped."""
    allowed = set(contract.vocabulary)
    t = "".join(c if c in allowed else " " for c in normalize(text))
    return " ".join(SPOKEN_ABBREVIATIONS.get(w, w) for w in t.split())


class WhisperText(str):
    """Whisper's text in the character model's form (the ``str``), with the text as
    Whisper wrote it (``written``: cased and punctuated) kept for ``punctuated_word``."""

    written: str

    def __new__(cls, text: str, written: str) -> "WhisperText":
        self = super().__new__(cls, text)
        self.written = written
        return self


def written_words(written: str, contract: ModelContract) -> list[tuple[str, str]]:
    """Whisper's text as (word in the model's form, that word as Whisper wrote it), in
    order.  A written token that becomes several words ("100" -> "one hundred") keeps
    its leading punctuation and capital on the first, its trailing punctuation on the
    last; a token of punctuation alone joins the word before it."""
    out: list[tuple[str, str]] = []
    for token in written.split():
        pieces = to_vocabulary(token, contract).split()
        if not pieces:
            if out:
                out[-1] = (out[-1][0], out[-1][1] + token)
            continue
        if len(pieces) == 1:
            out.append((pieces[0], token))
            continue
        core = token.strip(PUNCTUATION)
        lead, trail = (
            token[: token.find(core)] if core else token,
            token[len(token.rstrip(PUNCTUATION)) :],
        )
        first = pieces[0].capitalize() if core[:1].isupper() else pieces[0]
        shown = [lead + first, *pieces[1:-1], pieces[-1] + trail]
        out += list(zip(pieces, shown))
    return out


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
        if id(msg) in position and protocol.transcript(msg)
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


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def drop_overlap(said: list[str], tail: list[str], longest: int = 3) -> list[str]:
    """``tail`` without the words it repeats from the end of ``said`` (a tail cut at a
    word's aligned end may hear that word again): the longest such overlap, up to
    ``longest`` words, is dropped."""
    for n in range(min(longest, len(said), len(tail)), 0, -1):
        if said[-n:] == tail[:n]:
            return tail[n:]
    return tail


@dataclass
class Refresh:
    """A Whisper re-decode of a stream's open utterance to send as its own interim."""

    stream: int
    utt: Utterance  # INTERIM: the whole open utterance's frames
    message: dict  # the first-pass interim it was asked with


@dataclass
class LocalAgreement:
    """One stream's Whisper interims (the LocalAgreement-2 policy of whisper_streaming):
    words that two consecutive re-decodes of the open utterance agree on, from its start,
    become *stable*: later interims of the utterance show them unchanged, followed by the
    newest re-decode's words after them (the unstable tail).  The utterance's final is
    re-decoded afresh and may still differ.

    ``update(start_frame, seq, words)`` -> (words to show, how many of them are stable).
    A re-decode of an older request (``seq`` below the last one seen, possible when
    re-decodes are batched out of order) is shown but does not move the agreement.
    """

    start_frame: int = -1
    seq: int = -1
    previous: list[str] = field(default_factory=list)
    stable: list[str] = field(default_factory=list)
    shown: list[dict] = field(default_factory=list)  # the last re-decode's timed words
    stable_end: int = 0  # output frame (in the utterance) where the last stable word ends
    # the newest first-pass interim of the stream and its utterance's first frame: what a
    # late refresh adds newer CTC words from (-1: the utterance ended, refreshes are stale)
    latest: dict = field(default_factory=dict)
    latest_start: int = -1
    latest_seq: int = -1

    def update(self, start_frame: int, seq: int, words: list[str]) -> tuple[list[str], int]:
        if start_frame != self.start_frame:  # a new utterance: nothing agreed yet
            self.start_frame, self.seq, self.previous, self.stable = start_frame, -1, [], []
            self.shown, self.stable_end = [], 0
        if seq > self.seq:
            agreed = self.previous[: common_prefix(self.previous, words)]
            if len(agreed) > len(self.stable) and agreed[: len(self.stable)] == self.stable:
                self.stable = agreed
            self.seq, self.previous = seq, list(words)
        return self.stable + words[len(self.stable) :], len(self.stable)


class FinalPass:
    """Rewrites finals (and, for ``interims=whisper`` streams, interims) with Whisper's
    re-decode (see the module docstring).

    ``redecoder`` has ``transcribe_many(features_list, silence) -> [Decoded]``
    (:class:`streamasr.core.whisper_redecoder.WhisperRedecoder`).  ``interim_ttl_s``: a stream's
    agreement state is forgotten after this long without a re-decode (Triton never says
    when a stream times out).  ``refresh_redecoder`` re-decodes interim refreshes
    (default: ``redecoder``).
    """

    def __init__(
        self,
        contract: ModelContract,
        redecoder,
        interim_ttl_s: float = 60.0,
        refresh_window: "EncoderWindow | None" = None,
        refresh_redecoder=None,
    ):
        from streamasr.core.features import silence_frame
        from streamasr.core.state import StreamStore
        from streamasr.core.whisper_redecoder import EncoderWindow

        self.refresh_window = refresh_window or EncoderWindow(**REFRESH_WINDOW)
        # interim refreshes may use cheaper graphs (int8) than finals
        self.refresh_redecoder = refresh_redecoder or redecoder
        check_contract(contract)
        self.contract = contract
        self.redecoder = redecoder
        self.silence = silence_frame(contract.features)
        self.frame_seconds = contract.output_frame_seconds
        self.agreements: StreamStore[LocalAgreement] = StreamStore(interim_ttl_s)

    def texts(self, utts: list[Utterance]) -> list[str]:
        decoded = self.redecoder.transcribe_many([u.features for u in utts], self.silence)
        return [WhisperText(to_vocabulary(d.text, self.contract), d.text) for d in decoded]

    def text(self, utt: Utterance) -> str:
        return self.texts([utt])[0]

    def _words(self, message: dict, utt: Utterance, text: str) -> list[dict] | None:
        """Whisper's words timed by forced alignment on the utterance's CTC log-probs, or
        None if the text cannot be aligned to those frames."""
        try:
            words = (
                aligned_words(utt.log_probs, text, self.contract.vocabulary, self.contract.blank_id)
                if text
                else []
            )
        except ValueError as exc:
            log.info("re-decoded %s kept its first pass: %s", utt.kind, exc)
            return None
        start = message["start"]
        return [
            {
                "word": w,
                "start": round(start + a * self.frame_seconds, TIME_DECIMALS),
                "end": round(start + b * self.frame_seconds, TIME_DECIMALS),
                "confidence": round(c, CONFIDENCE_DECIMALS),
            }
            for w, a, b, c in words
        ]

    @staticmethod
    def _with_words(message: dict, words: list[dict], **extra) -> dict:
        conf = sum(w["confidence"] for w in words) / len(words) if words else 0.0
        return {
            **message,
            **extra,
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(w["word"] for w in words),
                        "confidence": round(conf, CONFIDENCE_DECIMALS),
                        "words": words,
                    }
                ]
            },
        }

    def rewrite(self, message: dict, utt: Utterance, text: str | None = None) -> dict:
        """The final ``message`` with its transcript, words and confidence re-decoded;
        ``first_pass_transcript`` keeps the CTC text.  If the re-decoded text cannot be
        aligned to the frames, the first-pass final is kept (``rescored: false``)."""
        text = self.text(utt) if text is None else text
        words = self._words(message, utt, text)
        if words is None:
            return {**message, "rescored": False}
        written = getattr(text, "written", None)
        pairs = written_words(written, self.contract) if written else []
        if [p for p, _ in pairs] == [w["word"] for w in words]:  # else none: not aligned
            for w, (_, shown) in zip(words, pairs):
                w["punctuated_word"] = shown
        return self._with_words(
            message, words, rescored=True, first_pass_transcript=(protocol.transcript(message))
        )

    def _agreement(self, stream: int) -> LocalAgreement:
        with self.agreements.lock:
            self.agreements.sweep()  # so that `in` and `get` agree
            return (
                self.agreements.get(stream)
                if stream in self.agreements
                else self.agreements.create(stream, LocalAgreement())
            )

    def _tail(self, utt: Utterance) -> tuple[np.ndarray, list[str], int]:
        """What a refresh of ``utt`` decodes: its features after the last stable word
        (whisper_streaming's buffer trimming), the stable words said before them, and
        the output frame the features start at."""
        state = self._agreement(utt.stream)
        with self.agreements.lock:
            if state.start_frame != utt.start_frame:
                return utt.features, [], 0
            cut = min(state.stable_end, len(utt.log_probs))
            return utt.features[cut * self.contract.subsampling :], list(state.stable), cut

    def _prompts(self, said: list[list[str]]) -> list[list[int]] | None:
        """The stable words as Whisper prompt tokens (None: a re-decoder without a
        tokenizer, e.g. a test double, decodes without prompts)."""
        encode = getattr(self.refresh_redecoder, "encode_prompt", None)
        return [encode(w) for w in said] if encode is not None else None

    def refresh_many(self, refreshes: list[Refresh]) -> list[dict | None]:
        """Re-decode each refresh's unsettled tail (batched), agree it with the stream's
        last re-decode (:class:`LocalAgreement`) and build the interim to send: stable
        words, the new tail, then the CTC words of the stream's newest interim heard
        since.  None where the utterance ended meanwhile (its final says more), or the
        tail's decode was rejected or cannot be aligned: the last interim stands."""
        if not refreshes:
            return []
        tails = [self._tail(r.utt) for r in refreshes]
        kw = {}
        prompts = self._prompts([said for _, said, _ in tails])
        if prompts is not None:
            kw["prompts"] = prompts
        decoded = self.refresh_redecoder.transcribe_many(
            [f for f, _, _ in tails],
            self.silence,
            whole_window_retry=False,
            window=self.refresh_window,
            **kw,
        )
        out: list[dict | None] = []
        for r, (_, said, _), d in zip(refreshes, tails, decoded):
            if getattr(d, "rejected", None):
                log.info("interim refresh rejected: %s", d.rejected)
                out.append(None)
                continue
            tail = to_vocabulary(d.text, self.contract).split()
            out.append(self.rewrite_interim(r.message, r.utt, said + drop_overlap(said, tail)))
        return out

    def rewrite_interim(self, message: dict, utt: Utterance, words_heard: list[str]) -> dict | None:
        """The interim to send after a refresh of ``utt`` heard ``words_heard`` (see
        :class:`LocalAgreement`); stable words carry ``stable: true``, the tail ``stable:
        false``, and ``refresh: true`` marks it as sent on its own, not as the answer to a
        request.  None if the utterance ended meanwhile or the text cannot be aligned."""
        state = self._agreement(utt.stream)
        with self.agreements.lock:
            if state.latest_start != utt.start_frame:
                return None  # the utterance ended: its final (re-decoded) replaces this
            shown, n_stable = state.update(utt.start_frame, utt.seq, words_heard)
            words = self._words(message, utt, " ".join(shown))
            if words is None:
                return None
            for i, w in enumerate(words):
                w["stable"] = i < n_stable
            if utt.seq >= state.seq:
                state.shown = words
                if n_stable:
                    # cut between the last stable word and the next (CTC spikes mark
                    # letters, not a word's last sound): a tail cut at the stable word's
                    # aligned end would start inside it
                    cut = words[n_stable - 1]["end"]
                    if n_stable < len(words):
                        cut = (cut + words[n_stable]["start"]) / 2
                    state.stable_end = round((cut - message["start"]) / self.frame_seconds)
            latest = state.latest
        cut = words[-1]["end"] if words else -1.0
        newer = [{**w, "stable": False} for w in protocol.words(latest) if w["start"] >= cut]
        return self._with_words(
            latest,
            words + newer,
            rescored=True,
            refresh=True,
            first_pass_transcript=protocol.transcript(latest),
        )

    def is_open(self, refresh: Refresh) -> bool:
        """Whether the refresh's utterance is still open (no final noted); hold
        ``agreements.lock`` from this check until the refresh is sent, so that it cannot
        be sent after its utterance's final."""
        state = self._agreement(refresh.stream)
        return state.latest_start == refresh.utt.start_frame

    def note_interim(self, message: dict, utt: Utterance) -> None:
        """A first-pass interim of a Whisper-interims stream passed: the newest CTC words
        a late refresh adds (FINAL: the utterance ended, its pending refreshes are stale)."""
        state = self._agreement(utt.stream)
        with self.agreements.lock:
            if utt.seq < state.latest_seq:
                return  # the ensemble let an older request overtake: not news
            state.latest_seq = utt.seq
            if utt.kind == FINAL:
                if state.latest_start == utt.start_frame:
                    state.latest_start = -1
            else:
                state.latest, state.latest_start = message, utt.start_frame

    def carry_interim(self, message: dict, utt: Utterance) -> dict:
        """An interim between re-decodes: the last re-decode's words of this utterance,
        then the CTC words that start after them (``stable: false``); only CTC words
        (all unstable) before the utterance's first re-decode."""
        state = self._agreement(utt.stream)
        ctc = protocol.words(message)
        with self.agreements.lock:
            whisper = [dict(w) for w in state.shown] if state.start_frame == utt.start_frame else []
        cut = whisper[-1]["end"] if whisper else -1.0
        words = whisper + [{**w, "stable": False} for w in ctc if w["start"] >= cut]
        return self._with_words(
            message,
            words,
            rescored=bool(whisper),
            first_pass_transcript=protocol.transcript(message),
        )

    def check(self, utt: Utterance) -> None:
        """An utterance the decoder step could have sent: bounded (a caller of this model
        must not buy unbounded Whisper time), shapes that agree, finite values."""
        c, lp, f = self.contract, utt.log_probs, utt.features
        if utt.kind == CARRY:
            if lp.size or f.size:
                raise ValueError("UTTERANCES: a carried interim has no frames")
            return
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

    def _checked(self, messages: list[dict], utterances: list[Utterance]) -> None:
        for utt in utterances:
            self.check(utt)
            want_final = utt.kind == FINAL
            if (
                not 0 <= utt.index < len(messages)
                or messages[utt.index].get("type") != "Results"
                or bool(messages[utt.index].get("is_final")) != want_final
            ):
                raise ValueError(
                    f"UTTERANCES: {utt.kind} utterance for message "
                    f"{utt.index}, which is not {'a final' if want_final else 'an interim'}"
                )

    def answer_many(
        self, batch: list[tuple[list[dict], list[Utterance]]]
    ) -> tuple[list[list[dict] | ValueError], list[Refresh | None]]:
        """Many requests' (messages, utterances) answered: finals re-decoded (all in one
        ``transcribe_many`` call, batched by the redecoder), interims answered at once as
        carried ones (last re-decode + newer CTC words).  Per request also the refresh
        its INTERIM utterance asks for (None: none), for :meth:`refresh_many` later, off
        the request's path.  A request whose utterances are invalid gets its ValueError;
        the others are unaffected."""
        results: list[list[dict] | ValueError] = []
        refreshes: list[Refresh | None] = []
        todo: list[tuple[int, Utterance]] = []
        for i, (messages, utterances) in enumerate(batch):
            refreshes.append(None)
            try:
                self._checked(messages, utterances)
            except ValueError as exc:
                results.append(exc)
                continue
            results.append(list(messages))
            todo += [(i, u) for u in utterances]
        for i, utt in todo:  # first: a final makes its utterance's refreshes stale at once
            out = results[i]
            assert isinstance(out, list)
            self.note_interim(out[utt.index], utt)
        finals = [(i, u) for i, u in todo if u.kind == FINAL]
        texts = self.texts([u for _, u in finals]) if finals else []
        for (i, utt), text in zip(finals, texts):
            out = results[i]
            assert isinstance(out, list)
            out[utt.index] = self.rewrite(out[utt.index], utt, text)
        for i, utt in todo:  # in request order: a stream's interims follow each other
            out = results[i]
            assert isinstance(out, list)
            if utt.kind == FINAL:
                continue
            if utt.kind == INTERIM:
                refreshes[i] = Refresh(utt.stream, utt, out[utt.index])
            out[utt.index] = self.carry_interim(out[utt.index], utt)
        return results, refreshes

    def process_many(
        self, batch: list[tuple[list[dict], list[Utterance]]]
    ) -> list[list[dict] | ValueError]:
        """:meth:`answer_many` with each refresh done at once and shown in place of its
        carried interim (in-process callers; the server sends refreshes on their own)."""
        results, refreshes = self.answer_many(batch)
        due = [(i, r) for i, r in enumerate(refreshes) if r is not None]
        for (i, r), msg in zip(due, self.refresh_many([r for _, r in due])):
            out = results[i]
            if msg is not None and isinstance(out, list):
                out[r.utt.index] = {k: v for k, v in msg.items() if k != "refresh"}
        return results

    def process(self, messages: list[dict], utterances: list[Utterance]) -> list[dict]:
        out = self.process_many([(messages, utterances)])[0]
        if isinstance(out, ValueError):
            raise out
        return out
