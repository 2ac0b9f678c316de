"""One stream's decoder: log-prob frames in, Deepgram-live-like result messages out.

See the package docstring (``streamasr.core.decoding``) for the semantics and
:data:`streamasr.core.decoding.schema.results_schema_doc` for every message field.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from streamasr import protocol
from streamasr.core.alignment import aligned_words
from streamasr.core.decoding.config import DecoderConfig, EndpointConfig
from streamasr.core.decoding.search import (
    BeamOptions,
    BeamSearch,
    ContextGraph,
    GreedySearch,
    Token,
    alignment,
)
from streamasr.core.decoding.text import TokenText
from streamasr.protocol.contract import ModelContract

log = logging.getLogger("streamasr.core.decoding")

#: Times in messages are rounded to this many decimals (1 ms): output frames are tens of
#: milliseconds long, and rounding keeps float noise (0.30000000000000004) out of JSON.
TIME_DECIMALS = 3
#: Confidences are rounded to this many decimals.
CONFIDENCE_DECIMALS = 4
#: Tolerance when converting a duration in seconds into a whole number of frames.
FRAME_EPSILON = 1e-9


def seconds_to_frames(seconds: float, frame_seconds: float) -> int:
    """The least number of frames lasting at least ``seconds`` (0 stays 0)."""
    if seconds <= 0:
        return 0
    return max(1, math.ceil(seconds / frame_seconds - FRAME_EPSILON))


class StreamDecoder:
    """Decodes one stream; create one per stream (it is not thread-safe).

    ``accept(log_probs)`` -> messages for this request, ending with one interim;
    ``finalize()`` -> a final with ``from_finalize=true`` (stream stays open);
    ``close()`` -> the open utterance's final (if it has words) and a due UtteranceEnd;
    ``keepalive()`` -> [] (no audio means nothing changes).

    ``on_final(message, first_frame, end_frame)``, if set, is called with every final as
    it is built: the output frames ``[first_frame, end_frame)`` its utterance spans (the
    two-pass decoder step keeps those frames' audio features for the re-decode).
    """

    #: Called with (final message, first frame, end frame) of each final; see above.
    on_final: Optional[Callable[[dict, int, int], None]] = None

    def __init__(
        self,
        contract: ModelContract,
        config: Optional[DecoderConfig] = None,
        endpoint: Optional[EndpointConfig] = None,
    ):
        self.contract = contract
        self.config = config or DecoderConfig()
        self.endpoint = endpoint or EndpointConfig()
        self.text = TokenText(contract)
        self.vocab_size = len(contract.vocabulary)
        self.frame_seconds = contract.output_frame_seconds
        # the open utterance's frames, kept to re-align beam finals (see _realign)
        self._utt_rows: Optional[list[np.ndarray]] = (
            [] if self.config.decoding == "beam" and self.text.boundary == "space" else None
        )
        self._char_tokens = frozenset(t for t in contract.vocabulary if len(t) == 1)
        self.search = self._build_search()
        ep, fs = self.endpoint, self.frame_seconds
        self._rule1 = seconds_to_frames(ep.rule1_min_trailing_silence, fs)
        self._rule2 = seconds_to_frames(ep.rule2_min_trailing_silence, fs)
        self._rule3 = seconds_to_frames(ep.rule3_min_utterance_length, fs)
        self._utt_end = seconds_to_frames(ep.utterance_end, fs)
        self._frames = 0  # output frames consumed
        self._utt_start = 0  # first frame of the open utterance
        self._pending_end: Optional[int] = None  # end frame of the last finalized word
        self._closed = False
        self._last_word_end_frame: Optional[int] = None  # of the last built message

    def _build_search(self):
        cfg = self.config
        if cfg.decoding == "greedy":
            if cfg.hotwords:
                raise ValueError("hotwords: need decoding=beam")
            # lm_path is fused by the beam search only: a stream that picks greedy (the
            # cheapest path) opts out of the server's default LM.
            return GreedySearch(self.text)
        context = None
        if cfg.hotwords:
            phrases = []
            for phrase, boost in cfg.hotwords:
                try:
                    tokens = self.text.encode(phrase)
                except ValueError:
                    try:
                        tokens = self.text.encode(phrase.lower())
                    except ValueError as exc:
                        raise ValueError(f"hotwords: {exc}") from None
                phrases.append((tokens, boost))
            context = ContextGraph(phrases)
        lm = None
        if cfg.lm_path:
            from streamasr.core.decoding.lm import WordLM

            spellable = frozenset(
                c
                for i, piece in enumerate(self.text.piece)
                if not self.text.is_separator[i]
                for c in piece
            )
            lm = WordLM(
                cfg.lm_path,
                cfg.lm_alpha,
                cfg.lm_beta,
                cfg.lm_partial_words,
                spellable,
                cfg.lm_oov_letter_log10,
            )
        return BeamSearch(
            self.text,
            BeamOptions(cfg.beam_size, cfg.beam_top_k, cfg.beam_min_token_logp),
            context,
            lm,
        )

    # -- public API ------------------------------------------------------------------------
    @property
    def frames_decoded(self) -> int:
        """Output frames consumed so far (time = frame index * output_frame_seconds)."""
        return self._frames

    @property
    def utterance_start_frame(self) -> int:
        """First output frame of the open utterance (earlier frames are settled)."""
        return self._utt_start

    @property
    def closed(self) -> bool:
        return self._closed

    def accept(self, log_probs: np.ndarray, endpoints: Sequence[int] = ()) -> list[dict]:
        """Consume this request's frames ``[T, V]`` (T may be 0), in stream order.
        ``endpoints``: stream frame indices (within this request's frames, ends included)
        where the voice-activity detector heard the utterance end."""
        self._check_open("accept")
        lp = self._checked(log_probs)
        vad_ends = self._checked_endpoints(endpoints, lp.shape[0])
        msgs: list[dict] = []
        self.search.begin_block(lp)
        if self._frames in vad_ends:
            self._vad_endpoint(msgs)
        for i in range(lp.shape[0]):
            if self._utt_rows is not None:
                self._utt_rows.append(lp[i])
            self.search.step(i, self._frames)
            self._frames += 1
            if self._frames in vad_ends:
                self._vad_endpoint(msgs)
            self._check_endpoint(msgs)
            self._check_utterance_end(msgs)
        msgs.append(self._results(self.search.best_tail, is_final=False))
        return msgs

    def finalize(self) -> list[dict]:
        """Flush the open utterance as a final (``from_finalize=true``), even if empty."""
        self._check_open("finalize")
        msgs = [self._final(speech_final=False, from_finalize=True)]
        self._check_utterance_end(msgs)
        return msgs

    def close(self) -> list[dict]:
        """End of stream: the open utterance's final, then an UtteranceEnd if one is
        owed (the end of the stream counts as silence after the last word)."""
        if self._closed:
            return []
        msgs: list[dict] = []
        if self.search.n_text > 0 or self.endpoint.empty_finals:
            msgs.append(self._final(speech_final=False, from_finalize=False))
        if self._pending_end is not None and self._utt_end:
            msgs.append(self._utterance_end())
        self._closed = True
        log.debug("stream closed after %d frames", self._frames)
        return msgs

    def keepalive(self) -> list[dict]:
        """No audio: nothing changes, so nothing is sent."""
        self._check_open("keepalive")
        return []

    # -- internals -------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}() on a closed stream")

    def _checked(self, log_probs) -> np.ndarray:
        lp = np.asarray(log_probs, dtype=np.float32)
        if lp.size == 0:
            return np.zeros((0, self.vocab_size), np.float32)
        if lp.ndim != 2 or lp.shape[1] != self.vocab_size:
            raise ValueError(f"log_probs must be [T, {self.vocab_size}], got {list(lp.shape)}")
        if not np.all(np.isfinite(lp) | (lp == -np.inf)):
            raise ValueError("log_probs contain NaN or +inf")
        return lp

    def _checked_endpoints(self, endpoints: Sequence[int], frames: int) -> frozenset[int]:
        ends = frozenset(int(e) for e in endpoints)
        if any(not self._frames <= e <= self._frames + frames for e in ends):
            raise ValueError(
                f"endpoints {sorted(ends)} must lie within this request's frames "
                f"[{self._frames}, {self._frames + frames}]"
            )
        return ends if self.endpoint.endpointing else frozenset()

    def _vad_endpoint(self, msgs: list[dict]) -> None:
        """The detector heard the speaker stop: the utterance ends here (speech_final);
        with nothing decoded it restarts silently (an empty final with empty_finals)."""
        if self.search.n_text > 0 or self.endpoint.empty_finals:
            msgs.append(self._final(speech_final=True, from_finalize=False))
        else:
            self.search.finish()
            self._new_utterance()

    def _check_endpoint(self, msgs: list[dict]) -> None:
        if not self.endpoint.endpointing:
            return
        length = self._frames - self._utt_start
        tail = self.search.best_tail
        trailing = self._frames - (tail.end + 1) if tail is not None else length
        has_text = self.search.n_text > 0
        rule1 = bool(self._rule1) and trailing >= self._rule1
        rule2 = bool(self._rule2) and has_text and trailing >= self._rule2
        rule3 = bool(self._rule3) and length >= self._rule3
        if not (rule1 or rule2 or rule3):
            return
        if has_text or self.endpoint.empty_finals:
            msgs.append(self._final(speech_final=rule1 or rule2, from_finalize=False))
        else:
            log.debug("endpoint with nothing decoded at frame %d: utterance reset", self._frames)
            self.search.finish()
            self._new_utterance()

    def _check_utterance_end(self, msgs: list[dict]) -> None:
        if self._pending_end is None or not self._utt_end:
            return
        if self.search.n_text > 0:  # speech resumed before the gap: no UtteranceEnd
            self._pending_end = None
        elif self._frames - self._pending_end >= self._utt_end:
            msgs.append(self._utterance_end())

    def _utterance_end(self) -> dict:
        assert self._pending_end is not None  # callers check
        msg = {"type": "UtteranceEnd", "last_word_end": self._time(self._pending_end)}
        self._pending_end = None
        return msg

    def _final(self, speech_final: bool, from_finalize: bool) -> dict:
        msg = self._results(
            self.search.finish(),
            is_final=True,
            speech_final=speech_final,
            from_finalize=from_finalize,
        )
        if self._utt_rows is not None:
            self._realign(msg)
        words = protocol.words(msg)
        if words:
            self._pending_end = self._last_word_end_frame
        if self.on_final is not None:
            self.on_final(msg, self._utt_start, self._frames)
        self._new_utterance()
        return msg

    def _new_utterance(self) -> None:
        self.search.reset()
        self._utt_start = self._frames
        if self._utt_rows is not None:
            self._utt_rows = []

    def _realign(self, msg: dict) -> None:
        """Beam finals: word times and confidences from a forced alignment of the final
        text on the utterance's frames (the single best path), because the beam keeps
        per prefix only the alignment of its best contribution frame by frame, which
        can be frames off once the LM reorders prefixes.  Interims keep the beam's."""
        alt = protocol.alternative(msg)
        if not alt["words"] or not self._utt_rows:
            return
        if not set(alt["transcript"]) <= self._char_tokens:
            return  # e.g. an imported vocabulary with multi-character tokens ("<unk>")
        try:
            spans = aligned_words(
                np.stack(self._utt_rows),
                alt["transcript"],
                self.text.vocabulary,
                self.text.blank_id,
            )
        except ValueError:  # not alignable (a token carried over a boundary): keep beam's
            return
        words: list[dict[str, Any]] = []
        for word, first, end, conf in spans:
            words.append(
                {
                    "word": word,
                    "start": self._time(self._utt_start + first),
                    "end": self._time(self._utt_start + end),
                    "confidence": round(conf, CONFIDENCE_DECIMALS),
                }
            )
        self._last_word_end_frame = self._utt_start + spans[-1][2]
        alt["words"] = words
        alt["confidence"] = round(
            sum(w["confidence"] for w in words) / len(words), CONFIDENCE_DECIMALS
        )

    def _time(self, frame: int) -> float:
        return round(self.config.time_offset + frame * self.frame_seconds, TIME_DECIMALS)

    def _results(
        self,
        tail: Optional[Token],
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> dict:
        toks = alignment(tail)
        words: list[dict[str, Any]] = []
        confidences = []
        self._last_word_end_frame = None
        for w in self.text.words([x.tok for x in toks]):
            first, last = toks[w.tokens[0]], toks[w.tokens[-1]]
            conf = sum(toks[j].peak for j in w.tokens) / len(w.tokens)
            confidences.append(conf)
            self._last_word_end_frame = last.end + 1
            words.append(
                {
                    "word": w.text,
                    "start": self._time(first.start),
                    "end": self._time(last.end + 1),
                    "confidence": round(conf, CONFIDENCE_DECIMALS),
                }
            )
        confidence = sum(confidences) / len(confidences) if confidences else 0.0
        start = self._time(self._utt_start)
        return {
            "type": "Results",
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "start": start,
            "duration": round(self._time(self._frames) - start, TIME_DECIMALS),
            "channel": {
                "alternatives": [
                    {
                        "transcript": " ".join(w["word"] for w in words),
                        "confidence": round(confidence, CONFIDENCE_DECIMALS),
                        "words": words,
                    }
                ]
            },
        }


def decode_whole(
    contract: ModelContract,
    log_probs: np.ndarray,
    config: Optional[DecoderConfig] = None,
    endpoint: Optional[EndpointConfig] = None,
) -> list[dict]:
    """Every message a stream would get for the whole matrix sent at once, then closed."""
    dec = StreamDecoder(contract, config=config, endpoint=endpoint)
    return dec.accept(log_probs) + dec.close()
