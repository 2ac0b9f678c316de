"""The process that owns SageMaker's port (8080) in the container, in front of Triton.

Routes (SageMaker's container contract plus bidirectional streaming):

``GET /ping``
    200 when Triton is live and the streaming and offline models are ready, else 503
    (SageMaker treats anything but 200 as unhealthy).

``POST /invocations``
    Whole recording -> ``offline_asr``.  Body: any file libsndfile reads (wav, flac,
    ogg...; ``Content-Type: audio/wav`` etc. or ``application/octet-stream``), or raw
    16-bit little-endian PCM with ``Content-Type: audio/l16;rate=16000`` (also
    ``audio/pcm``, ``audio/x-raw``; ``rate=``/``channels=`` parameters).  Answer:
    ``{"messages": [...], "transcript": "..."}``.
    With the header ``X-Amzn-SageMaker-Session-Id`` the request is instead one chunk of a
    *streaming* session kept in this process (SageMaker stateful sessions, the
    request-response fallback for clients without HTTP/2): ``NEW_SESSION`` opens one
    (answer header ``X-Amzn-SageMaker-Session-Id: <id>; Expires=<iso time>``, also as
    ``X-Amzn-SageMaker-New-Session-Id``), later
    chunks name the id; the body is raw PCM as above; ``finalize=true`` flushes,
    ``close=true`` ends the session (answer header ``X-Amzn-SageMaker-Closed-Session-Id``).
    Options come from the query string or, through InvokeEndpoint (which has none), from
    ``X-Amzn-SageMaker-Custom-Attributes: finalize=true;close=true``.
    Answer: ``{"messages": [...]}`` = the results of that chunk.

``GET /invocations-bidirectional-stream`` (WebSocket; SageMaker's bidirectional route)
    One WebSocket session = one Triton sequence on the gateway's single persistent gRPC
    stream to Triton.  Binary frames: audio, 16-bit signed little-endian PCM, mono, at
    the model's sample rate unless the query string says otherwise
    (``?encoding=linear16|float32&sample_rate=N``; ``two_pass=true|false``: finals
    re-decoded by Whisper, default env STREAMASR_TWO_PASS; other query keys are per-stream
    decoder options passed on the START request).  A first text message
    ``{"type": "Configure", "encoding": ..., "sample_rate": ..., "options": {...}}`` sent
    before any audio does the same.  Text frames are JSON control messages:
    ``{"type": "Finalize"}``, ``{"type": "KeepAlive"}``, ``{"type": "CloseStream"}``.
    Results go back as text frames (the model's JSON messages) as they arrive.  On
    CloseStream (or the client's close) END is sent, the final results are delivered,
    and the socket closes with 1000.  Errors: a text frame ``{"type": "Error", "code":
    ..., "message": ...}`` then close 1008 (bad input / flooding / a START the model
    refused) or 1011 (server); a START refused by admission control (the server holds
    its limit of streams, streamasr.admission) gets code ``busy`` and close 1013 "try
    again later", and a new HTTP session gets 503 with ``Retry-After``.  WebSocket pings are answered by aiohttp (autoping).

No audio and no transcript text is logged; only ids, counts, sizes and timings.  The
access log shows query keys with their values redacted (``hotwords=`` holds customers'
words) and no headers.

Isolation: sessions share one gRPC stream to Triton; a request gRPC would refuse is
refused before it is sent, and should the stream break anyway, only the sessions with a
request in flight on it fail (``AsrConnection``).  ``/ping`` answers from a health state
a background task keeps fresh; blocking work runs on the gateway's own bounded pool.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from tritonclient.grpc import service_pb2

from streamasr import sagemaker_platform
from streamasr.contract import ModelContract
from streamasr_client.audio import resample, to_mono
from streamasr.decoding.config import parse_bool, parse_int
from streamasr_client.stream import (CONTRACT_MODEL, OFFLINE_MODEL, STREAM_MODEL,
                                     TWO_PASS_MODEL, AsrBusy, AsrConnection, AsrError,
                                     Session)

log = logging.getLogger("streamasr.gateway")

WS_PATH = "/invocations-bidirectional-stream"
SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
# Query keys the gateway itself reads; everything else is a per-stream decoder option.
GATEWAY_KEYS = {"encoding", "sample_rate", "channels", "two_pass"}
ENCODINGS = {"linear16": ("<i2", 32768.0), "float32": ("<f4", 1.0)}
# Client sample rates the gateway resamples from: 8 kHz (telephony) to 192 kHz (studio).
# Resampling multiplies a frame's size by model rate / client rate (x320 at 50 Hz).
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
# Interleaved channels a client may send (averaged to mono): up to 7.1 surround.
MAX_CHANNELS = 8
# /ping answers from the state of a background health check: how often it asks Triton
# (three cheap RPCs), and how old a state may be before /ping stops trusting it.
HEALTH_INTERVAL_S = 1.0
HEALTH_STALE_S = 15.0
# How long a /ping waits for the very first health check after startup.
FIRST_HEALTH_WAIT_S = 1.5
# Bodies are read in pieces of this size, counting against max_body_bytes.
BODY_READ_BYTES = 1 << 16


@dataclass
class GatewayConfig:
    triton_grpc: str = "127.0.0.1:8001"
    grpc_ssl: bool = False
    grpc_root_cert: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    # Requests sent to Triton and not yet answered, per WebSocket session.  Above this the
    # gateway stops reading the socket (TCP backpressure to the client); if the model has
    # not caught up after flood_timeout_s the client gets an error and is closed.
    max_pending_requests: int = 50
    flood_timeout_s: float = 10.0
    # Result messages waiting to be written to a slow client.
    max_outgoing_messages: int = 1000
    # Largest binary frame accepted (bytes); 10 s of 16 kHz int16 is 320 kB.
    max_frame_bytes: int = 1 << 20
    # Longest audio one frame may hold, checked on what goes to Triton (after resampling):
    # feature_extractor refuses chunks over its max_chunk_seconds (10 s) anyway, and this
    # bounds one request to 640 kB of float32 whatever the client's sample rate.
    max_frame_seconds: float = 10.0
    # Largest /invocations body; refused by Content-Length before it is read, or as soon
    # as a streamed (chunked) body passes it.
    max_body_bytes: int = 100 << 20
    # Threads for blocking work (file decoding, whole-file transcription): its own pool,
    # so that long /invocations never delay /ping or WebSocket sessions.
    blocking_threads: int = 8
    close_timeout_s: float = 30.0
    # Stateful /invocations sessions expire after this idle time.
    session_ttl_s: float = 300.0
    heartbeat_s: float | None = None   # server-initiated pings (SageMaker pings us anyway)
    # Streams get two-pass finals (Whisper re-decode) unless they say two_pass=false.
    two_pass: bool = False

    def stream_model(self, two_pass: Any = None) -> str:
        """The streaming model for a session's ``two_pass`` setting (None: the default)."""
        on = self.two_pass if two_pass is None else parse_bool("two_pass", two_pass)
        return TWO_PASS_MODEL if on else STREAM_MODEL

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "GatewayConfig":
        e = os.environ if env is None else env
        c = cls()
        c.port = int(e.get("SAGEMAKER_BIND_TO_PORT", c.port))
        c.triton_grpc = e.get("STREAMASR_TRITON_GRPC", c.triton_grpc)
        c.grpc_ssl = e.get("STREAMASR_TRITON_GRPC_SSL", "false").lower() == "true"
        c.grpc_root_cert = e.get("STREAMASR_TRITON_GRPC_ROOT_CERT") or None
        c.two_pass = parse_bool("STREAMASR_TWO_PASS", e.get("STREAMASR_TWO_PASS", "false"))
        for name, attr, conv in (("STREAMASR_GATEWAY_MAX_PENDING", "max_pending_requests", int),
                                 ("STREAMASR_GATEWAY_MAX_OUTGOING", "max_outgoing_messages", int),
                                 ("STREAMASR_GATEWAY_MAX_FRAME_BYTES", "max_frame_bytes", int),
                                 ("STREAMASR_GATEWAY_MAX_FRAME_SECONDS", "max_frame_seconds",
                                  float),
                                 ("STREAMASR_GATEWAY_MAX_BODY_BYTES", "max_body_bytes", int),
                                 ("STREAMASR_GATEWAY_BLOCKING_THREADS", "blocking_threads",
                                  int),
                                 ("STREAMASR_GATEWAY_FLOOD_TIMEOUT", "flood_timeout_s", float),
                                 ("STREAMASR_GATEWAY_SESSION_TTL", "session_ttl_s", float)):
            if name in e:
                setattr(c, attr, conv(e[name]))
        return c


