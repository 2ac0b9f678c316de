"""Streaming ASR over ONE persistent gRPC stream to Triton, many sessions multiplexed.

Built on Triton's own gRPC service stubs (shipped in tritonclient) rather than
tritonclient's stream wrapper: the raw stream response keeps the request id on errors,
so an error reaches the session that caused it and no other.

    conn = AsrConnection("127.0.0.1:8001")
    contract = conn.contract()                   # sample rate, chunk size... from the model
    s = conn.open_session(on_message=print)
    for chunk in chunks: s.send(chunk)           # float32 in [-1, 1] or int16, model rate
    s.close(); s.wait()                          # END: the final result arrives
    print(s.transcript)
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from streamasr import protocol
from streamasr.protocol import (
    CONTRACT_MODEL,
    DEFAULT_MAX_LEAD_SECONDS,
    FEATURE_MODEL,
    MAX_LEAD_PARAMETER,
    MAX_PENDING_REQUESTS,
    OFFLINE_MODEL,
    OFFLINE_OPTION_KEYS,
    STREAM_MODEL,
    TWO_PASS_MODEL,
    ModelContract,
    is_capacity_refusal,
)

#: The ensemble input that carries float audio (the feature step takes it).
AUDIO_INPUT = "AUDIO"
log = logging.getLogger("streamasr_client")

__all__ = [
    "AsrConnection",
    "AsrBusy",
    "AsrError",
    "Session",
    "STREAM_MODEL",
    "TWO_PASS_MODEL",
    "CONTRACT_MODEL",
    "OFFLINE_MODEL",
]
# Sequence ids are drawn from [1, INT64_MAX]: Triton's UINT64 CORRID, kept within the
# signed range every client library writes.
MAX_SEQUENCE_ID = protocol.INT64_MAX
# gRPC's 4 MB default is too small for a long recording sent to offline_asr.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# The shared stream is re-opened after it broke; give up on a request after this many
# re-opens in a row that broke before answering anything (Triton down, say).
MAX_REOPENS_WITHOUT_ANSWER = 3
# A session keeps its audio this much further behind the server's max_lead_seconds than
# the limit itself (or at half the limit, whichever is more): the server's clock starts
# when it serves the START, a little later than the client's.
LEAD_MARGIN_S = 5.0
# Sessions forgotten whose late responses (interim refreshes) are expected, not warned of.
FORGOTTEN_KEPT = 1024


class AsrError(RuntimeError):
    """The server rejected a request; the message is the server's."""


class AsrBusy(AsrError):
    """The server refused to start the stream because it holds its limit of streams
    (admission control): nothing was wrong with the request; retry later, or elsewhere."""


def _channel(
    url: str, ssl: bool, root_certificates: bytes | None, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> grpc.Channel:
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if ssl:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(url, creds, options=options)
    return grpc.insecure_channel(url, options=options)


def _set_param(params, key: str, value: Any) -> None:
    # refused here rather than by protobuf's bare ValueError halfway through a request
    if isinstance(value, int) and not isinstance(value, bool):
        if not protocol.INT64_MIN <= value <= protocol.INT64_MAX:
            raise AsrError(f"option {key[:64]!r}: {value} is outside the 64-bit integer range")
    p = params[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _strings(raw: bytes) -> list[str]:
    """Decode a Triton BYTES tensor (4-byte little-endian length + bytes, repeated)."""
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n].decode("utf-8"))
        i += 4 + n
    return out


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _add_audio(req, audio: np.ndarray | None, sample_rate: int | None) -> None:
    if audio is not None:
        a = np.asarray(audio)
        if a.dtype == np.int16:
            name, dtype = "AUDIO_INT16", "INT16"
        else:
            name, dtype, a = AUDIO_INPUT, "FP32", a.astype(np.float32, copy=False)
        t = req.inputs.add(name=name, datatype=dtype)
        t.shape.extend([len(a)])
        req.raw_input_contents.append(np.ascontiguousarray(a).tobytes())
    if sample_rate is not None:
        t = req.inputs.add(name="SAMPLE_RATE", datatype="INT32")
        t.shape.extend([1])
        req.raw_input_contents.append(np.array([sample_rate], np.int32).tobytes())


