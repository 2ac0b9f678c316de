"""Decoder step of the `streaming_asr` ensemble: log-probs -> JSON result messages.

Per stream it keeps a ``StreamDecoder`` (streamasr.core.decoding).  Requests are processed in
stream order (``StepInfo.seq``): should an earlier request of the same stream still be on
its way through the acoustic model, a later one waits in a small reorder buffer.

Streams that come through the two-pass ensemble also send their feature windows
(FEATURES); the step then records each utterance and attaches it to the final for the
``final_pass`` step to re-decode (:mod:`streamasr.core.two_pass`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamasr import protocol
from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder
from streamasr.core.decoding.config import SERVER_ONLY_PARAMETERS
from streamasr.core.features import real_output_frames
from streamasr.core.state import StreamError, StreamStore
from streamasr.core.two_pass import (
    CARRY,
    INTERIM,
    Utterance,
    UtteranceRecorder,
    chunk_features,
    worded_finals,
)
from streamasr.pipeline.common import (
    ModelConfig,
    parse_float,
    parse_int,
    read_config,
    stream_idle_timeout,
)
from streamasr.pipeline.step_info import StepInfo
from streamasr.protocol.contract import ModelContract

log = logging.getLogger("streamasr.ctc_decoder")

# config.pbtxt parameters of the decoder model that are not decoder options.
STEP_PARAMETERS = (
    "acoustic_model",
    "stream_idle_timeout_s",
    "max_streams",
    "reorder_timeout_s",
    "max_parked_bytes_per_stream",
    "max_parked_bytes",
)

# How long a stream's later requests wait for an earlier one that has not reached the
# decoder (config `reorder_timeout_s`).  Inside the ensemble a request overtakes another
# by about one acoustic-model batch (milliseconds; seconds on an overloaded host); a
# request cancelled between steps never comes, and without a deadline its stream would
# answer "OK, empty" to everything until the TTL.
DEFAULT_REORDER_TIMEOUT_S = 10.0
# Out-of-order requests one stream may hold (config `max_parked_bytes_per_stream`): room
# for ~10 of the largest requests the feature step sends (32 windows: 74 kB of log-probs
# plus 1.5 MB of two-pass features); direct callers can send far larger ones.
DEFAULT_MAX_PARKED_BYTES_PER_STREAM = 16 << 20
# ... and all streams together (config `max_parked_bytes`): what reordering may cost the
# decoder process at most, whoever sends.
DEFAULT_MAX_PARKED_BYTES = 64 << 20
MB = 1 << 20


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def split_options(
    options: dict[str, Any], server_side: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options -> (decoder options, endpoint options); unknown keys are an error, and so
    are server-only ones (a file path, say) unless they come from config.pbtxt."""
    server_only = sorted(set(options) & SERVER_ONLY_PARAMETERS)
    if server_only and not server_side:
        raise ValueError(f"option(s) {server_only} can only be set in config.pbtxt")
    dec_keys, end_keys = _field_names(DecoderConfig), _field_names(EndpointConfig)
    unknown = sorted(set(options) - dec_keys - end_keys)
    if unknown:
        raise ValueError(
            f"unknown stream option(s) {unknown}; known: {sorted(dec_keys | end_keys)}"
        )
    return (
        {k: v for k, v in options.items() if k in dec_keys},
        {k: v for k, v in options.items() if k in end_keys},
    )


@dataclass
class DecoderDefaults:
    """Model-level decoder settings from config.pbtxt; streams may override them."""

    decoder: dict[str, Any] = field(default_factory=dict)
    endpoint: dict[str, Any] = field(default_factory=dict)

    def configs(self, options: dict[str, Any]) -> tuple[DecoderConfig, EndpointConfig]:
        dec, end = split_options(options)
        return (
            DecoderConfig.from_parameters({**self.decoder, **dec}),
            EndpointConfig.from_parameters({**self.endpoint, **end}),
        )

    def validate(self, options: dict[str, Any]) -> None:
        self.configs(options)


#: The declared decoder/endpoint defaults: ``DecoderConfig`` and ``EndpointConfig`` in
#: streamasr/core/decoding/config.py, with no config.pbtxt overrides.  A ctc_decoder model's
#: parameters override them (``build_defaults``).
DECLARED_DEFAULTS = DecoderDefaults()


def validate_stream_options(options: dict[str, Any]) -> None:
    """Refuse (ValueError) the per-stream options a ctc_decoder would refuse at START,
    without reading its config: checked against the declared defaults.  Whether a stream
    option is valid does not depend on the values a ctc_decoder config serves: each option
    is parsed and range-checked on its own (tests/unit/test_repository.py checks the two agree),
    and the one option naming a file (``lm_path``) is config-only.  The feature step calls
    this at START, so a stream refused there has state in neither step."""
    DECLARED_DEFAULTS.validate(options)


