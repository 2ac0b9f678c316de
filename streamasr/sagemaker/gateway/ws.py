"""The WebSocket route (SageMaker's bidirectional stream): one WebSocket session = one
Triton sequence on the gateway's shared gRPC stream; the protocol is in http.py's module
documentation."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import traceback
from typing import Any, Protocol

import numpy as np
from aiohttp import WSMsgType, web

from streamasr import protocol
from streamasr.sagemaker.gateway.audio import (
    ENCODINGS,
    decode_pcm,
    parse_channels,
    parse_encoding,
    parse_sample_rate,
)
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.health import Backend
from streamasr.sagemaker.gateway.options import (
    OptionError,
    check_values,
    client_message,
    client_options,
    hide_sequence_id,
)
from streamasr_client.audio import resample
from streamasr_client.stream import AsrError, Session


class Gateway(Protocol):
    """What a WebSocket session uses of the gateway (http.Gateway): its settings, its
    connection to Triton, the model contract.  Named here so that ws.py need not import
    http.py, which imports it."""

    cfg: GatewayConfig
    backend: Backend

    async def contract(self) -> protocol.ModelContract: ...


log = logging.getLogger("streamasr.gateway")


# Query keys the gateway itself reads; every other key must be a per-stream option.
GATEWAY_KEYS = frozenset({"encoding", "sample_rate", "channels", "two_pass"})
# Keys of a Configure message: the gateway's own, its type, and the options object.
CONFIGURE_KEYS = GATEWAY_KEYS | {"type", "options"}


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, counted only up to ``limit + 1``."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((json_depth(v, limit - 1) for v in items), default=0)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up (one token per frame)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self.tokens, self.at = float(burst), clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_s(self) -> float:
        """Seconds until a token is there."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


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
                raise TimeoutError(
                    f"session {s.sequence_id}: {s.pending} responses missing after {timeout} s"
                )
            changed.clear()
            if s.pending <= 0 or s.failed is not None:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass
    finally:
        s.remove_listener(listener)
    # The reader thread schedules a message's callbacks (call_soon_threadsafe) before it
    # counts the answer, and the loop above can see the count reach 0 without yielding: one
    # yield runs the callbacks already scheduled, so when this returns every message has
    # been handed on (a WebSocket's last final was lost behind its writer's end marker
    # under load: test_websocket_stream_equals_invocations).
    await asyncio.sleep(0)
    if s.failed is not None:
        raise AsrError(s.failed)