class BadAudio(ValueError):
    pass


class BodyTooLarge(Exception):
    pass


def parse_sample_rate(value: Any, key: str = "sample_rate") -> int:
    """A client's sample rate: an integer within [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]."""
    rate = parse_int(key, value, 1)      # ValueError names the key
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{key}: must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} "
                         f"Hz, got {rate}")
    return rate


def parse_channels(value: Any, key: str = "channels") -> int:
    channels = parse_int(key, value, 1)
    if channels > MAX_CHANNELS:
        raise ValueError(f"{key}: must be between 1 and {MAX_CHANNELS}, got {channels}")
    return channels


def parse_encoding(value: Any) -> str:
    if value not in ENCODINGS:
        raise ValueError(f"encoding: unknown encoding {value!r} (use {sorted(ENCODINGS)})")
    return value


def decode_pcm(data: bytes, encoding: str, channels: int = 1) -> np.ndarray:
    """Raw PCM bytes -> mono float32 in [-1, 1].  Partial frames are an error (the
    WebSocket path keeps remainders itself)."""
    if encoding not in ENCODINGS:
        raise BadAudio(f"unknown encoding {encoding!r} (use {sorted(ENCODINGS)})")
    dtype, scale = ENCODINGS[encoding]
    width = np.dtype(dtype).itemsize * channels
    if len(data) % width:
        raise BadAudio(f"{len(data)} bytes is not a whole number of {width}-byte frames")
    a = np.frombuffer(data, dtype=dtype).astype(np.float32) / scale
    return to_mono(a.reshape(-1, channels)) if channels > 1 else a


