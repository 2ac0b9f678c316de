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

import itertools
import json
import logging
import queue
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from streamasr.contract import ModelContract

log = logging.getLogger("streamasr_client")

STREAM_MODEL = "streaming_asr"
#: The same stream protocol with finals re-decoded by Whisper (two-pass finals).
TWO_PASS_MODEL = "streaming_asr_two_pass"
CONTRACT_MODEL = "model_contract"
OFFLINE_MODEL = "offline_asr"
# gRPC's 4 MB default is too small for a long recording sent to offline_asr.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class AsrError(RuntimeError):
    """The server rejected a request; the message is the server's."""


def _channel(url: str, ssl: bool, root_certificates: bytes | None) -> grpc.Channel:
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.keepalive_time_ms", 30_000)]
    if ssl:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(url, creds, options=options)
    return grpc.insecure_channel(url, options=options)


def _set_param(params, key: str, value: Any) -> None:
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
        out.append(raw[i + 4:i + 4 + n].decode("utf-8"))
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
            name, dtype, a = "AUDIO", "FP32", a.astype(np.float32, copy=False)
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
    model: str | None = None    # the streaming model; None: the connection's
    messages: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _sent: int = 0
    _answered: int = 0          # responses passed on (in send order)
    _early: dict[int, tuple[list[dict], str | None, float]] = field(default_factory=dict)
    _closed: bool = False
    _cv: threading.Condition = field(default_factory=threading.Condition)

    # -- sending ---------------------------------------------------------------------
    def send(self, audio: np.ndarray | None = None, *, finalize: bool = False,
             keepalive: bool = False, end: bool = False,
             sample_rate: int | None = None) -> None:
        if self._closed:
            raise AsrError(f"session {self.sequence_id} is closed")
        req = service_pb2.ModelInferRequest(model_name=self.model or self.conn.model,
                                            id=f"{self.sequence_id}:{self._sent}")
        _add_audio(req, audio, sample_rate)
        start = self._sent == 0
        _set_param(req.parameters, "sequence_id", self.sequence_id)
        _set_param(req.parameters, "sequence_start", start)
        _set_param(req.parameters, "sequence_end", end)
        if finalize:
            _set_param(req.parameters, "finalize", True)
        if keepalive:
            _set_param(req.parameters, "keepalive", True)
        if start:
            for k, v in self.options.items():
                _set_param(req.parameters, k, v)
        with self._cv:
            self._sent += 1
            if end:
                self._closed = True
        self.conn._submit(req)

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
            self._early[index] = (msgs, error, arrived)
            ready = []
            while self._answered + len(ready) in self._early:
                ready.append(self._early.pop(self._answered + len(ready)))
        # Only the reader thread delivers, so callbacks keep the order popped in.
        for batch, err, t in ready:
            self._release(batch, err, t)

    def _release(self, msgs: list[dict], error: str | None, arrived: float) -> None:
        """One response, in send order (``arrived``: its perf_counter arrival time)."""
        # Callbacks first: once wait() returns, on_message has seen every message.
        if self.on_message:
            for m in msgs:
                self.on_message(m)
        with self._cv:
            if error is not None:
                self.errors.append(error)
            self.messages.extend(msgs)
            self._answered += 1
            self._cv.notify_all()

    def wait(self, timeout: float | None = 60.0) -> None:
        """Block until every request sent so far has its response."""
        with self._cv:
            if not self._cv.wait_for(
                    lambda: self._answered >= self._sent or self.conn._broken is not None,
                    timeout):
                raise TimeoutError(f"session {self.sequence_id}: {self._sent - self._answered} "
                                   f"responses missing after {timeout} s")
        self.conn._raise_if_broken()

    @property
    def pending(self) -> int:
        return self._sent - self._answered

    @property
    def finals(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "Results" and m.get("is_final")]

    @property
    def transcript(self) -> str:
        """The text of every final so far, joined."""
        parts = [m["channel"]["alternatives"][0]["transcript"] for m in self.finals]
        return " ".join(p for p in parts if p)

    @property
    def interim(self) -> str:
        for m in reversed(self.messages):
            if m.get("type") == "Results":
                return "" if m.get("is_final") else m["channel"]["alternatives"][0]["transcript"]
        return ""