@dataclass
class DecoderRequest:
    log_probs: np.ndarray  # [N, T, V]
    info: StepInfo
    features: np.ndarray | None = None  # [N, window, F]: two-pass streams only


@dataclass
class _Stream:
    decoder: StreamDecoder | None = None  # None until its START arrives
    next_seq: int = 0
    pending: dict[int, DecoderRequest] = field(default_factory=dict)
    closed: bool = False
    parked_bytes: int = 0  # size of `pending`
    gap_since: float | None = None  # when `pending` began waiting
    failed: str | None = None  # why this stream cannot go on
    recorder: UtteranceRecorder | None = None  # two-pass streams only
    finals: list[tuple[dict, int, int]] = field(default_factory=list)  # (msg, first, end)
    refreshed_at: int = 0  # output frame of the last Whisper interim re-decode


class CtcDecoderStep:
    """All streams of the decoder model.  Streams are identified by the ``StepInfo`` the
    feature step attaches (not by Triton's sequence batcher), and each stream's requests
    are applied in ``seq`` order whatever order they arrive in."""

    def __init__(
        self,
        contract: ModelContract,
        defaults: DecoderDefaults,
        idle_timeout_s: float,
        max_streams: int | None = None,
        max_pending: int = 64,
        reorder_timeout_s: float = DEFAULT_REORDER_TIMEOUT_S,
        max_parked_bytes_per_stream: int = DEFAULT_MAX_PARKED_BYTES_PER_STREAM,
        max_parked_bytes: int = DEFAULT_MAX_PARKED_BYTES,
        clock=time.monotonic,
    ):
        self.contract = contract
        self.defaults = defaults
        defaults.validate({})  # fail at load time on a bad config.pbtxt value
        self.store: StreamStore[_Stream] = StreamStore(
            idle_timeout_s, clock=clock, max_streams=max_streams
        )
        self.max_pending = max_pending
        # Independent of the TTL: a stream with a gap keeps being touched by the requests
        # that park, so the TTL alone never frees it; one swept by the TTL first still
        # leaves its parked requests here until the gap expires.
        self.reorder_timeout_s = reorder_timeout_s
        self.max_parked_bytes_per_stream = max_parked_bytes_per_stream
        self.max_parked_bytes = max_parked_bytes
        self.parked_bytes = 0  # all streams' parked requests
        # streams waiting for a missing request, oldest gap first
        self._gaps: "OrderedDict[int, _Stream]" = OrderedDict()
        self.clock = clock

    def _frames(self, r: DecoderRequest) -> np.ndarray:
        info = r.info
        if info.windows == 0:
            return np.zeros((0, len(self.contract.vocabulary)), np.float32)
        if r.log_probs.ndim != 3 or r.log_probs.shape[0] != info.windows:
            raise StreamError(f"internal: {r.log_probs.shape} log-probs for {info.windows} windows")
        return real_output_frames(r.log_probs, info.valid_outputs)

    def _apply(self, st: _Stream, r: DecoderRequest) -> list[dict]:
        info = r.info
        if info.start:
            dec_cfg, end_cfg = self.defaults.configs(info.options)
            st.decoder = StreamDecoder(self.contract, config=dec_cfg, endpoint=end_cfg)
            if r.features is not None:
                st.recorder = UtteranceRecorder(self.contract)
                st.decoder.on_final = lambda msg, a, b: st.finals.append((msg, a, b))
            elif dec_cfg.interims == "whisper":
                raise StreamError(
                    "interims=whisper needs the two-pass model "
                    "(streaming_asr_two_pass): Whisper re-decodes the interims"
                )
        frames = self._frames(r)
        if st.recorder is not None and r.features is None:
            raise StreamError("internal: a two-pass stream's request without FEATURES")
        msgs = st.decoder.accept(frames)
        if st.recorder is not None:  # after accept: a refused request records nothing
            st.recorder.append(
                frames,
                chunk_features(r.features, info.valid_outputs[: info.windows], self.contract),
            )
        if info.finalize:
            msgs += st.decoder.finalize()
        if info.end:
            msgs += st.decoder.close()
            st.closed = True
        return msgs

    def _utterances(self, stream: int, st: _Stream, msgs: list[dict]) -> list[Utterance]:
        """The recorded utterances of this response's finals that have words, and for an
        ``interims=whisper`` stream the open utterance when a refresh is due."""
        out = []
        for index, first, end in worded_finals(st.finals, msgs):
            cut = st.recorder.cut(first, end)
            if cut is None:
                log.info("utterance over the two-pass limit: first-pass final kept")
                continue
            features, log_probs = cut
            out.append(
                Utterance(
                    index,
                    features,
                    log_probs,
                    stream=stream,
                    seq=st.next_seq - 1,
                    start_frame=first,
                )
            )
        st.finals.clear()
        if not st.closed:
            st.recorder.trim(st.decoder.utterance_start_frame)
        return out + self._interim_utterances(stream, st, msgs)

    def _interim_utterances(self, stream: int, st: _Stream, msgs: list[dict]) -> list[Utterance]:
        """For an ``interims=whisper`` stream, what each interim of the response needs:
        the last one gets the open utterance to re-decode when it has words and
        ``interim_refresh_s`` of audio went by since the last re-decode (or the
        utterance's start); every other interim a CARRY (shown as the last re-decode of its
        utterance plus newer CTC words)."""
        dec = st.decoder
        if dec.config.interims != "whisper":
            return []
        nothing = np.zeros((0, 0), np.float32)
        first, end, seq = dec.utterance_start_frame, dec.frames_decoded, st.next_seq - 1
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
                stream=stream,
                seq=seq,
                start_frame=round((msgs[i]["start"] - offset) / frame_s),
            )
            for i in interims
        ]
        if not out or interims[-1] != len(msgs) - 1:
            return out
        since = end - max(st.refreshed_at, first)
        due = since * self.contract.output_frame_seconds >= dec.config.interim_refresh_s
        cut = st.recorder.cut(first, end) if due and protocol.transcript(msgs[-1]) else None
        if cut is not None:
            st.refreshed_at = end
            features, log_probs = cut
            out[-1] = Utterance(
                len(msgs) - 1,
                features,
                log_probs,
                kind=INTERIM,
                stream=stream,
                seq=seq,
                start_frame=first,
            )
        return out

    def process(self, r: DecoderRequest) -> list[dict]:
        """This request's messages (see ``process_full`` for the two-pass utterances)."""
        return self.process_full(r)[0]

    # -- reordering ------------------------------------------------------------------
    def _unpark(self, stream: int, st: _Stream) -> None:
        """Forget a stream's parked requests (and its gap)."""
        self.parked_bytes -= st.parked_bytes
        st.parked_bytes = 0
        st.pending.clear()
        st.gap_since = None
        if self._gaps.get(stream) is st:
            del self._gaps[stream]

    def _fail(self, stream: int, st: _Stream, why: str) -> StreamError:
        """The stream cannot go on (a request of it is lost): every later request of it,
        END included, gets ``why`` instead of an empty answer."""
        self._unpark(stream, st)
        st.failed = why
        # ``why`` may quote the client's options (a hotword): the client gets it, not the log
        log.warning("stream %d failed (request %d)", stream, st.next_seq)
        return StreamError(why)

    def expire_gaps(self) -> int:
        """Fail the streams whose missing request is older than the reorder timeout
        (and free what they parked).  Runs on every request and on the sweeper's timer."""
        with self.store.lock:
            now, n = self.clock(), 0
            while self._gaps:
                stream, st = next(iter(self._gaps.items()))
                if now - st.gap_since <= self.reorder_timeout_s:
                    break
                self._fail(
                    stream,
                    st,
                    (
                        f"request {st.next_seq} of stream {stream} never reached the decoder "
                        f"within {self.reorder_timeout_s:g} s (lost in flight, e.g. its gRPC "
                        f"stream was cancelled); the {len(st.pending)} request(s) after it "
                        "were dropped: end this stream and start a new one"
                    ),
                )
                n += 1
            return n

    def _park(self, stream: int, st: _Stream, r: DecoderRequest) -> None:
        seq = r.info.seq
        size = r.log_probs.nbytes + (r.features.nbytes if r.features is not None else 0)
        why = None
        if len(st.pending) >= self.max_pending:
            why = (
                f"{len(st.pending)} requests already parked waiting for request "
                f"{st.next_seq} (limit {self.max_pending})"
            )
        elif st.parked_bytes + size > self.max_parked_bytes_per_stream:
            why = (
                f"{st.parked_bytes / MB:.1f} MB of this stream's requests are already "
                f"parked waiting for request {st.next_seq} (limit "
                f"{self.max_parked_bytes_per_stream / MB:g} MB per stream)"
            )
        elif self.parked_bytes + size > self.max_parked_bytes:
            why = (
                f"the decoder's reorder buffers hold {self.parked_bytes / MB:.1f} MB parked "
                f"by all streams (limit {self.max_parked_bytes / MB:g} MB)"
            )
        if why is not None:
            raise self._fail(
                stream, st, f"request {seq} of stream {stream} refused: {why}; the stream is closed"
            )
        st.pending[seq] = r
        st.parked_bytes += size
        self.parked_bytes += size
        stale = self._gaps.get(stream)
        if stale is not None and stale is not st:  # swept by the TTL, id started again
            self._unpark(stream, stale)
        if st.gap_since is None:
            st.gap_since = self.clock()
            self._gaps[stream] = st

    def process_full(self, r: DecoderRequest) -> tuple[list[dict], list[Utterance]]:
        info = r.info
        with self.store.lock:
            self.expire_gaps()
            if info.start:
                if info.seq != 0:
                    raise StreamError("internal: a START request must be its stream's first")
                held = self.store.pop(info.stream)
                if held is not None and held.decoder is None:
                    st = self.store.create(info.stream, held)  # requests that overtook it
                else:
                    if held is not None:  # a live stream is replaced
                        self._unpark(info.stream, held)
                    st = self.store.create(info.stream, _Stream())
            elif info.stream in self.store:
                st = self.store.get(info.stream)
            else:
                # A request that overtook its stream's START: hold it for the START, unless
                # the stream is known to have expired.
                if info.stream in self.store.expired:
                    self.store.get(info.stream)  # raises "expired"
                st = self.store.create(info.stream, _Stream())
            if st.failed is not None:
                if info.end:
                    self.store.pop(info.stream)
                raise StreamError(st.failed)
            if info.seq != st.next_seq:
                if info.seq < st.next_seq or info.seq in st.pending:
                    raise StreamError(
                        f"internal: request {info.seq} of stream {info.stream} arrived twice"
                    )
                self._park(info.stream, st, r)
                return [], []
            msgs = self._apply(st, r)
            st.next_seq += 1
            while st.next_seq in st.pending:
                parked = st.pending.pop(st.next_seq)
                size = parked.log_probs.nbytes + (
                    parked.features.nbytes if parked.features is not None else 0
                )
                st.parked_bytes -= size
                self.parked_bytes -= size
                msgs += self._apply(st, parked)
                st.next_seq += 1
            if st.gap_since is not None:
                self._gaps.pop(info.stream, None)
                # still waiting for another request: that gap starts now
                st.gap_since = self.clock() if st.pending else None
                if st.pending:
                    self._gaps[info.stream] = st
            utterances = self._utterances(info.stream, st, msgs) if st.recorder is not None else []
            if st.closed:
                self._unpark(info.stream, st)
                self.store.pop(info.stream)
            return msgs, utterances