def parse_content_type(value: str | None) -> tuple[str, dict[str, str]]:
    if not value:
        return "application/octet-stream", {}
    main, *params = [p.strip() for p in value.split(";")]
    out = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k.strip().lower()] = v.strip().strip('"')
    return main.lower(), out


RAW_TYPES = {"audio/l16", "audio/pcm", "audio/x-raw", "audio/raw"}


def decode_body(body: bytes, content_type: str | None, model_rate: int) -> np.ndarray:
    """An /invocations body -> mono float32 at the model rate."""
    if not body:
        raise BadAudio("empty body")
    ctype, params = parse_content_type(content_type)
    if ctype in RAW_TYPES:
        try:
            rate = parse_sample_rate(params.get("rate", model_rate), "rate")
            channels = parse_channels(params.get("channels", 1))
        except ValueError as exc:
            raise BadAudio(f"Content-Type {ctype}: {exc}") from None
        enc = "float32" if params.get("encoding") == "float32" else "linear16"
        return resample(decode_pcm(body, enc, channels), rate, model_rate)
    import io

    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(body), dtype="float32", always_2d=False)
    except Exception as exc:  # libsndfile's errors vary by version
        raise BadAudio(f"cannot decode the body as an audio file ({ctype}): {exc}") from None
    return resample(to_mono(audio), rate, model_rate)


class Backend:
    """The gateway's view of Triton: one AsrConnection (one gRPC stream, many sessions),
    which re-opens its stream itself should it break (e.g. Triton restarted)."""

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._conn: AsrConnection | None = None
        self._contract: ModelContract | None = None

    def connection(self) -> AsrConnection:
        with self._lock:
            if self._conn is None:
                root = None
                if self.cfg.grpc_root_cert:
                    with open(self.cfg.grpc_root_cert, "rb") as f:
                        root = f.read()
                self._conn = AsrConnection(self.cfg.triton_grpc, ssl=self.cfg.grpc_ssl,
                                           root_certificates=root)
            return self._conn

    def contract(self) -> ModelContract:
        if self._contract is None:
            self._contract = self.connection().contract()
        return self._contract

    @property
    def known_contract(self) -> ModelContract | None:
        """The contract when it has been fetched already (no I/O)."""
        return self._contract

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) from Triton's own health RPCs."""
        conn = self.connection()
        try:
            if not conn._stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=2).ready:
                return False, "triton server not ready"
            for m in (STREAM_MODEL, OFFLINE_MODEL, CONTRACT_MODEL):
                r = conn._stub.ModelReady(service_pb2.ModelReadyRequest(name=m), timeout=2)
                if not r.ready:
                    return False, f"model {m} not ready"
        except grpc.RpcError as exc:
            return False, f"triton unreachable: {exc.code().name}"
        return True, "ready"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


