"""The decoder step's side of two-pass: what a stream records for the final pass.

A stream that comes through the two-pass ensemble sends its feature windows with its
log-probs.  :class:`TwoPassRecording` keeps the frames of its open utterance
(:class:`streamasr.core.two_pass.UtteranceRecorder`), hears the finals its decoder
emits, and turns each response into the utterances the ``final_pass`` step re-decodes:
one per final with words and, for an ``interims=whisper`` stream, what its interims need.
"""

from __future__ import annotations

import logging

import numpy as np

from streamasr import protocol
from streamasr.core.decoding import StreamDecoder
from streamasr.core.state import StreamError
from streamasr.core.two_pass import (
    CARRY,
    INTERIM,
    Utterance,
    UtteranceRecorder,
    chunk_features,
    worded_finals,
)
from streamasr.protocol.contract import ModelContract

log = logging.getLogger("streamasr.two_pass_recording")

#: Whisper interims: this much audio after the last CTC word heard since the last
#: re-decode counts as a pause and asks for a re-decode at once (one chunk is 0.4 s).
PAUSE_REFRESH_S = 0.3


class TwoPassRecording:
    """One two-pass stream's recording, fed in stream order: its requests' frames go to
    its decoder through ``accept``; ``utterances`` once per response."""

    def __init__(self, contract: ModelContract, decoder: StreamDecoder, stream: int):
        self.contract = contract
        self.decoder = decoder
        self.stream = stream
        self.recorder = UtteranceRecorder(contract)
        self.finals: list[tuple[dict, int, int]] = []  # (msg, first, end) since the last response
        self.refreshed_at = 0  # output frame of the last Whisper interim re-decode
        decoder.on_final = lambda msg, first, end: self.finals.append((msg, first, end))

    @classmethod
    def start(
        cls, contract: ModelContract, decoder: StreamDecoder, stream: int, two_pass: bool
    ) -> "TwoPassRecording | None":
        """The recording of a stream that starts (None for a one-pass stream, whose
        START came without FEATURES)."""
        if two_pass:
            return cls(contract, decoder, stream)
        if decoder.config.interims == "whisper":
            raise StreamError(
                "interims=whisper needs the two-pass model "
                "(streaming_asr_two_pass): Whisper re-decodes the interims"
            )
        return None

    def accept(
        self,
        log_probs: np.ndarray,
        windows: np.ndarray | None,
        valid_outputs: list[int],
        endpoints: list[int] | tuple[int, ...] = (),
    ) -> list[dict]:
        """The decoder's messages for a request's real output frames, which are recorded
        with its windows' feature frames once the decoder accepted them (a refused
        request records nothing)."""
        if windows is None:
            raise StreamError("internal: a two-pass stream's request without FEATURES")
        msgs = self.decoder.accept(log_probs, endpoints)
        self.recorder.append(log_probs, chunk_features(windows, valid_outputs, self.contract))
        return msgs

    def utterances(self, msgs: list[dict], seq: int) -> list[Utterance]:
        """The recorded utterances of this response's finals that have words, and for an
        ``interims=whisper`` stream what its interims need; ``seq`` is the last request
        applied."""
        out = []
        for index, first, end in worded_finals(self.finals, msgs):
            cut = self.recorder.cut(first, end)
            if cut is None:
                log.info("utterance over the two-pass limit: first-pass final kept")
                continue
            features, log_probs = cut
            out.append(
                Utterance(
                    index, features, log_probs, stream=self.stream, seq=seq, start_frame=first
                )
            )
        self.finals.clear()
        if not self.decoder.closed:
            self.recorder.trim(self.decoder.utterance_start_frame)
        return out + self._interim_utterances(msgs, seq)

    def _paused(self, interim: dict, end: int) -> bool:
        words = protocol.words(interim)
        if not words:
            return False
        frame_s, offset = self.contract.output_frame_seconds, self.decoder.config.time_offset
        last = round((words[-1]["end"] - offset) / frame_s)
        return last > self.refreshed_at and (end - last) * frame_s >= PAUSE_REFRESH_S

    def _interim_utterances(self, msgs: list[dict], seq: int) -> list[Utterance]:
        """For an ``interims=whisper`` stream, what each interim of the response needs:
        the last one gets the open utterance to re-decode when it has words and
        ``interim_refresh_s`` of audio went by since the last re-decode (or the
        utterance's start); every other interim a CARRY (shown as the last re-decode of its
        utterance plus newer CTC words).  Also due at a pause: a word heard since the last
        re-decode, then ``PAUSE_REFRESH_S`` without one (the caption a reader sees when
        the speaker stops is then Whisper's)."""
        dec = self.decoder
        if dec.config.interims != "whisper":
            return []
        nothing = np.zeros((0, 0), np.float32)
        first, end = dec.utterance_start_frame, dec.frames_decoded
        interims = [
            i for i, m in enumerate(msgs) if m.get("type") == "Results" and not m.get("is_final")
        ]
        frame_s, offset = self.contract.output_frame_seconds, dec.config.time_offset
        out = [
            Utterance(
                i,
                nothing,
                nothing,
                kind=CARRY,
                stream=self.stream,
                seq=seq,
                start_frame=round((msgs[i]["start"] - offset) / frame_s),
            )
            for i in interims
        ]
        if not out or interims[-1] != len(msgs) - 1:
            return out
        since = end - max(self.refreshed_at, first)
        due = since * frame_s >= dec.config.interim_refresh_s or self._paused(msgs[-1], end)
        cut = self.recorder.cut(first, end) if due and protocol.transcript(msgs[-1]) else None
        if cut is not None:
            self.refreshed_at = end
            features, log_probs = cut
            out[-1] = Utterance(
                len(msgs) - 1,
                features,
                log_probs,
                kind=INTERIM,
                stream=self.stream,
                seq=seq,
                start_frame=first,
            )
        return out