def _parse_request_id(rid: str) -> tuple[int | None, int]:
    """Our request ids are "<sequence id>:<index in the session>"."""
    sid, _, index = rid.partition(":")
    try:
        return int(sid), int(index)
    except ValueError:
        return None, -1


def _results(response) -> list[dict]:
    for i, out in enumerate(response.outputs):
        if out.name == "RESULTS":
            return [json.loads(s) for s in _strings(response.raw_output_contents[i])]
    raise AsrError(f"response without RESULTS (outputs: {[o.name for o in response.outputs]})")


@dataclass
class Session:
    """One utterance stream = one Triton sequence.  Thread-safe to send from one thread
    while results arrive on the connection's reader thread."""

    conn: "AsrConnection"
    sequence_id: int
    options: dict[str, Any]
    on_message: Callable[[dict], None] | None = None
    model: str | None = None  # the streaming model; None: the connection's
    messages: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _sent: int = 0
    _answered: int = 0  # responses passed on (in send order)
    _early: dict[int, tuple[list[dict], str | None, float]] = field(default_factory=dict)
    # later responses to a request not yet passed on (interim refreshes), by its index
    _late: dict[int, list[dict]] = field(default_factory=dict)
    _final_end: float = -1.0  # stream time where the last final passed on ends
    _closed: bool = False
    _failed: str | None = None  # the session cannot go on (its requests were lost)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    #: called once with the START request's error (None: accepted), on the reader thread
    on_start: Callable[[str | None], None] | None = None
    #: called after every answer (and on failure), on the reader thread: lets an event
    #: loop wait for answers without parking a thread in wait() (add_listener)
    _listeners: list[Callable[[], None]] = field(default_factory=list)
    #: the server's refusal of the START (admission control; retry later), else None
    refused: str | None = None
    _audio_samples: int = 0  # audio sent so far (at the model's rate)
    _started_at: float | None = None  # time.monotonic() when the START went out

    # -- sending ---------------------------------------------------------------------
    def send(
        self,
        audio: np.ndarray | None = None,
        *,
        finalize: bool = False,
        keepalive: bool = False,
        end: bool = False,
        sample_rate: int | None = None,
    ) -> None:
        if self._failed is not None:
            raise AsrError(self._failed)
        if self.refused is not None:
            raise AsrBusy(self.refused)
        if self._closed:
            raise AsrError(f"session {self.sequence_id} is closed")
        samples = 0 if audio is None else len(audio)
        if samples and not self.conn._on_reader_thread():
            self._wait_for_room(samples)
        req = service_pb2.ModelInferRequest(
            model_name=self.model or self.conn.model, id=f"{self.sequence_id}:{self._sent}"
        )
        _add_audio(req, audio, sample_rate)
        start = self._sent == 0
        if start:
            for k, v in self.options.items():
                _set_param(req.parameters, k, v)
        # The request's own fields last: nothing in the options can override them
        # (open_session refuses reserved names too).
        _set_param(req.parameters, "sequence_id", self.sequence_id)
        _set_param(req.parameters, "sequence_start", start)
        _set_param(req.parameters, "sequence_end", end)
        if finalize:
            _set_param(req.parameters, "finalize", True)
        if keepalive:
            _set_param(req.parameters, "keepalive", True)
        self.conn._check_size(req)  # before counting it: a refused request never existed
        with self._cv:
            self._sent += 1
            self._audio_samples += samples
            if start:
                self._started_at = time.monotonic()
            if end:
                self._closed = True
        self.conn._submit(req)

    # -- backpressure ------------------------------------------------------------------
    def send_delay(self, samples: int) -> float:
        """Seconds to wait before ``samples`` more audio may go without running this
        stream further ahead of real time than the server allows (its max_lead_seconds,
        less LEAD_MARGIN_S); 0 for a stream sent at real time.  An event loop awaits it
        (the SageMaker gateway); send() sleeps it itself."""
        if self._started_at is None:
            return 0.0
        rate = self.conn._pacing_rate() if self.conn.pace else None
        if rate is None:
            return 0.0
        elapsed = time.monotonic() - self._started_at
        ahead = (self._audio_samples + samples) / rate - elapsed
        if ahead <= 0:  # a real-time stream needs no lookup of the limit
            return 0.0
        limit = self.conn.max_lead_seconds()
        if limit is None:
            return 0.0
        return max(0.0, ahead - max(limit - LEAD_MARGIN_S, limit / 2))

    def lead_seconds(self) -> float | None:
        """How far this session's audio runs ahead of real time: audio seconds sent
        less the seconds since its START went out (<= 0: at or behind real time); None
        before START or when the server has no model contract to give the rate."""
        if self._started_at is None:
            return None
        rate = self.conn._pacing_rate()
        if rate is None:
            return None
        return self._audio_samples / rate - (time.monotonic() - self._started_at)

    def _wait_for_room(self, samples: int) -> None:
        """Block while the connection's max_pending requests of this session are
        unanswered, then while the audio would run too far ahead of real time."""
        limit = self.conn.max_pending
        if limit is not None:
            with self._cv:
                if not self._cv.wait_for(
                    lambda: self._sent - self._answered < limit or self._failed is not None,
                    self.conn.send_timeout_s,
                ):
                    raise AsrError(
                        f"session {self.sequence_id}: {self._sent - self._answered} requests "
                        f"unanswered for {self.conn.send_timeout_s:g} s (limit {limit}): "
                        "the server is not keeping up"
                    )
            if self._failed is not None:
                raise AsrError(self._failed)
        delay = self.send_delay(samples)
        if delay > 0:
            time.sleep(delay)

    def send_request(self, request: service_pb2.ModelInferRequest) -> None:
        """Send a hand-built ``ModelInferRequest`` in this session's next slot, for
        protocol tests and tools that need inputs or parameters send() does not write.
        Its ``id`` is set to the slot; model, inputs and parameters (sequence id and
        START/END flags included) go as built, unchecked, and no flag of this session
        changes (an END here does not make it closed).  It counts as sent: wait() waits
        for its answer."""
        with self._cv:
            request.id = f"{self.sequence_id}:{self._sent}"
            self._sent += 1
        self.conn._submit(request)

    def finalize(self) -> None:
        """Flush the open utterance as a final without closing the stream."""
        self.send(finalize=True)

    def keepalive(self) -> None:
        self.send(keepalive=True)

    def close(self, audio: np.ndarray | None = None) -> None:
        """END of stream (optionally with a last chunk); the final result follows."""
        self.send(audio, end=True)

    # -- receiving -------------------------------------------------------------------
    def _deliver(self, index: int, msgs: list[dict], error: str | None) -> None:
        """Response ``index`` (its request's place in the session) arrived.  Responses
        are passed on in send order: with two-pass finals a final's response comes back
        after the re-decode, later than the next chunks' interims."""
        if error is not None:
            msgs = [{"type": "Error", "message": error}]
        arrived = time.perf_counter()
        with self._cv:
            if self._failed is not None:
                return  # answered for good already (see _fail)
            if index < self._answered or index in self._early:
                # a second response to one request: a Whisper interim refresh, sent on
                # its own once re-decoded (after its request's answer, never instead)
                if index in self._early:
                    self._late.setdefault(index, []).extend(msgs)
                    return
                late = msgs
            else:
                late = None
                self._early[index] = (msgs, error, arrived)
            ready: list[tuple[list[dict], str | None, float, list[dict]]] = []
            while late is None and self._answered + len(ready) in self._early:
                i = self._answered + len(ready)
                ready.append((*self._early.pop(i), self._late.pop(i, [])))
        # Only the reader thread delivers, so callbacks keep the order popped in.
        if late is not None:
            self._release_late(late)
        for batch, err, t, after in ready:
            self._release(batch, err, t)
            if after:
                self._release_late(after)

    def _release_late(self, msgs: list[dict]) -> None:
        """Messages of a request's later response (an interim refresh): passed on as
        they come; they answer no request (``answered`` does not move).  One whose
        utterance's final was passed on already is dropped: the server sends a refresh
        before its final, but Triton may deliver two requests' responses out of order."""
        with self._cv:
            msgs = [
                m
                for m in msgs
                if not (protocol.is_results(m) and m.get("start", 0.0) < self._final_end)
            ]
        if not msgs:
            return
        if self.on_message:
            for m in msgs:
                self.on_message(m)
        with self._cv:
            self.messages.extend(msgs)
            self._cv.notify_all()
        for listener in list(self._listeners):
            listener()

    def _release(self, msgs: list[dict], error: str | None, arrived: float) -> None:
        """One response, in send order (``arrived``: its perf_counter arrival time)."""
        release = False
        if self._answered == 0 and error is not None and is_capacity_refusal(error):
            self.refused = error
            release = not self._closed
            msgs = [dict(msgs[0], code=protocol.BUSY_CODE)] if msgs else msgs
        elif self.refused is not None:
            # the answers to requests sent before the refusal came back (and to the END
            # below) only say "refused at START": the session has that error already
            msgs, error = [], None
        # Callbacks first: once wait() returns, on_message has seen every message; and
        # on_start after on_message, so its listener finds the START's error delivered.
        if self.on_message:
            for m in msgs:
                self.on_message(m)
        if self._answered == 0 and self.on_start is not None:
            self.on_start(error)
        with self._cv:
            if error is not None:
                self.errors.append(error)
            self.messages.extend(msgs)
            for m in msgs:
                if protocol.is_results(m) and protocol.is_final(m):
                    end = m.get("start", 0.0) + m.get("duration", 0.0)
                    self._final_end = max(self._final_end, end)
            self._answered += 1
            self._cv.notify_all()
        if release:
            self._release_refused()
        for listener in list(self._listeners):
            listener()

    def _release_refused(self) -> None:
        """END the refused sequence at once: Triton otherwise holds its sequence slot
        until the idle timeout (60 s), and a burst of refused STARTs would fill them."""
        req = service_pb2.ModelInferRequest(
            model_name=self.model or self.conn.model, id=f"{self.sequence_id}:{self._sent}"
        )
        _set_param(req.parameters, "sequence_id", self.sequence_id)
        _set_param(req.parameters, "sequence_start", False)
        _set_param(req.parameters, "sequence_end", True)
        with self._cv:
            self._sent += 1
            self._closed = True
        try:
            self.conn._submit(req)
        except AsrError:  # the connection is closing: nothing to free
            with self._cv:
                self._sent -= 1

    def _fail(self, reason: str) -> None:
        """No more answers will come (requests of this session were lost with a broken
        gRPC stream): one Error for the session, every later send refused."""
        msg = {"type": "Error", "code": "stream_broken", "message": reason}
        with self._cv:
            if self._failed is not None:
                return
            self._failed = reason
            unstarted = self._answered == 0
            self._early.clear()
            self.errors.append(reason)
            self.messages.append(msg)
            self._answered = self._sent
            self._cv.notify_all()
        if self.on_message:
            self.on_message(msg)
        if unstarted and self.on_start is not None:
            self.on_start(reason)
        for listener in list(self._listeners):
            listener()

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (on the reader thread) after every answer and on failure."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    @property
    def failed(self) -> str | None:
        return self._failed

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until every request sent so far has its response; AsrError when they
        were lost (the session failed)."""
        with self._cv:
            if not self._cv.wait_for(
                lambda: self._answered >= self._sent or self._failed is not None, timeout
            ):
                raise TimeoutError(
                    f"session {self.sequence_id}: {self._sent - self._answered} "
                    f"responses missing after {timeout} s"
                )
        if self._failed is not None:
            raise AsrError(self._failed)

    @property
    def pending(self) -> int:
        return self._sent - self._answered

    @property
    def sent(self) -> int:
        """Requests sent so far (the START included)."""
        return self._sent

    @property
    def answered(self) -> int:
        """Responses passed on so far (in send order; ``sent - answered`` is pending)."""
        return self._answered

    @property
    def started(self) -> bool:
        """The START request went out (the session exists on the server)."""
        return self._sent > 0

    @property
    def closed(self) -> bool:
        """END went out: nothing more can be sent."""
        return self._closed

    @property
    def finals(self) -> list[dict]:
        return protocol.finals(self.messages)

    @property
    def transcript(self) -> str:
        """The text of every final so far, joined."""
        return protocol.final_text(self.messages)

    @property
    def interim(self) -> str:
        for m in reversed(self.messages):
            if protocol.is_results(m):
                return "" if protocol.is_final(m) else protocol.transcript(m)
        return ""


class _Stream:
    """One ModelStreamInfer call: its request queue, and which requests it has taken
    from the queue and not yet answered (those die with it if it breaks)."""

    def __init__(self):
        self.requests: "queue.Queue[Any]" = queue.Queue()
        self.in_flight: dict[int | None, set[int]] = {}  # None: an id not ours
        self.answered = 0
        self.lock = threading.Lock()
        self.call = None
        self.reader: threading.Thread | None = None

    def iterate(self):
        while True:
            req = self.requests.get()
            if req is None:
                return  # half-close
            sid, index = _parse_request_id(req.id)
            with self.lock:
                self.in_flight.setdefault(sid, set()).add(index)
            yield req

    def answered_one(self, sid: int | None, index: int) -> None:
        with self.lock:
            self.answered += 1
            taken = self.in_flight.get(sid)
            if taken is not None:
                taken.discard(index)
                if not taken:
                    del self.in_flight[sid]


class AsrConnection:
    """One gRPC channel and one bidirectional stream, shared by any number of sessions.

    Should the stream break (Triton restarted, a network fault), only the sessions with a
    request on it that was not yet answered fail (their results are lost); the stream is
    re-opened for the others, which carry on: a Triton sequence is not bound to a stream.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        model: str = STREAM_MODEL,
        ssl: bool = False,
        root_certificates: bytes | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_pending: int | None = MAX_PENDING_REQUESTS,
        send_timeout_s: float = 120.0,
        pace: bool = True,
    ):
        """``max_pending``: requests with audio a session may have unanswered before
        send() waits (None: no limit); ``send_timeout_s``: how long send() waits for
        room before it raises AsrError; ``pace``: send() also waits rather than run a
        stream further ahead of real time than the server allows (False: the server
        closes such a stream, naming its max_lead_seconds)."""
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 or None, got {max_pending}")
        self.url = url
        self.model = model
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.send_timeout_s = send_timeout_s
        self.pace = pace
        self._max_lead: tuple[float | None] | None = None  # looked up once
        self._no_contract = False  # the server has no contract model: no pacing
        self._channel = _channel(url, ssl, root_certificates, max_message_bytes)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._sessions: dict[int, Session] = {}
        # the last sessions forgotten, for the late responses they may still get
        self._forgotten: collections.deque[int] = collections.deque(maxlen=FORGOTTEN_KEPT)
        self._lock = threading.Lock()
        self._contract: ModelContract | None = None
        self._current: _Stream | None = None
        self._closing = False
        self._reopens = 0  # re-opens in a row that answered nothing
        self.breaks = 0  # streams that broke (for logs and tests)
        self.last_error: str | None = None

    # -- unary calls -------------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def server_ready(self, timeout: float = 2.0) -> bool:
        """Triton's own readiness (gRPC ServerReady); RpcError when unreachable."""
        return self._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready

    def model_ready(self, name: str, timeout: float = 2.0) -> bool:
        """Whether model ``name`` is loaded and ready; RpcError when unreachable."""
        return self._stub.ModelReady(
            service_pb2.ModelReadyRequest(name=name), timeout=timeout
        ).ready

    @property
    def closed(self) -> bool:
        """close() was called: no new sessions."""
        return self._closing

    def contract(self) -> ModelContract:
        if self._contract is None:
            resp = self._stub.ModelInfer(service_pb2.ModelInferRequest(model_name=CONTRACT_MODEL))
            self._contract = ModelContract.from_json(_strings(resp.raw_output_contents[0])[0])
        return self._contract

    def sample_rate(self) -> int:
        return self.contract().sample_rate

    def _pacing_rate(self) -> int | None:
        """The model's sample rate for pacing; None (no pacing) when this server has no
        contract model to ask (a stand-in, another server's layout): said once."""
        if self._no_contract:
            return None
        try:
            return self.sample_rate()
        except grpc.RpcError as exc:
            log.warning("no model contract (%s): sessions are not paced", exc.code().name)
            self._no_contract = True
            return None

    def max_lead_seconds(self) -> float | None:
        """How far ahead of real time the server lets a stream's audio run (its feature
        step's max_lead_seconds; None: no limit).  Read from the model's config once."""
        if self._max_lead is None:
            value: float | None = DEFAULT_MAX_LEAD_SECONDS
            feature_model = self._feature_model()
            try:
                cfg = self._stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=feature_model), timeout=10.0
                ).config
            except grpc.RpcError as exc:  # not this server's layout: assume the default
                log.warning(
                    "no %s config (%s): assuming max_lead_seconds %g",
                    feature_model,
                    exc.code().name,
                    DEFAULT_MAX_LEAD_SECONDS,
                )
            else:
                if MAX_LEAD_PARAMETER in cfg.parameters:
                    value = float(cfg.parameters[MAX_LEAD_PARAMETER].string_value) or None
            self._max_lead = (value,)
        return self._max_lead[0]

    def _feature_model(self) -> str:
        """The step of this connection's ensemble that takes the audio (the server's
        own config says which; FEATURE_MODEL when it cannot be read)."""
        try:
            cfg = self._stub.ModelConfig(
                service_pb2.ModelConfigRequest(name=self.model), timeout=10.0
            ).config
        except grpc.RpcError:
            return FEATURE_MODEL
        for step in cfg.ensemble_scheduling.step:
            if AUDIO_INPUT in step.input_map.values():
                return step.model_name
        return FEATURE_MODEL

    def _on_reader_thread(self) -> bool:
        """A callback sending from the reader thread must not wait for answers: only
        that thread delivers them."""
        st = self._current
        return st is not None and threading.current_thread() is st.reader

    def transcribe_file(
        self,
        audio: np.ndarray,
        *,
        sample_rate: int | None = None,
        options: dict[str, Any] | None = None,
        timeout: float = 600.0,
    ) -> list[dict]:
        """Whole recording in one request to `offline_asr`; ``options``: stream options
        and ``two_pass`` (anything else is refused, ValueError)."""
        options = dict(options or {})
        protocol.check_stream_options(options, allowed=OFFLINE_OPTION_KEYS)
        req = service_pb2.ModelInferRequest(model_name=OFFLINE_MODEL)
        _add_audio(req, np.asarray(audio, np.float32), sample_rate)
        for k, v in options.items():
            _set_param(req.parameters, k, v)
        self._check_size(req)
        try:
            resp = self._stub.ModelInfer(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise AsrError(exc.details()) from None
        return _results(resp)

    def _check_size(self, req) -> None:
        """Refuse a request gRPC would refuse: sent on the shared stream, it would break
        the stream for every session on it."""
        size = req.ByteSize()
        if size > self.max_message_bytes:
            raise AsrError(
                f"request of {size} bytes is larger than the gRPC message limit "
                f"of {self.max_message_bytes} bytes: send shorter audio chunks"
            )

    # -- streaming ---------------------------------------------------------------------
    def open_session(
        self,
        options: dict[str, Any] | None = None,
        on_message: Callable[[dict], None] | None = None,
        sequence_id: int | None = None,
        model: str | None = None,
        session_class: type[Session] = Session,
        **fields: Any,
    ) -> Session:
        """A new stream on this connection; ``model`` picks the streaming model for it
        (e.g. TWO_PASS_MODEL), default the connection's.  ``options`` are per-stream
        decoder and endpoint options (``protocol.STREAM_OPTION_KEYS``); any other key,
        a reserved request field above all, is refused here (ValueError) before
        anything is sent.  ``session_class``: a Session subclass to make instead (a
        benchmark's timed session), given ``fields`` as its own further fields."""
        options = dict(options or {})
        protocol.check_stream_options(options)
        with self._lock:
            sid = sequence_id if sequence_id is not None else self._new_id_locked()
            s = session_class(self, sid, options, on_message, model, **fields)
            self._sessions[sid] = s
            self._stream_locked()
        return s

    def _new_id_locked(self) -> int:
        """A random sequence id, unused on this connection: ids shared by many clients
        (the gateway's connection) must not be guessable from one's own."""
        while True:
            sid = secrets.randbelow(MAX_SEQUENCE_ID) + 1
            if sid not in self._sessions:
                return sid

    def _stream_locked(self) -> _Stream:
        """The live stream, opened if there is none (caller holds ``_lock``)."""
        if self._closing:
            raise AsrError(f"connection to {self.url} is closed")
        if self._current is None:
            st = _Stream()
            st.call = self._stub.ModelStreamInfer(st.iterate())
            st.reader = threading.Thread(
                target=self._read, args=(st,), name="asr-stream", daemon=True
            )
            self._current = st
            st.reader.start()
        return self._current

    def cancel_stream(self) -> None:
        """Cancel the shared gRPC stream as a network fault would (for fault drills):
        sessions with a request on it not yet answered fail, the others carry on on a new
        stream."""
        with self._lock:
            call = self._stream_locked().call
        call.cancel()

    def half_close(self) -> None:
        """Half-close the shared stream: no more requests on it and no END for its
        sessions, as a client that stops sending without closing (for drills).  Answers to
        the requests already sent still arrive; a later send opens a new stream."""
        with self._lock:
            st, self._current = self._current, None
        if st is not None:
            st.requests.put(None)

    def _submit(self, req) -> None:
        with self._lock:
            self._stream_locked().requests.put(req)

    def _read(self, st: _Stream) -> None:
        error: str | None = None
        try:
            for resp in st.call:
                rid = resp.infer_response.id
                sid, index = _parse_request_id(rid)
                st.answered_one(sid, index)
                with self._lock:
                    session = self._sessions.get(sid) if sid is not None else None
                if session is None:
                    if sid in self._forgotten:
                        log.debug("response for forgotten session %r (a late refresh)", rid)
                    else:
                        log.warning("response for unknown request id %r", rid)
                    continue
                if resp.error_message:
                    session._deliver(index, [], resp.error_message)
                else:
                    try:
                        session._deliver(index, _results(resp.infer_response), None)
                    except (AsrError, ValueError) as exc:
                        session._deliver(index, [], f"malformed response: {exc}")
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - whatever ends the reader ends the stream
            error = f"{type(exc).__name__}: {exc}"
        if not self._closing:
            self._broke(st, error or "the server ended the stream")

    def _broke(self, st: _Stream, why: str) -> None:
        """The stream ``st`` is gone: fail the sessions it held requests of, move the
        requests it never took to a new stream."""
        with self._lock:
            if self._current is st:
                self._current = None
            self.breaks += 1
            self.last_error = why
            self._reopens = 0 if st.answered else self._reopens + 1
            with st.lock:
                lost = {sid: sorted(ix) for sid, ix in st.in_flight.items() if ix}
                st.in_flight.clear()
            untaken = []
            while True:
                try:
                    req = st.requests.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    untaken.append(req)
            if self._reopens >= MAX_REOPENS_WITHOUT_ANSWER:
                for req in untaken:  # the server keeps refusing: these die too
                    sid, index = _parse_request_id(req.id)
                    lost.setdefault(sid, []).append(index)
                untaken = []
            keep = [r for r in untaken if _parse_request_id(r.id)[0] not in lost]
            if keep and not self._closing:
                new = self._stream_locked()
                for req in keep:
                    new.requests.put(req)
            failed = [
                (self._sessions[sid], ix) for sid, ix in lost.items() if sid in self._sessions
            ]
        if lost or keep:
            log.error(
                "gRPC stream to %s broke (%s): %d session(s) lost requests in flight, "
                "%d request(s) moved to a new stream",
                self.url,
                why,
                len(failed),
                len(keep),
            )
        for session, indexes in failed:
            session._fail(
                f"gRPC stream to {self.url} broke ({why}) with request(s) "
                f"{indexes} of this session in flight: their results are lost; "
                "start a new session"
            )

    def forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.sequence_id, None)
            # a late interim refresh may still come for it: not worth a warning
            self._forgotten.append(session.sequence_id)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            st, self._current = self._current, None
        if st is not None:
            st.requests.put(None)  # ends the request iterator: half-close
            if st.reader is not None:
                st.reader.join(timeout=10)
        self._channel.close()

    def __enter__(self) -> "AsrConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