async def wait_session(s: Session, timeout: float) -> None:
    """``Session.wait`` without a thread: wake on each answer (a session listener)
    instead of parking one of a few pool threads per session until its last answer."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def listener() -> None:
        loop.call_soon_threadsafe(changed.set)

    s.add_listener(listener)
    deadline = loop.time() + timeout
    try:
        while s.pending > 0 and s.failed is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"session {s.sequence_id}: {s.pending} responses missing "
                                   f"after {timeout} s")
            changed.clear()
            if s.pending <= 0 or s.failed is not None:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
    finally:
        s.remove_listener(listener)
    if s.failed is not None:
        raise AsrError(s.failed)


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without content: query values redacted (``hotwords=`` holds
    customers' words), no headers (Referer repeats the query, custom attributes hold
    options)."""

    def log(self, request, response, time: float) -> None:
        keys = "&".join(f"{k}=<redacted>" for k in request.query.keys())
        self.logger.info('%s "%s %s%s" %s %s %.3fs', request.remote, request.method,
                         request.path, f"?{keys}" if keys else "", response.status,
                         response.body_length, time)


@dataclass
class HttpSession:
    """A stateful /invocations streaming session."""
    id: str
    session: Session
    expires: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def request_options(request: web.Request) -> dict[str, str]:
    """Query string plus ``X-Amzn-SageMaker-Custom-Attributes`` (``k=v;k2=v2``): through
    InvokeEndpoint the custom attributes are the only way to pass options (no query)."""
    out = dict(request.query)
    for part in request.headers.get(CUSTOM_ATTRIBUTES_HEADER, "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"type": "Error", "code": code, "message": message},
                             status=status)


#: Seconds a refused client is asked to wait (HTTP Retry-After) before trying again.
RETRY_AFTER_S = 1
#: WebSocket close code "Try Again Later" (RFC 6455 registry): a START refused by
#: admission control.
WS_TRY_AGAIN_LATER = 1013


def _busy(message: str) -> web.Response:
    """503 for a session the server refused at START (at capacity): retry later."""
    resp = _error(503, "busy", message)
    resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    return resp


