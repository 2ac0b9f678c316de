"""Decoder step of the `streaming_asr` ensemble: log-probs -> JSON result messages.

Per stream it keeps a ``StreamDecoder`` (streamasr.core.decoding).  Requests are applied in
stream order (``StepInfo.seq``): should an earlier request of the same stream still be on
its way through the acoustic model, a later one waits in a bounded reorder buffer
(:mod:`streamasr.pipeline.reorder`).

Streams that come through the two-pass ensemble also send their feature windows
(FEATURES); the step then records each utterance and attaches it to the final for the
``final_pass`` step to re-decode (:mod:`streamasr.pipeline.two_pass_recording`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder
from streamasr.core.decoding.config import SERVER_ONLY_PARAMETERS
from streamasr.core.features import real_output_frames
from streamasr.core.state import StreamError, StreamStore
from streamasr.core.two_pass import Utterance
from streamasr.pipeline.common import (
    ModelConfig,
    parse_float,
    parse_int,
    read_config,
    stream_idle_timeout,
)
from streamasr.pipeline.reorder import Lane, Reorderer
from streamasr.pipeline.step_info import StepInfo
from streamasr.pipeline.two_pass_recording import TwoPassRecording
from streamasr.protocol.contract import ModelContract

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

    @property
    def nbytes(self) -> int:
        """What it costs to hold while it waits for an earlier request."""
        return self.log_probs.nbytes + (self.features.nbytes if self.features is not None else 0)


@dataclass
class _Stream:
    order: Lane[DecoderRequest] = field(default_factory=Lane)
    decoder: StreamDecoder | None = None  # None until its START arrives
    recording: TwoPassRecording | None = None  # two-pass streams only


class CtcDecoderStep:
    """All streams of the decoder model.  Streams are identified by the ``StepInfo`` the
    feature step attaches (not by Triton's sequence batcher), and each stream's requests
    are applied in ``seq`` order whatever order they arrive in (``reorder``)."""

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
        # Its timeout is independent of the TTL: a stream with a gap keeps being touched
        # by the requests that park, so the TTL alone never frees it.
        self.reorder: Reorderer[DecoderRequest] = Reorderer(
            reorder_timeout_s, max_pending, max_parked_bytes_per_stream, max_parked_bytes, clock
        )

    @property
    def parked_bytes(self) -> int:
        """What all streams' out-of-order requests hold now."""
        return self.reorder.parked_bytes

    def expire_gaps(self) -> int:
        """Fail the streams whose missing request is older than the reorder timeout
        (and free what they parked).  Runs on every request and on the sweeper's timer."""
        with self.store.lock:
            return self.reorder.expire()

    def process(self, r: DecoderRequest) -> list[dict]:
        """This request's messages (see ``process_full`` for the two-pass utterances)."""
        return self.process_full(r)[0]

    def process_full(self, r: DecoderRequest) -> tuple[list[dict], list[Utterance]]:
        """This request's messages and its two-pass utterances: those of every request
        it lets through in its stream's order (none when it has to wait)."""
        info = r.info
        with self.store.lock:
            self.reorder.expire()
            st = self._stream(info)
            msgs = []
            for ready in self.reorder.in_order(info.stream, st.order, info.seq, r, info.end):
                msgs += self._apply(st, ready)
            rec = st.recording
            utterances = rec.utterances(msgs, st.order.next_seq - 1) if rec is not None else []
            if st.order.ended:  # its lane let go of anything parked past END
                self.store.pop(info.stream)
            return msgs, utterances

    def _stream(self, info: StepInfo) -> _Stream:
        """The state of the request's stream: a START makes it (keeping the requests that
        overtook the START), a request that overtook its START makes it to wait there."""
        if info.start:
            if info.seq != 0:
                raise StreamError("internal: a START request must be its stream's first")
            held = self.store.pop(info.stream)
            # A held stream without a decoder is the requests that overtook this START; a
            # live one is replaced (the reorderer lets go of what it parked).
            if held is None or held.decoder is not None:
                held = _Stream()
            st = self.store.create(info.stream, held)
        elif info.stream in self.store:
            st = self.store.get(info.stream)
        else:
            # A request that overtook its stream's START: hold it for the START, unless
            # the stream is known to have expired, or it is a stream's first request.
            if info.stream in self.store.expired or info.seq == 0:
                self.store.get(info.stream)  # raises "expired" or "must carry the START flag"
            st = self.store.create(info.stream, _Stream())
        if st.order.failed is not None:
            if info.end:
                self.store.pop(info.stream)
            raise StreamError(st.order.failed)
        return st

    def _apply(self, st: _Stream, r: DecoderRequest) -> list[dict]:
        """One request, in its stream's order."""
        info = r.info
        if info.start:
            dec_cfg, end_cfg = self.defaults.configs(info.options)
            st.decoder = StreamDecoder(self.contract, config=dec_cfg, endpoint=end_cfg)
            st.recording = TwoPassRecording.start(
                self.contract, st.decoder, info.stream, two_pass=r.features is not None
            )
        decoder = st.decoder
        if decoder is None:  # e.g. its START was refused, and a request 0 without START came
            raise StreamError(
                f"stream {info.stream} has no accepted START: the first request of a stream "
                "must carry the START flag"
            )
        frames = self._frames(r)
        # endpoints outside the request's frames (a direct caller) are a ValueError, as
        # bad log-probs are: the adapter answers both as the request's error
        if st.recording is not None:
            msgs = st.recording.accept(
                frames, r.features, info.valid_outputs[: info.windows], info.endpoints
            )
        else:
            msgs = decoder.accept(frames, info.endpoints)
        if info.finalize:
            msgs += decoder.finalize()
        if info.end:
            msgs += decoder.close()
        return msgs

    def _frames(self, r: DecoderRequest) -> np.ndarray:
        info = r.info
        if info.windows == 0:
            return np.zeros((0, len(self.contract.vocabulary)), np.float32)
        if r.log_probs.ndim != 3 or r.log_probs.shape[0] != info.windows:
            raise StreamError(f"internal: {r.log_probs.shape} log-probs for {info.windows} windows")
        return real_output_frames(r.log_probs, info.valid_outputs)


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