class AsrConnection:
    """One gRPC channel and one bidirectional stream, shared by any number of sessions."""

    def __init__(self, url: str = "127.0.0.1:8001", *, model: str = STREAM_MODEL,
                 ssl: bool = False, root_certificates: bytes | None = None):
        self.url = url
        self.model = model
        self._channel = _channel(url, ssl, root_certificates)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._requests: "queue.Queue[Any]" = queue.Queue()
        self._sessions: dict[int, Session] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(random.randrange(1, 2**40))
        self._contract: ModelContract | None = None
        self._broken: BaseException | None = None
        self._stream = None
        self._reader: threading.Thread | None = None

    # -- unary calls -------------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def contract(self) -> ModelContract:
        if self._contract is None:
            resp = self._stub.ModelInfer(service_pb2.ModelInferRequest(model_name=CONTRACT_MODEL))
            self._contract = ModelContract.from_json(_strings(resp.raw_output_contents[0])[0])
        return self._contract

    def transcribe_file(self, audio: np.ndarray, *, sample_rate: int | None = None,
                        options: dict[str, Any] | None = None,
                        timeout: float = 600.0) -> list[dict]:
        """Whole recording in one request to `offline_asr`."""
        req = service_pb2.ModelInferRequest(model_name=OFFLINE_MODEL)
        _add_audio(req, np.asarray(audio, np.float32), sample_rate)
        for k, v in (options or {}).items():
            _set_param(req.parameters, k, v)
        try:
            resp = self._stub.ModelInfer(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise AsrError(exc.details()) from None
        return _results(resp)

    # -- streaming ---------------------------------------------------------------------
    def open_session(self, options: dict[str, Any] | None = None,
                     on_message: Callable[[dict], None] | None = None,
                     sequence_id: int | None = None, model: str | None = None) -> Session:
        """A new stream on this connection; ``model`` picks the streaming model for it
        (e.g. TWO_PASS_MODEL), default the connection's."""
        self._ensure_stream()
        sid = sequence_id if sequence_id is not None else next(self._ids)
        s = Session(self, sid, dict(options or {}), on_message, model)
        with self._lock:
            self._sessions[sid] = s
        return s

    def _ensure_stream(self) -> None:
        with self._lock:
            if self._stream is not None:
                return
            self._stream = self._stub.ModelStreamInfer(iter(self._requests.get, None))
            self._reader = threading.Thread(target=self._read, name="asr-stream", daemon=True)
            self._reader.start()

    def _submit(self, req) -> None:
        self._raise_if_broken()
        self._requests.put(req)

    def _read(self) -> None:
        try:
            for resp in self._stream:
                rid = resp.infer_response.id
                sid, index = _parse_request_id(rid)
                with self._lock:
                    session = self._sessions.get(sid)
                if session is None:
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
            if exc.code() != grpc.StatusCode.CANCELLED:
                self._broken = exc
                log.error("stream broken: %s", exc.details())
        finally:
            # Wake every waiter: no more responses will come on this stream.
            with self._lock:
                sessions = list(self._sessions.values())
            for s in sessions:
                with s._cv:
                    s._cv.notify_all()

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise AsrError(f"gRPC stream to {self.url} broke: "
                           f"{getattr(self._broken, 'details', lambda: self._broken)()}")

    def forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.sequence_id, None)

    def close(self) -> None:
        if self._stream is not None:
            self._requests.put(None)        # ends the request iterator: half-close
            if self._reader is not None:
                self._reader.join(timeout=10)
            self._stream = None
        self._channel.close()

    def __enter__(self) -> "AsrConnection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