class Gateway:
    def __init__(self, cfg: GatewayConfig, backend: Backend | None = None):
        self.cfg = cfg
        self.backend = backend or Backend(cfg)
        self.http_sessions: dict[str, HttpSession] = {}
        self.active_ws = 0
        self.ws_sessions: set[WsSession] = set()     # open streams, for the shutdown drain
        self._reaper: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        # (ready, reason, monotonic time of the check); None until the first check
        self.health: tuple[bool, str, float] | None = None
        self._first_health: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(max_workers=cfg.blocking_threads,
                                        thread_name_prefix="gateway-blocking")
        # the health check's own thread: never queued behind blocking work
        self._health_pool = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix="gateway-health")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/invocations", self.invocations)
        app.router.add_get(WS_PATH, self.websocket)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        # InvokeEndpoint's 6 MB / 60 s limits, and draining streams on SIGTERM
        sagemaker_platform.install(app, self)
        return app

    async def _on_startup(self, _app) -> None:
        self._reaper = asyncio.create_task(self._reap_http_sessions())
        self._first_health = asyncio.Event()
        self._health_task = asyncio.create_task(self._health_loop())

    async def _on_shutdown(self, _app) -> None:
        for task in (self._reaper, self._health_task):
            if task:
                task.cancel()
        for hs in list(self.http_sessions.values()):
            self._end_http_session(hs)
        await self._run(self.backend.close)
        self._pool.shutdown(wait=False)
        self._health_pool.shutdown(wait=False)

    async def _run(self, fn, *args, **kw):
        """Blocking work on the gateway's bounded pool (not asyncio's default one)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kw))

    async def _contract(self) -> ModelContract:
        return self.backend.known_contract or await self._run(self.backend.contract)

    # -- /ping ---------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                ok, reason = await loop.run_in_executor(self._health_pool, self.backend.ready)
            except Exception as exc:  # noqa: BLE001 - a failed check is "not ready"
                ok, reason = False, f"health check failed: {type(exc).__name__}"
            if self.health is None or self.health[:2] != (ok, reason):
                log.info("health: %s", reason)
            self.health = (ok, reason, time.monotonic())
            self._first_health.set()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def ping(self, _request: web.Request) -> web.Response:
        """From the background health state: no Triton call on the request path, so a busy
        but healthy container answers at once."""
        if self.health is None and self._first_health is not None:
            try:
                await asyncio.wait_for(self._first_health.wait(), FIRST_HEALTH_WAIT_S)
            except asyncio.TimeoutError:
                pass
        if self.health is None:
            return web.Response(status=503, text="starting: no health check yet")
        ok, reason, at = self.health
        age = time.monotonic() - at
        if age > HEALTH_STALE_S:
            ok, reason = False, f"health check stale ({age:.0f} s old)"
        return web.Response(status=200 if ok else 503, text=reason)

    # -- /invocations --------------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused by its Content-Length before any of it is read, or as soon as
        a streamed body passes max_body_bytes (never read whole first)."""
        limit = self.cfg.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"body of {request.content_length} bytes (Content-Length) is "
                               f"over the limit of {limit} bytes")
        if sagemaker_platform.READ_BODY_KEY in request:   # read (bounded) by the middleware
            body = request[sagemaker_platform.READ_BODY_KEY]
            if len(body) > limit:
                raise BodyTooLarge(f"body over the limit of {limit} bytes")
            return body
        parts, size = [], 0
        async for part in request.content.iter_chunked(BODY_READ_BYTES):
            size += len(part)
            if size > limit:
                raise BodyTooLarge(f"body over the limit of {limit} bytes")
            parts.append(part)
        return b"".join(parts)

    @staticmethod
    def _too_large(exc: BodyTooLarge) -> web.Response:
        resp = _error(413, "too_large", str(exc))
        resp.force_close()          # do not read (or linger on) the rest of the body
        return resp

    async def invocations(self, request: web.Request) -> web.Response:
        if SESSION_HEADER in request.headers:
            return await self._session_chunk(request)
        try:
            body = await self._read_body(request)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        try:
            contract = await self._contract()
            audio = await self._run(decode_body, body, request.headers.get("Content-Type"),
                                    contract.sample_rate)
        except BadAudio as exc:
            return _error(400, "bad_audio", str(exc))
        except (AsrError, grpc.RpcError) as exc:
            return _error(503, "backend", f"model unavailable: {exc}")
        del body
        options = request_options(request)
        t0 = time.monotonic()
        try:
            conn = await self._run(self.backend.connection)
            messages = await self._run(conn.transcribe_file, audio, options=options)
        except AsrError as exc:
            log.warning("invocations: offline_asr refused %.1f s of audio: %s",
                        len(audio) / contract.sample_rate, exc)
            return _error(400, "model_error", str(exc))
        log.info("invocations: %.1f s audio, %d messages, %.0f ms",
                 len(audio) / contract.sample_rate, len(messages),
                 1000 * (time.monotonic() - t0))
        finals = [m["channel"]["alternatives"][0]["transcript"] for m in messages
                  if m.get("type") == "Results" and m.get("is_final")]
        return web.json_response({"messages": messages,
                                  "transcript": " ".join(t for t in finals if t)})

    async def _session_chunk(self, request: web.Request) -> web.Response:
        sid = request.headers[SESSION_HEADER].strip()
        q = request_options(request)
        finalize = q.get("finalize", "false").lower() == "true"
        close = q.get("close", "false").lower() == "true"
        if sid != "NEW_SESSION" and sid not in self.http_sessions:
            return _error(404, "unknown_session", "no such session (expired or closed)")
        try:
            body = await self._read_body(request)
        except BodyTooLarge as exc:
            return self._too_large(exc)
        try:
            contract = await self._contract()
            audio = await self._run(decode_body, body, request.headers.get("Content-Type")
                                    or "audio/l16", contract.sample_rate) if body else None
        except BadAudio as exc:
            return _error(400, "bad_audio", str(exc))
        except (AsrError, grpc.RpcError) as exc:
            return _error(503, "backend", f"model unavailable: {exc}")
        headers = {}
        if sid == "NEW_SESSION":
            options = {k: v for k, v in q.items() if k not in ("finalize", "close", "two_pass")}
            try:
                model = self.cfg.stream_model(q.get("two_pass"))
            except ValueError as exc:
                return _error(400, "bad_request", str(exc))
            conn = await self._run(self.backend.connection)
            session = conn.open_session(options, model=model)
            hs = HttpSession(uuid.uuid4().hex, session, time.monotonic() + self.cfg.session_ttl_s)
            self.http_sessions[hs.id] = hs
            expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.cfg.session_ttl_s)
            # SageMaker reads X-Amzn-SageMaker-Session-Id from the container's answer (as
            # AWS's own containers send it); the New-Session-Id name stays for older clients.
            headers[SESSION_HEADER] = headers[NEW_SESSION_HEADER] = \
                f"{hs.id}; Expires={expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            log.info("http session %s opened", hs.id)
        else:
            hs = self.http_sessions.get(sid)
            if hs is None:
                return _error(404, "unknown_session", "no such session (expired or closed)")
        async with hs.lock:
            hs.expires = time.monotonic() + self.cfg.session_ttl_s
            s = hs.session
            before = len(s.messages)
            try:
                if close:
                    s.close(audio)
                elif audio is not None or finalize or s._sent == 0:
                    s.send(audio, finalize=finalize, keepalive=audio is None and not finalize)
                await wait_session(s, self.cfg.close_timeout_s)
            except AsrBusy as exc:
                self._end_http_session(hs)
                return _busy(str(exc))
            except (AsrError, TimeoutError) as exc:
                self._end_http_session(hs)
                return _error(503, "backend", str(exc))
            if s.refused is not None:       # the START was refused: no session
                self._end_http_session(hs)
                log.info("http session %s refused: server at capacity", hs.id)
                return _busy(s.refused)
            messages = s.messages[before:]
        if close:
            self._end_http_session(hs, send_end=False)
            headers[CLOSED_SESSION_HEADER] = hs.id
            log.info("http session %s closed", hs.id)
        return web.json_response({"messages": messages}, headers=headers)

    def _end_http_session(self, hs: HttpSession, send_end: bool = True) -> None:
        self.http_sessions.pop(hs.id, None)
        if send_end and not hs.session._closed and hs.session._sent > 0:
            try:
                hs.session.close()
            except AsrError:
                pass
        hs.session.conn.forget(hs.session)

    async def _reap_http_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.cfg.session_ttl_s / 2))
            now = time.monotonic()
            for hs in [h for h in self.http_sessions.values() if h.expires < now]:
                log.info("http session %s expired", hs.id)
                self._end_http_session(hs)

    # -- WebSocket -----------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, heartbeat=self.cfg.heartbeat_s,
                                   max_msg_size=self.cfg.max_frame_bytes)
        await ws.prepare(request)       # accept first: SageMaker wants it within 250 ms
        self.active_ws += 1
        session = WsSession(self, ws, dict(request.query))
        self.ws_sessions.add(session)
        try:
            await session.run()
        finally:
            self.ws_sessions.discard(session)
            self.active_ws -= 1
        return ws


