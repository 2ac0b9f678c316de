"""The process that owns SageMaker's port (8080) in the container, in front of Triton.

Routes (SageMaker's container contract plus bidirectional streaming):

``GET /ping``
    200 when the pipeline answers (streamasr/sagemaker/gateway/health.py: models ready, python
    stubs alive, a canary stream answered in time), else 503 with the reason (SageMaker
    treats anything but 200 as unhealthy).

``GET /v1/listen`` (WebSocket)
    Deepgram's live transcription API, so that Deepgram's SDKs work unchanged (through
    SageMaker: invocation path ``v1/listen``); deepgram.py and docs/deepgram.md.

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
    (``?encoding=linear16|float32|mulaw|alaw&sample_rate=N``; ``two_pass=true|false``: finals
    re-decoded by Whisper, default env STREAMASR_TWO_PASS; other query keys must be
    per-stream decoder options, ``protocol.STREAM_OPTION_KEYS``, passed on the START
    request: any other key is refused by name, see options.py).  A first text message
    ``{"type": "Configure", "encoding": ..., "sample_rate": ..., "options": {...}}`` sent
    before any audio does the same.  Text frames are JSON control messages:
    ``{"type": "Finalize"}``, ``{"type": "KeepAlive"}``, ``{"type": "CloseStream"}``;
    every frame costs (config.py: a frame rate, a control-message rate, the session's
    window of unanswered requests, KeepAlives coalesced), and a socket silent for
    ``idle_timeout_s`` is ended.
    Results go back as text frames (the model's JSON messages) as they arrive.  On
    CloseStream (or the client's close) END is sent, the final results are delivered,
    and the socket closes with 1000.  Errors: a text frame ``{"type": "Error", "code":
    ..., "message": ...}`` then close 1008 (bad input / flooding / a START the model
    refused) or 1011 (server); a START refused by admission control (the server holds
    its limit of streams, streamasr.core.admission) gets code ``busy`` and close 1013 "try
    again later", and a new HTTP session gets 503 with ``Retry-After``.  WebSocket pings are answered by aiohttp (autoping).

No client-supplied text is logged (audio, transcripts, option values, unknown keys,
paths); only the gateway's own session ids, counts, sizes, codes and timings.  The access
log shows known routes and query keys, values redacted, no headers.  Messages to clients
never show Triton sequence ids.

Isolation: sessions share one gRPC stream to Triton; a request gRPC would refuse is
refused before it is sent, and should the stream break anyway, only the sessions with a
request in flight on it fail (``AsrConnection``).  ``/ping`` answers from a health state
a background task keeps fresh; blocking work runs on the gateway's own bounded pool.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from streamasr import protocol
from streamasr.cli import argument_parser
from streamasr.core.params import parse_bool
from streamasr.protocol import (
    CLOSED_SESSION_HEADER,
    CUSTOM_ATTRIBUTES_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    WS_PATH,
    ModelContract,
)
from streamasr.sagemaker.gateway import deepgram
from streamasr.sagemaker.gateway import platform as sagemaker_platform
from streamasr.sagemaker.gateway.audio import BadAudio, decode_body
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.health import (
    FIRST_HEALTH_WAIT_S,
    HEALTH_INTERVAL_S,
    HEALTH_STALE_S,
    Backend,
)
from streamasr.sagemaker.gateway.options import (
    OptionError,
    client_message,
    client_options,
    hide_sequence_id,
)
from streamasr.sagemaker.gateway.ws import GATEWAY_KEYS, WsSession, wait_session
from streamasr_client.stream import AsrBusy, AsrError, Session

log = logging.getLogger("streamasr.gateway")

# Bodies are read in pieces of this size, counting against max_body_bytes.
BODY_READ_BYTES = 1 << 16


class BodyTooLarge(Exception):
    pass


class Refused(Exception):
    """A request answered with ``response`` before it reached the model."""

    def __init__(self, response: web.Response):
        super().__init__(response.status)
        self.response = response


# Keys /invocations reads itself beside the stream options: a whole file, and one chunk
# of a stateful session.
INVOCATION_KEYS = protocol.OFFLINE_OPTION_KEYS
SESSION_CHUNK_KEYS = frozenset({"finalize", "close", "two_pass"})
# What the access log may name of a request (everything else is shown as <other>).
ROUTES = frozenset({"/ping", protocol.INVOCATIONS_PATH, WS_PATH, deepgram.LISTEN_PATH})
LOGGED_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE"})
LOGGED_QUERY_KEYS = (
    protocol.STREAM_OPTION_KEYS | GATEWAY_KEYS | SESSION_CHUNK_KEYS | set(deepgram.PARAMETERS)
)


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without content: query values redacted (``hotwords=`` holds
    customers' words), no headers (Referer repeats the query, custom attributes hold
    options)."""

    def log(self, request, response, time: float) -> None:
        # keys and paths are client input too: only the ones the gateway knows are shown
        keys = "&".join(
            f"{k if k in LOGGED_QUERY_KEYS else '<other>'}=<redacted>" for k in request.query
        )
        self.logger.info(
            '%s "%s %s%s" %s %s %.3fs',
            request.remote,
            request.method if request.method in LOGGED_METHODS else "<other>",
            request.path if request.path in ROUTES else "<other path>",
            f"?{keys}" if keys else "",
            response.status,
            response.body_length,
            time,
        )