def build_defaults(cfg: ModelConfig) -> DecoderDefaults:
    """A ctc_decoder model's decoding: its config.pbtxt parameters (all but
    STEP_PARAMETERS) over the declared defaults."""
    params = {k: v for k, v in cfg.parameters().items() if k not in STEP_PARAMETERS}
    if params.get("lm_path") and not Path(params["lm_path"]).is_absolute():
        # a repository is relocatable: a relative LM path names a file in the model's folder
        params["lm_path"] = str(cfg.repository / params["lm_path"])
    try:
        dec, end = split_options(params, server_side=True)
        defaults = DecoderDefaults(dec, end)
        defaults.validate({})
    except ValueError as exc:
        raise ValueError(f"model {cfg.name!r}: {exc}") from None
    return defaults


def served_defaults(model_dir: Path) -> DecoderDefaults:
    """The decoding the ctc_decoder model in ``model_dir`` serves, read from its
    config.pbtxt, for a model that must decode exactly as the stream does: offline_asr,
    which names that model in its own config (parameter ``decoder_model``).  The
    dependency is one-way: the ctc_decoder knows nothing of who reads it."""
    return build_defaults(read_config(model_dir))


def build_step(cfg: ModelConfig) -> CtcDecoderStep:
    max_streams = int(cfg.param("max_streams", "0")) or None
    ttl = stream_idle_timeout(cfg)
    try:
        reorder = parse_float(
            "reorder_timeout_s",
            cfg.param("reorder_timeout_s", str(DEFAULT_REORDER_TIMEOUT_S)),
            0.001,
        )
        per_stream = parse_int(
            "max_parked_bytes_per_stream",
            cfg.param("max_parked_bytes_per_stream", str(DEFAULT_MAX_PARKED_BYTES_PER_STREAM)),
            1,
        )
        total = parse_int(
            "max_parked_bytes", cfg.param("max_parked_bytes", str(DEFAULT_MAX_PARKED_BYTES)), 1
        )
    except ValueError as exc:
        raise ValueError(f"model {cfg.name!r}: {exc}") from None
    contract, defaults = cfg.contract(), build_defaults(cfg)
    # Load the default word LM now (shared, cached by path): the first stream must not wait
    # seconds for it, and a bad LM file must fail the model load, not a stream.
    StreamDecoder(contract, *defaults.configs({}))
    return CtcDecoderStep(
        contract,
        defaults,
        ttl,
        max_streams,
        reorder_timeout_s=reorder,
        max_parked_bytes_per_stream=per_stream,
        max_parked_bytes=total,
    )