class ProtocolError(Exception):
    """Ends a WebSocket session: an Error frame (unless ``notified``: the client has the
    error already) and a close code."""

    def __init__(self, code: str, message: str, close_code: int = 1008, notified: bool = False):
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
        self.two_pass: Any = None  # None: the gateway's default
        self.options: dict[str, Any] = {}  # checked in run(): the query is client input
        self.frames = TokenBucket(self.cfg.max_frames_per_s, self.cfg.frame_burst)
        self.control_frames = TokenBucket(
            self.cfg.max_control_frames_per_s, self.cfg.control_frame_burst
        )
        self.last_request_at = 0.0  # monotonic time of the last request sent to Triton
        # Audio not yet sent: frames shorter than min_request_s are joined (one Triton
        # request per frame let a client of 10 ms frames cost 40 requests a chunk).
        self.buffered: list[np.ndarray] = []
        self.finalized = False  # a Finalize went out and no audio came after it
        self.session: Session | None = None
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()
        self.started: asyncio.Future = self.loop.create_future()  # the START's answer
        self.overflow = False
        self.remainder = b""
        self.received = 0  # messages handed to us by the reader thread
        self.audio_bytes = 0
        # The session's name in the gateway's log; the Triton sequence id is never shown
        # to a client (nor logged): knowing it would be the first step to another stream.
        self.id = secrets.token_hex(4)
        self.draining = False  # set by the shutdown drain: further input is ignored

    def _query(self) -> None:
        """Format and options from the query string, refused as a whole if any key or
        value is not one the gateway takes."""
        self._set_format(self.query, "query string")
        try:
            self.options, own = client_options(self.query, GATEWAY_KEYS)
        except OptionError as exc:
            raise ProtocolError("bad_request", f"query string: {exc}") from None
        self.two_pass = own.get("two_pass")
        self._check_two_pass()

    def _check_two_pass(self) -> None:
        try:
            self.cfg.stream_model(self.two_pass)
        except ValueError as exc:
            raise ProtocolError("bad_request", str(exc)) from None

    def _redacted(self, text: str) -> str:
        return text if self.session is None else hide_sequence_id(text, self.session.sequence_id)

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
        def settle() -> None:
            if not self.started.done():
                self.started.set_result(error)

        self.loop.call_soon_threadsafe(settle)

    def _enqueue(self, m: dict) -> None:
        self.received += 1  # one per message of the model (the drain counts them)
        if self.session is not None:
            m = client_message(m, self.session.sequence_id)
        for out in self._outgoing(m):
            self._put(out)

    def _outgoing(self, m: dict) -> list[dict]:
        """What the client gets for one message of the model (a dialect rewrites it)."""
        return [m]

    def _put(self, m: dict) -> None:
        if self.out.qsize() >= self.cfg.max_outgoing_messages:
            self.overflow = True
            return
        self.out.put_nowait(m)

    @staticmethod
    def _dumps(m: dict) -> str:
        return json.dumps(m, ensure_ascii=False)

    async def _writer(self) -> None:
        while True:
            m = await self.out.get()
            if m is None:
                return
            await self.ws.send_str(self._dumps(m))

    def _configure(self, msg: dict) -> None:
        if self.session is not None and self.session.started:
            raise ProtocolError("bad_request", "Configure must come before any audio")
        unknown = sorted(k[:64] for k in set(msg) - CONFIGURE_KEYS)
        if unknown:
            raise ProtocolError(
                "bad_request",
                f"Configure: unknown field(s) {unknown}; fields: {sorted(CONFIGURE_KEYS)} "
                '(stream options go in "options")',
            )
        self._set_format(msg, "Configure")
        self.two_pass = msg.get("two_pass", self.two_pass)
        self._check_two_pass()
        options = msg.get("options") or {}
        if not isinstance(options, dict):
            raise ProtocolError(
                "bad_request",
                "Configure: options must be a JSON object "
                f"of decoder options, got {type(options).__name__}",
            )
        try:
            given, _ = client_options(options, validate=False)
            merged = {**self.options, **given}
            check_values(merged)
        except OptionError as exc:
            raise ProtocolError("bad_request", f"Configure: {exc}") from None
        self.options = merged

    async def _open(self) -> Session:
        if self.session is None:
            contract = await self.gw.contract()
            self.model_rate = contract.sample_rate
            if self.sample_rate is None:
                self.sample_rate = self.model_rate
            try:
                model = self.cfg.stream_model(self.two_pass)
            except ValueError as exc:
                raise ProtocolError("bad_request", str(exc)) from None
            late = self.gw.backend.admission_refusal()
            if late is not None:  # the queues are too long for another stream now
                raise ProtocolError(
                    protocol.BUSY_CODE, late, close_code=protocol.WS_TRY_AGAIN_LATER
                )
            conn = self.gw.backend.connection(model)  # made once per model, no I/O
            self.session = conn.open_session(self.options, on_message=self._on_message, model=model)
            self.session.on_start = self._on_start
            log.info(
                "ws %s: opened (encoding %s, %d Hz, %d options)",
                self.id,
                self.encoding,
                self.sample_rate,
                len(self.options),
            )
        return self.session

    async def _accepted(self) -> None:
        """Once START has been sent: wait for Triton's answer to it; a refused START ends
        the session with that error (the client has it already) instead of carrying on
        with requests for a stream that does not exist."""
        s = self.session
        if s is None or not s.started:
            return
        try:
            error = await asyncio.wait_for(asyncio.shield(self.started), self.cfg.close_timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no answer to the START request after {self.cfg.close_timeout_s:g} s"
            ) from None
        if s.failed is not None:
            raise AsrError(s.failed)  # lost with a broken stream, not refused
        if s.refused is not None:  # admission control: retry later
            raise ProtocolError(
                protocol.BUSY_CODE, s.refused, close_code=protocol.WS_TRY_AGAIN_LATER, notified=True
            )
        if error is not None:
            raise ProtocolError("start_refused", error, notified=True)

    async def _check_flood(self) -> None:
        """Wait (not reading the socket) while the session's window of requests is full
        (audio, Finalize and KeepAlive all count).  Still full after flood_timeout_s: a
        client whose audio runs ahead of real time is flooding; one at real time is not
        to blame, the server is overloaded (told so, "try again later")."""
        s = self.session
        assert s is not None  # opened before any request
        deadline = time.monotonic() + self.cfg.flood_timeout_s
        while s.pending >= self.cfg.max_pending_requests:
            if time.monotonic() >= deadline:
                lead = s.lead_seconds()
                if lead is not None and lead <= self.cfg.flood_lead_s:
                    raise ProtocolError(
                        "overloaded",
                        f"the server has not answered {s.pending} requests of this stream "
                        f"for {self.cfg.flood_timeout_s:.0f} s although its audio came at "
                        "real time: the server is overloaded; reconnect later",
                        close_code=protocol.WS_TRY_AGAIN_LATER,
                    )
                raise ProtocolError(
                    "backpressure",
                    f"{s.pending} requests still waiting for the model after "
                    f"{self.cfg.flood_timeout_s:.0f} s (limit {self.cfg.max_pending_requests}):"
                    f" send audio no faster than the model transcribes it",
                )
            await asyncio.sleep(0.005)
        if self.overflow:
            raise ProtocolError("backpressure", "client is not reading results fast enough")

    async def _rate(self, control: bool) -> None:
        """Every frame costs a token; a control frame beyond its own rate ends the
        session, an audio frame beyond the frame rate waits (is read later)."""
        if control and not self.control_frames.take():
            raise ProtocolError(
                "rate_limited",
                f"more than {self.cfg.max_control_frames_per_s:g} control messages a second "
                f"(burst {self.cfg.control_frame_burst})",
            )
        while not self.frames.take():
            await asyncio.sleep(self.frames.wait_s())

    async def _audio(self, data: bytes) -> None:
        if self.draining:
            return
        s = await self._open()
        await self._accepted()
        await self._check_flood()
        if self.draining:  # the drain ENDed the sequence while this waited
            return
        width = np.dtype(ENCODINGS[self.encoding][0]).itemsize * self.channels
        data = self.remainder + data
        cut = len(data) - len(data) % width
        self.remainder = data[cut:]
        if not cut:
            return
        # The size that matters is what goes to Triton, after resampling: bounded by
        # duration, checked before resampling allocates it.
        rate = self.sample_rate
        assert rate is not None  # _open settled the format
        seconds = cut // width / rate
        if seconds > self.cfg.max_frame_seconds:
            raise ProtocolError(
                "frame_too_large",
                f"a frame of {cut} bytes holds {seconds:.1f} s of audio at "
                f"{self.sample_rate} Hz ({self.encoding}, {self.channels} channel(s)); "
                f"the limit is {self.cfg.max_frame_seconds:g} s of audio per frame",
            )
        audio = resample(
            decode_pcm(data[:cut], self.encoding, self.channels), rate, self.model_rate
        )
        self.audio_bytes += cut
        self.finalized = False
        self.buffered.append(audio)
        if sum(map(len, self.buffered)) < self.cfg.min_request_s * self.model_rate:
            return
        joined = self.take_buffered_audio()
        assert joined is not None
        # Pace a client that sends faster than real time to the server's max_lead_seconds
        # (not reading the socket meanwhile) instead of letting the server close it.
        await asyncio.sleep(s.send_delay(len(joined)))
        s.send(joined)
        self.last_request_at = time.monotonic()

    def take_buffered_audio(self) -> np.ndarray | None:
        """The audio received and not yet sent (None: none), for the next request."""
        if not self.buffered:
            return None
        joined = self.buffered[0] if len(self.buffered) == 1 else np.concatenate(self.buffered)
        self.buffered = []
        return joined

    async def _control(self, text: str) -> bool:
        """Handle a text frame; True when the client asked to close."""
        if self.draining:
            return False
        msg = self._parse_control(text)
        kind = msg["type"]
        if kind == "Configure":
            self._configure(msg)
        elif kind == "Finalize":
            s = await self._open()
            await self._accepted()
            if self.finalized:
                return False  # nothing came since the last one: its final stands
            await self._check_flood()
            s.send(self.take_buffered_audio(), finalize=True)
            self.finalized = True
            self.last_request_at = time.monotonic()
        elif kind == "KeepAlive":
            s = await self._open()
            await self._accepted()
            # Coalesced: a request in flight or a recent one keeps the stream alive
            # already, so thousands of KeepAlives cost Triton nothing.
            recent = time.monotonic() - self.last_request_at < self.cfg.keepalive_interval_s
            if s.started and (s.pending > 0 or recent):
                return False
            await self._check_flood()
            s.keepalive()
            self.last_request_at = time.monotonic()
        elif kind == "CloseStream":
            return True
        else:
            raise ProtocolError(
                "bad_request",
                f"unknown message type; types: {['Configure', *protocol.CONTROL_MESSAGES]}",
            )
        return False

    def _parse_control(self, text: str) -> dict:
        """A text frame as a control message: size, depth and shape checked."""
        if len(text) > self.cfg.max_text_frame_bytes:
            raise ProtocolError(
                "bad_request",
                f"text frame of {len(text)} characters; control messages are at most "
                f"{self.cfg.max_text_frame_bytes}",
            )
        try:
            msg = json.loads(text)
        except RecursionError:  # nesting deep enough to exhaust the parser
            msg = None
        except ValueError:
            raise ProtocolError("bad_request", "text frames must be JSON objects") from None
        if msg is None or json_depth(msg, self.cfg.max_json_depth) > self.cfg.max_json_depth:
            raise ProtocolError(
                "bad_request", f"JSON nested deeper than {self.cfg.max_json_depth} levels"
            )
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ProtocolError("bad_request", 'text frames must be JSON objects with a "type"')
        return msg

    async def _finish(self) -> None:
        """END the sequence and wait for its last responses."""
        s = self.session
        if s is None or s.closed:
            return
        last = self.take_buffered_audio()
        if not s.started and last is None:
            # Nothing was ever sent: there is no sequence to end.
            return
        await self._accepted()
        s.close(last)  # END, with the audio still buffered
        await self._accepted()  # a START sent with this END may be refused too
        await wait_session(s, self.cfg.close_timeout_s)

    async def _next_frame(self) -> Any:
        """The client's next frame; meanwhile a refused START ends the session at once
        (not at the client's next frame: a refused client may stay silent), and a client
        silent for idle_timeout_s is ended (its open utterance's final still goes out)."""
        receiving = asyncio.ensure_future(self.ws.receive())
        try:
            while True:
                waits: set[asyncio.Future] = {receiving}
                s = self.session
                if s is not None and s.started and not self.started.done():
                    waits.add(self.started)
                done, _ = await asyncio.wait(
                    waits, timeout=self.cfg.idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if receiving in done:
                    return receiving.result()
                if not done:
                    await self._finish()
                    raise ProtocolError(
                        "idle_timeout",
                        f"nothing received for {self.cfg.idle_timeout_s:g} s: send audio or "
                        '{"type": "KeepAlive"} at least that often',
                    )
                await self._accepted()  # the START's answer came first: raises if refused
        finally:
            if not receiving.done():
                receiving.cancel()

    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        close_code, reason = 1000, ""
        client_gone = False
        try:
            self._query()
            while True:
                msg = await self._next_frame()
                if msg.type == WSMsgType.BINARY:
                    await self._rate(control=False)
                    await self._audio(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await self._rate(control=True)
                    if await self._control(msg.data):
                        break
                elif msg.type == WSMsgType.ERROR:
                    log.warning("ws %s: transport error", self.id)
                    client_gone = True
                    break
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    client_gone = True  # the client closed the socket
                    break
            await self._finish()
        except ProtocolError as exc:
            log.warning("ws %s: closing, %s", self.id, exc.code)
            if not exc.notified:
                self._enqueue_error(exc.code, str(exc))
            close_code, reason = exc.close_code, exc.code
        except (AsrError, TimeoutError) as exc:
            # the message may quote client input: the log gets its kind only
            log.error("ws %s: backend failure (%s)", self.id, type(exc).__name__)
            self._enqueue_error("backend", str(exc))
            close_code, reason = 1011, "backend"
        except Exception as exc:  # noqa: BLE001 - a bug here still ends with an Error frame
            # frames only: the exception's message may quote client input
            log.error(
                "ws %s: internal error (%s)\n%s",
                self.id,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            self._enqueue_error("internal", "internal error in the gateway")
            close_code, reason = 1011, "internal"
        finally:
            s = self.session
            if (
                s is not None
                and not s.closed
                and s.started
                and s.failed is None
                and self.started.done()
                and self.started.result() is None
            ):
                try:
                    s.close()  # frees the Triton sequence slot
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
            log.info(
                "ws %s: closed %d (%d audio bytes, %d responses)",
                self.id,
                close_code,
                self.audio_bytes,
                len(s.messages) if s else 0,
            )

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
        self.out.put_nowait(self._error_message(code, self._redacted(message)))

    @staticmethod
    def _error_message(code: str, message: str) -> dict:
        return {"type": "Error", "code": code, "message": message}