class ProtocolError(Exception):
    """Ends a WebSocket session: an Error frame (unless ``notified``: the client has the
    error already) and a close code."""

    def __init__(self, code: str, message: str, close_code: int = 1008,
                 notified: bool = False):
        super().__init__(message)
        self.code, self.close_code, self.notified = code, close_code, notified


class WsSession:
    """One WebSocket = one Triton sequence."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, query: dict[str, str]):
        self.gw, self.ws, self.cfg = gw, ws, gw.cfg
        self.query = query
        self.encoding = "linear16"
        self.sample_rate: int | None = None
        self.channels = 1
        self.two_pass = query.get("two_pass")       # None: the gateway's default
        self.options: dict[str, Any] = {k: v for k, v in query.items() if k not in GATEWAY_KEYS}
        self.session: Session | None = None
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()
        self.started: asyncio.Future = self.loop.create_future()   # the START's answer
        self.overflow = False
        self.remainder = b""
        self.received = 0          # messages handed to us by the reader thread
        self.audio_bytes = 0
        self.id = "-"
        self.draining = False      # set by the shutdown drain: further input is ignored

    def _set_format(self, source: dict, where: str) -> None:
        """encoding / sample_rate / channels from the query or a Configure message."""
        try:
            if "encoding" in source:
                self.encoding = parse_encoding(source["encoding"])
            if "sample_rate" in source:
                self.sample_rate = parse_sample_rate(source["sample_rate"])
            if "channels" in source:
                self.channels = parse_channels(source["channels"])
        except ValueError as exc:
            raise ProtocolError("bad_request", f"{where}: {exc}") from None

    # results arrive on the connection's reader thread
    def _on_message(self, m: dict) -> None:
        self.loop.call_soon_threadsafe(self._enqueue, m)

    def _on_start(self, error: str | None) -> None:
        self.loop.call_soon_threadsafe(
            lambda: self.started.done() or self.started.set_result(error))

    def _enqueue(self, m: dict) -> None:
        self.received += 1
        if self.out.qsize() >= self.cfg.max_outgoing_messages:
            self.overflow = True
            return
        self.out.put_nowait(m)

    async def _writer(self) -> None:
        while True:
            m = await self.out.get()
            if m is None:
                return
            await self.ws.send_str(json.dumps(m, ensure_ascii=False))

    def _configure(self, msg: dict) -> None:
        if self.session is not None and self.session._sent:
            raise ProtocolError("bad_request", "Configure must come before any audio")
        self._set_format(msg, "Configure")
        self.two_pass = msg.get("two_pass", self.two_pass)
        options = msg.get("options") or {}
        if not isinstance(options, dict):
            raise ProtocolError("bad_request", "Configure: options must be a JSON object "
                                f"of decoder options, got {type(options).__name__}")
        self.options.update(options)

    async def _open(self) -> Session:
        if self.session is None:
            contract = await self.gw._contract()
            self.model_rate = contract.sample_rate
            if self.sample_rate is None:
                self.sample_rate = self.model_rate
            try:
                model = self.cfg.stream_model(self.two_pass)
            except ValueError as exc:
                raise ProtocolError("bad_request", str(exc)) from None
            conn = self.gw.backend.connection()     # made once, no I/O
            self.session = conn.open_session(self.options, on_message=self._on_message,
                                             model=model)
            self.session.on_start = self._on_start
            self.id = str(self.session.sequence_id)
            log.info("ws %s: opened (encoding %s, %d Hz, %d options)", self.id,
                     self.encoding, self.sample_rate, len(self.options))
        return self.session

    async def _accepted(self) -> None:
        """Once START has been sent: wait for Triton's answer to it; a refused START ends
        the session with that error (the client has it already) instead of carrying on
        with requests for a stream that does not exist."""
        s = self.session
        if s is None or s._sent == 0:
            return
        try:
            error = await asyncio.wait_for(asyncio.shield(self.started),
                                           self.cfg.close_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer to the START request after "
                               f"{self.cfg.close_timeout_s:g} s") from None
        if s.failed is not None:
            raise AsrError(s.failed)        # lost with a broken stream, not refused
        if s.refused is not None:
            raise ProtocolError("busy", s.refused, close_code=WS_TRY_AGAIN_LATER,
                                notified=True)
        if error is not None:
            raise ProtocolError("start_refused", error, notified=True)

    async def _check_flood(self) -> None:
        """Wait (not reading the socket) while too many chunks are in flight; a client
        still ahead of the model after flood_timeout_s is flooding."""
        deadline = time.monotonic() + self.cfg.flood_timeout_s
        while self.session.pending >= self.cfg.max_pending_requests:
            if time.monotonic() >= deadline:
                raise ProtocolError(
                    "backpressure",
                    f"{self.session.pending} audio chunks still waiting for the model after "
                    f"{self.cfg.flood_timeout_s:.0f} s (limit {self.cfg.max_pending_requests}):"
                    f" send audio no faster than the model transcribes it")
            await asyncio.sleep(0.005)
        if self.overflow:
            raise ProtocolError("backpressure", "client is not reading results fast enough")

    async def _audio(self, data: bytes) -> None:
        if self.draining:
            return
        s = await self._open()
        await self._accepted()
        await self._check_flood()
        if self.draining:          # the drain ENDed the sequence while this waited
            return
        width = np.dtype(ENCODINGS[self.encoding][0]).itemsize * self.channels
        data = self.remainder + data
        cut = len(data) - len(data) % width
        self.remainder = data[cut:]
        if not cut:
            return
        # The size that matters is what goes to Triton, after resampling: bounded by
        # duration, checked before resampling allocates it.
        seconds = cut // width / self.sample_rate
        if seconds > self.cfg.max_frame_seconds:
            raise ProtocolError(
                "frame_too_large",
                f"a frame of {cut} bytes holds {seconds:.1f} s of audio at "
                f"{self.sample_rate} Hz ({self.encoding}, {self.channels} channel(s)); "
                f"the limit is {self.cfg.max_frame_seconds:g} s of audio per frame")
        audio = resample(decode_pcm(data[:cut], self.encoding, self.channels),
                         self.sample_rate, self.model_rate)
        self.audio_bytes += cut
        s.send(audio)

    async def _control(self, text: str) -> bool:
        """Handle a text frame; True when the client asked to close."""
        if self.draining:
            return False
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("bad_request",
                                'text frames must be JSON objects with a "type"') from None
        if kind == "Configure":
            self._configure(msg)
        elif kind == "Finalize":
            s = await self._open()
            await self._accepted()
            s.finalize()
        elif kind == "KeepAlive":
            s = await self._open()
            await self._accepted()
            s.keepalive()
        elif kind == "CloseStream":
            return True
        else:
            raise ProtocolError("bad_request", f"unknown message type {kind!r}")
        return False

    async def _finish(self) -> None:
        """END the sequence and wait for its last responses."""
        s = self.session
        if s is None or s._closed:
            return
        if s._sent == 0:
            # Nothing was ever sent: there is no sequence to end.
            return
        await self._accepted()
        s.close()
        await wait_session(s, self.cfg.close_timeout_s)
        # listeners are called after on_message, both through call_soon_threadsafe: every
        # message has been enqueued by now.

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        close_code, reason = 1000, ""
        client_gone = False
        try:
            self._set_format(self.query, "query string")
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    await self._audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    if await self._control(msg.data):
                        break
                elif msg.type == WSMsgType.ERROR:
                    log.warning("ws %s: transport error %s", self.id, self.ws.exception())
                    client_gone = True
                    break
            else:
                client_gone = True       # the client closed the socket
            await self._finish()
        except ProtocolError as exc:
            log.warning("ws %s: closing, %s", self.id, exc.code)
            if not exc.notified:
                self._enqueue_error(exc.code, str(exc))
            close_code, reason = exc.close_code, exc.code
        except (AsrError, TimeoutError) as exc:
            log.error("ws %s: backend failure: %s", self.id, exc)
            self._enqueue_error("backend", str(exc))
            close_code, reason = 1011, "backend"
        finally:
            s = self.session
            if (s is not None and not s._closed and s._sent and s.failed is None
                    and self.started.done() and self.started.result() is None):
                try:
                    s.close()     # frees the Triton sequence slot
                except AsrError:
                    pass
            self.out.put_nowait(None)
            try:
                if not client_gone:
                    await asyncio.wait_for(writer, self.cfg.close_timeout_s)
                else:
                    writer.cancel()
            except (asyncio.TimeoutError, ConnectionError, asyncio.CancelledError):
                writer.cancel()
            if s is not None:
                asyncio.create_task(self._forget_later(s))
            if not self.ws.closed:
                await self.ws.close(code=close_code, message=reason.encode())
            log.info("ws %s: closed %d (%d audio bytes, %d responses)", self.id, close_code,
                     self.audio_bytes, len(s.messages) if s else 0)

    async def _forget_later(self, s: Session) -> None:
        """Drop the session from the connection once its last responses are in (until
        then they still find it instead of being logged as unknown)."""
        try:
            await wait_session(s, self.cfg.close_timeout_s)
        except (AsrError, TimeoutError):
            pass
        s.conn.forget(s)

    def _enqueue_error(self, code: str, message: str) -> None:
        # Errors go out even when the result queue is full.
        self.out.put_nowait({"type": "Error", "code": code, "message": message})


def serve_app(app: web.Application, host: str, port: int, **kw) -> None:
    """``web.run_app`` with the redacting access log (both entry points use it)."""
    web.run_app(app, host=host, port=port, print=None,
                access_log_class=RedactingAccessLogger, **kw)


def run(cfg: GatewayConfig) -> None:
    gw = Gateway(cfg)
    log.info("gateway on %s:%d -> triton gRPC %s%s", cfg.host, cfg.port, cfg.triton_grpc,
             " (TLS)" if cfg.grpc_ssl else "")
    serve_app(gw.app(), cfg.host, cfg.port, handle_signals=True,
              shutdown_timeout=cfg.close_timeout_s)

def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("STREAMASR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m streamasr.gateway", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = GatewayConfig.from_env()
    p.add_argument("--host", default=cfg.host)
    p.add_argument("--port", type=int, default=cfg.port)
    p.add_argument("--triton-grpc", default=cfg.triton_grpc)
    a = p.parse_args(argv)
    cfg.host, cfg.port, cfg.triton_grpc = a.host, a.port, a.triton_grpc
    # SIGTERM -> aiohttp's GracefulExit: stop accepting, close sockets, run on_shutdown.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