@dataclass
class HttpSession:
    """A stateful /invocations streaming session."""

    id: str
    session: Session
    expires: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def redacted(self, text: str) -> str:
        return hide_sequence_id(text, self.session.sequence_id)

    def redacted_message(self, m: dict) -> dict:
        return client_message(m, self.session.sequence_id)


def request_options(
    request: web.Request, route_keys: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stream options, the route's own keys) from the query string plus
    ``X-Amzn-SageMaker-Custom-Attributes`` (``k=v;k2=v2``: through InvokeEndpoint the
    custom attributes are the only way to pass options); any other key, and any bad
    value, is an OptionError naming it."""
    out: dict[str, Any] = dict(request.query)
    for part in request.headers.get(CUSTOM_ATTRIBUTES_HEADER, "").split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        elif part.strip():
            raise OptionError(f"{CUSTOM_ATTRIBUTES_HEADER}: parts must be key=value")
    return client_options(out, route_keys)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"type": "Error", "code": code, "message": message}, status=status)


def _busy(message: str) -> web.Response:
    """503 for a session the server refused at START (at capacity): retry later."""
    resp = _error(503, protocol.BUSY_CODE, message)
    resp.headers["Retry-After"] = str(protocol.RETRY_AFTER_S)
    return resp


class Gateway:
    def __init__(self, cfg: GatewayConfig, backend: Backend | None = None):
        self.cfg = cfg
        self.backend = backend or Backend(cfg)
        self.http_sessions: dict[str, HttpSession] = {}
        self.active_ws = 0
        self.invocations_running = 0  # whole-file /invocations being transcribed
        self.ws_sessions: set[WsSession] = set()  # open streams, for the shutdown drain
        self._reaper: asyncio.Task | None = None
        self._health_task: asyncio.Task | None = None
        # (ready, reason, monotonic time of the check); None until the first check
        self.health: tuple[bool, str, float] | None = None
        self._first_health: asyncio.Event | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.blocking_threads, thread_name_prefix="gateway-blocking"
        )
        # the health check's own thread: never queued behind blocking work
        self._health_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-health")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/ping", self.ping)  # the bidirectional contract pings by POST
        app.router.add_post("/invocations", self.invocations)
        app.router.add_get(WS_PATH, self.websocket)
        app.router.add_get(deepgram.LISTEN_PATH, self.deepgram_websocket)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        # InvokeEndpoint's 6 MB / 60 s limits, and draining streams on SIGTERM
        sagemaker_platform.install(app, self.ws_sessions)
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
            self._pool, functools.partial(fn, *args, **kw)
        )

    async def contract(self) -> ModelContract:
        return self.backend.known_contract or await self._run(self.backend.contract)

    # -- /ping ---------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        first_health = self._first_health
        assert first_health is not None  # made by _on_startup, which starts us
        while True:
            try:
                ok, reason = await loop.run_in_executor(self._health_pool, self.backend.ready)
            except Exception as exc:  # noqa: BLE001 - a failed check is "not ready"
                ok, reason = False, f"health check failed: {type(exc).__name__}"
            if self.health is None or self.health[:2] != (ok, reason):
                log.log(logging.INFO if ok else logging.WARNING, "health: %s", reason)
            self.health = (ok, reason, time.monotonic())
            first_health.set()
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
            raise BodyTooLarge(
                f"body of {request.content_length} bytes (Content-Length) is "
                f"over the limit of {limit} bytes"
            )
        if sagemaker_platform.READ_BODY_KEY in request:  # read (bounded) by the middleware
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
        resp.force_close()  # do not read (or linger on) the rest of the body
        return resp

    async def _body_audio(
        self, request: web.Request, session_chunk: bool = False
    ) -> tuple[np.ndarray | None, ModelContract]:
        """The body as audio at the model's rate, and the contract; a refusal is raised as
        ``Refused`` with its answer.  A session chunk's body may be empty (None: no audio)
        and is raw PCM unless its Content-Type says otherwise."""
        try:
            body = await self._read_body(request)
        except BodyTooLarge as exc:
            raise Refused(self._too_large(exc)) from None
        ctype = request.headers.get("Content-Type")
        try:
            contract = await self.contract()
            if session_chunk:
                if not body:
                    return None, contract
                ctype = ctype or "audio/l16"
            audio = await self._run(decode_body, body, ctype, contract.sample_rate)
        except BadAudio as exc:
            raise Refused(_error(400, "bad_audio", str(exc))) from None
        except (AsrError, grpc.RpcError) as exc:
            raise Refused(_error(503, "backend", f"model unavailable: {exc}")) from None
        return audio, contract

    async def invocations(self, request: web.Request) -> web.Response:
        if SESSION_HEADER in request.headers:
            return await self._session_chunk(request)
        try:
            options, own = request_options(request, INVOCATION_KEYS)
        except OptionError as exc:
            return _error(400, "bad_request", str(exc))
        if self.invocations_running >= self.cfg.max_concurrent_invocations:
            # whole files hold the pipeline for seconds each: beyond the limit they would
            # take the streams' share of the server (streams have their admission limit)
            log.info("invocations: refused, %d running", self.invocations_running)
            return _busy(
                f"{protocol.CAPACITY_MARKER}: {self.invocations_running} whole-file "
                "transcriptions running; retry later or stream the audio"
            )
        self.invocations_running += 1
        try:
            return await self._transcribe(request, {**options, **own})
        finally:
            self.invocations_running -= 1

    async def _transcribe(self, request: web.Request, options: dict[str, Any]) -> web.Response:
        try:
            audio, contract = await self._body_audio(request)
        except Refused as refused:
            return refused.response
        assert audio is not None
        t0 = time.monotonic()
        try:
            conn = await self._run(self.backend.connection)
            messages = await self._run(conn.transcribe_file, audio, options=options)
        except AsrError as exc:
            # the message may quote the client's options: not logged
            log.warning(
                "invocations: offline_asr refused %.1f s of audio",
                len(audio) / contract.sample_rate,
            )
            return _error(400, "model_error", str(exc))
        log.info(
            "invocations: %.1f s audio, %d messages, %.0f ms",
            len(audio) / contract.sample_rate,
            len(messages),
            1000 * (time.monotonic() - t0),
        )
        return web.json_response(
            {"messages": messages, "transcript": protocol.final_text(messages)}
        )

    async def _session_chunk(self, request: web.Request) -> web.Response:
        sid = request.headers[SESSION_HEADER].strip()
        try:
            options, q = request_options(request, SESSION_CHUNK_KEYS)
            finalize = parse_bool("finalize", q.get("finalize", "false"))
            close = parse_bool("close", q.get("close", "false"))
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if sid != NEW_SESSION and sid not in self.http_sessions:
            return _error(404, "unknown_session", "no such session (expired or closed)")
        try:
            audio, _ = await self._body_audio(request, session_chunk=True)
        except Refused as refused:
            return refused.response
        headers = {}
        if sid != NEW_SESSION and options:
            return _error(
                400, "bad_request", "stream options are accepted only on the NEW_SESSION request"
            )
        if sid == NEW_SESSION:
            try:
                model = self.cfg.stream_model(q.get("two_pass"))
            except ValueError as exc:
                return _error(400, "bad_request", str(exc))
            late = self.backend.admission_refusal()
            if late is not None:  # the queues are too long for another stream now
                log.info("http session refused: %s", late)
                return _busy(late)
            conn = await self._run(self.backend.connection, model)
            session = conn.open_session(options, model=model)
            hs = HttpSession(uuid.uuid4().hex, session, time.monotonic() + self.cfg.session_ttl_s)
            self.http_sessions[hs.id] = hs
            expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(
                seconds=self.cfg.session_ttl_s
            )
            # SageMaker reads X-Amzn-SageMaker-Session-Id from the container's answer (as
            # AWS's own containers send it); the New-Session-Id name stays for older clients.
            headers[SESSION_HEADER] = headers[NEW_SESSION_HEADER] = (
                f"{hs.id}; Expires={expires.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            )
            log.info("http session %s opened", hs.id)
        else:
            known = self.http_sessions.get(sid)
            if known is None:
                return _error(404, "unknown_session", "no such session (expired or closed)")
            hs = known
        async with hs.lock:
            hs.expires = time.monotonic() + self.cfg.session_ttl_s
            s = hs.session
            before = len(s.messages)
            try:
                if audio is not None:  # keep within the server's max_lead_seconds
                    await asyncio.sleep(s.send_delay(len(audio)))
                if close:
                    s.close(audio)
                elif audio is not None or finalize or not s.started:
                    s.send(audio, finalize=finalize, keepalive=audio is None and not finalize)
                await wait_session(s, self.cfg.close_timeout_s)
            except AsrBusy as exc:
                self._end_http_session(hs)
                return _busy(hs.redacted(str(exc)))
            except (AsrError, TimeoutError) as exc:
                self._end_http_session(hs)
                return _error(503, "backend", hs.redacted(str(exc)))
            if s.refused is not None:  # the START was refused: no session
                self._end_http_session(hs)
                log.info("http session %s refused: server at capacity", hs.id)
                return _busy(hs.redacted(s.refused))
            messages = [hs.redacted_message(m) for m in s.messages[before:]]
        if close:
            self._end_http_session(hs, send_end=False)
            headers[CLOSED_SESSION_HEADER] = hs.id
            log.info("http session %s closed", hs.id)
        return web.json_response({"messages": messages}, headers=headers)

    def _end_http_session(self, hs: HttpSession, send_end: bool = True) -> None:
        self.http_sessions.pop(hs.id, None)
        if send_end and not hs.session.closed and hs.session.started:
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
        return await self._serve_ws(request, lambda ws: WsSession(self, ws, dict(request.query)))

    async def deepgram_websocket(self, request: web.Request) -> web.StreamResponse:
        """Deepgram's live API (deepgram.py); through SageMaker, the invocation path v1/listen."""
        query = deepgram.listen_query(request)
        return await self._serve_ws(request, lambda ws: deepgram.DeepgramSession(self, ws, query))

    async def _serve_ws(self, request: web.Request, make_session) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            autoping=True,
            heartbeat=self.cfg.heartbeat_s,
            max_msg_size=self.cfg.max_frame_bytes,
            timeout=self.cfg.ws_close_timeout_s,
        )
        await ws.prepare(request)  # accept first: SageMaker wants it within 250 ms
        self.active_ws += 1
        session = make_session(ws)
        self.ws_sessions.add(session)
        try:
            await session.run()
        finally:
            self.ws_sessions.discard(session)
            self.active_ws -= 1
        return ws


def serve_app(app: web.Application, host: str, port: int, **kw) -> None:
    """``web.run_app`` with the redacting access log (both entry points use it)."""
    web.run_app(app, host=host, port=port, print=None, access_log_class=RedactingAccessLogger, **kw)


def run(cfg: GatewayConfig) -> None:
    gw = Gateway(cfg)
    log.info(
        "gateway on %s:%d -> triton gRPC %s%s",
        cfg.host,
        cfg.port,
        cfg.triton_grpc,
        " (TLS)" if cfg.grpc_ssl else "",
    )
    serve_app(
        gw.app(), cfg.host, cfg.port, handle_signals=True, shutdown_timeout=cfg.close_timeout_s
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("STREAMASR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    p = argument_parser("python -m streamasr.sagemaker.gateway.http", __doc__)
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
