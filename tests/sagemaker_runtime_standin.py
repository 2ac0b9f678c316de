"""A local stand-in for SageMaker's runtime endpoint for ``InvokeEndpointWithBidirectionalStream``,
in front of a container's WebSocket route, so that AWS's own SDK client can stream through the
real gateway into Triton on a machine without AWS.

What it speaks, on the client side, is what the SDK sends (``aws-sdk-sagemaker-runtime-http2``
0.12 over its CRT transport), checked by that client talking to it:

* HTTP/2 over TLS (ALPN ``h2``; the CRT transport negotiates it from ``https`` URLs only),
  ``POST /endpoints/<name>/invocations-bidirectional-stream``, SigV4 (service ``sagemaker``):
  the request signature is recomputed from the canonical request, and every event's
  ``:chunk-signature`` is checked along the chain seeded by it (AWS's "signing event
  streams" rules), with the secret key of the test's credentials.
* The request body is an AWS event stream (binary framing with two CRC32s; decoded by
  botocore's own parser, not by code of this module): each message is a signed envelope
  (``:date``, ``:chunk-signature``) whose payload is the inner ``PayloadPart`` event
  (headers ``:message-type`` ``event``, ``:event-type`` ``PayloadPart``, ``DataType``,
  ``CompletionState``; the payload is the part's bytes); a final empty signed envelope ends it.
* The response: status 200 as soon as the container accepted the WebSocket, then an event
  stream of ``PayloadPart`` events, one per WebSocket frame from the container
  (``DataType`` ``UTF8`` for text frames, ``BINARY`` for binary ones), encoded here.

On the container side it does what AWS documents SageMaker does (notes/sagemaker.md):
opens ``ws://<container>/invocations-bidirectional-stream`` (or the
``X-Amzn-SageMaker-Model-Invocation-Path``) with ``X-Amzn-SageMaker-Model-Query-String`` as the
query, BINARY parts as binary frames, UTF8 parts as text frames.  When the container closes
the socket, the close code reaches the client as a ``ModelStreamError`` event (``ErrorCode``
the code's digits), 1000 included, and the response stream ends: AWS's bidirectional-stream
guide says every close frame from the container is passed on that way.  The ``ErrorCode``
format and how SageMaker reacts to the client ending its input first (here: the socket is
closed) are assumptions: AWS does not document them.
"""

from __future__ import annotations

import asyncio
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import ssl
import struct
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from botocore.eventstream import EventStreamBuffer

log = logging.getLogger("tests.sagemaker_standin")

PATH_RE = re.compile(r"^/endpoints/(?P<name>[^/]+)/invocations-bidirectional-stream$")
CONTAINER_PATH = "/invocations-bidirectional-stream"
EVENTSTREAM_TYPE = "application/vnd.amazon.eventstream"
# x-amz-content-sha256 of a SigV4-signed event-stream request body.
STREAMING_PAYLOAD = "STREAMING-AWS4-HMAC-SHA256-EVENTS"
SIGNING_SERVICE = "sagemaker"
VARIANT = "AllTraffic"

# Event-stream header value types (AWS event stream encoding).
_STRING, _BYTES, _TIMESTAMP = 7, 6, 8


class StandInError(Exception):
    """A request the real service would refuse; answered with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def error_type(self) -> str:
        """``x-amzn-errortype`` (restJson1 errors are told apart by it)."""
        return {403: "AccessDeniedException", 404: "ValidationError", 405: "ValidationError"}.get(
            self.status, "InputValidationError"
        )


# -- event stream encoding (the response side) ----------------------------------------------


def _encode_header(name: str, value: str | bytes) -> bytes:
    n = name.encode()
    if isinstance(value, str):
        v = value.encode()
        return struct.pack("!B", len(n)) + n + struct.pack("!BH", _STRING, len(v)) + v
    return struct.pack("!B", len(n)) + n + struct.pack("!BH", _BYTES, len(value)) + value


def encode_message(headers: dict[str, str | bytes], payload: bytes) -> bytes:
    """One event-stream message: prelude (total length, headers length, CRC32 of those 8
    bytes), headers, payload, CRC32 of everything before it."""
    hdrs = b"".join(_encode_header(k, v) for k, v in headers.items())
    total = 12 + len(hdrs) + len(payload) + 4
    prelude = struct.pack("!II", total, len(hdrs))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    body = prelude + hdrs + payload
    return body + struct.pack("!I", binascii.crc32(body))


def payload_part_event(data: bytes, data_type: str) -> bytes:
    return encode_message(
        {
            ":message-type": "event",
            ":event-type": "PayloadPart",
            ":content-type": "application/octet-stream",
            "DataType": data_type,
            "CompletionState": "COMPLETE",
        },
        data,
    )


def model_stream_error_event(message: str, code: str) -> bytes:
    return encode_message(
        {
            ":message-type": "exception",
            ":exception-type": "ModelStreamError",
            ":content-type": "application/json",
        },
        json.dumps({"Message": message, "ErrorCode": code}).encode(),
    )


# -- SigV4 ----------------------------------------------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    k = _hmac(("AWS4" + secret).encode(), day)
    return _hmac(_hmac(_hmac(k, region), service), "aws4_request")


@dataclass
class Authorization:
    access_key: str
    day: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str

    @classmethod
    def parse(cls, value: str) -> "Authorization":
        m = re.fullmatch(
            r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/"
            r"aws4_request, ?SignedHeaders=([^,]+), ?Signature=([0-9a-f]{64})",
            value.strip(),
        )
        if not m:
            raise StandInError(403, f"not a SigV4 Authorization header: {value[:80]!r}")
        return cls(m[1], m[2], m[3], m[4], m[5].split(";"), m[6])


def request_signature(
    key: bytes, auth: Authorization, method: str, path: str, query: str, headers: dict[str, str]
) -> str:
    """SigV4 of the request as the service recomputes it."""
    pairs = sorted(tuple(p.split("=", 1)) if "=" in p else (p, "") for p in query.split("&") if p)
    canonical_headers = "".join(
        f"{h}:{' '.join(headers[h].split())}\n" for h in auth.signed_headers
    )
    canonical = "\n".join(
        [
            method,
            quote(path, safe="/-_.~"),
            "&".join(f"{k}={v}" for k, v in pairs),
            canonical_headers,
            ";".join(auth.signed_headers),
            headers["x-amz-content-sha256"],
        ]
    )
    amz_date = headers["x-amz-date"]
    scope = f"{auth.day}/{auth.region}/{auth.service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class EventSignatureChain:
    """Checks each envelope's ``:chunk-signature``: HMAC of (timestamp, scope, previous
    signature, SHA-256 of the encoded ``:date`` header, SHA-256 of the payload)."""

    def __init__(self, key: bytes, auth: Authorization):
        self.key, self.auth = key, auth
        self.prior = auth.signature
        self.checked = 0

    def check(self, date_ms: int, signature: bytes, payload: bytes) -> None:
        date = dt.datetime.fromtimestamp(date_ms / 1000, dt.timezone.utc)
        timestamp = date.strftime("%Y%m%dT%H%M%SZ")
        encoded_date = struct.pack("!B", 5) + b":date" + struct.pack("!Bq", _TIMESTAMP, date_ms)
        scope = f"{timestamp[:8]}/{self.auth.region}/{self.auth.service}/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256-PAYLOAD",
                timestamp,
                scope,
                self.prior,
                hashlib.sha256(encoded_date).hexdigest(),
                hashlib.sha256(payload).hexdigest(),
            ]
        )
        want = hmac.new(self.key, to_sign.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(want, signature):
            raise StandInError(403, f"event {self.checked}: bad :chunk-signature")
        self.prior = want.hex()
        self.checked += 1


# -- one bidirectional stream ---------------------------------------------------------------


@dataclass
class StreamRecord:
    """What one call looked like, for the tests."""

    endpoint: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    container_url: str = ""
    parts_in: list[tuple[str, int]] = field(default_factory=list)  # (DataType, bytes)
    events_out: int = 0
    signed_events: int = 0
    input_ended: bool = False
    ws_close_code: int | None = None
    error: str | None = None


class _Stream:
    def __init__(self, conn: "_Connection", stream_id: int, headers: dict[str, str]):
        self.conn, self.id, self.headers = conn, stream_id, headers
        self.record = StreamRecord(headers=dict(headers))
        self.buffer = EventStreamBuffer()
        self.inbox: asyncio.Queue = asyncio.Queue()  # (DataType, bytes) or None at the end
        self.chain: EventSignatureChain | None = None
        self.early: list[bytes | None] = []  # body bytes (None: end) before the check

    def check_request(self) -> None:
        h, sd = self.headers, self.conn.standin
        if h.get(":method") != "POST":
            raise StandInError(405, "POST only")
        path, _, query = h.get(":path", "").partition("?")
        m = PATH_RE.match(path)
        if not m:
            raise StandInError(404, f"unknown path {h.get(':path')!r}")
        self.record.endpoint = m["name"]
        if h.get("content-type") != EVENTSTREAM_TYPE:
            raise StandInError(400, f"content-type must be {EVENTSTREAM_TYPE}")
        if h.get("x-amz-content-sha256") != STREAMING_PAYLOAD:
            raise StandInError(400, f"x-amz-content-sha256 must be {STREAMING_PAYLOAD}")
        auth = Authorization.parse(h.get("authorization", ""))
        if auth.service != SIGNING_SERVICE or auth.region != sd.region:
            raise StandInError(
                403,
                f"signed for {auth.service} in {auth.region}, not {SIGNING_SERVICE} in {sd.region}",
            )
        secret = sd.credentials.get(auth.access_key)
        if secret is None:
            raise StandInError(403, f"unknown access key {auth.access_key}")
        key = signing_key(secret, auth.day, auth.region, auth.service)
        signed = {k: v for k, v in h.items() if not k.startswith(":")}
        signed.setdefault("host", h.get(":authority", ""))  # HTTP/2 carries Host as :authority
        missing = [x for x in auth.signed_headers if x not in signed]
        if missing:
            raise StandInError(403, f"signed headers missing from the request: {missing}")
        if not hmac.compare_digest(
            request_signature(key, auth, "POST", path, query, signed), auth.signature
        ):
            raise StandInError(403, "request signature does not match")
        self.chain = EventSignatureChain(key, auth)

    def on_data(self, data: bytes) -> None:
        """Request body bytes; kept until the request itself has been checked."""
        if self.chain is None:
            self.early.append(data)
            return
        try:
            self.feed(data)
        except StandInError as exc:
            self.record.error = str(exc)
            log.warning("stand-in: %s", exc)
            self.conn.h2.reset_stream(self.id)
            self.conn._write()
            self.inbox.put_nowait(None)

    def on_end(self) -> None:
        if self.chain is None:
            self.early.append(None)
        else:
            self.end_input()

    def feed(self, data: bytes) -> None:
        self.buffer.add_data(data)
        for envelope in self.buffer:
            eh = envelope.headers
            if ":chunk-signature" not in eh or ":date" not in eh:
                raise StandInError(403, "event without :date/:chunk-signature")
            self.chain.check(eh[":date"], eh[":chunk-signature"], envelope.payload)
            self.record.signed_events = self.chain.checked
            if not envelope.payload:  # the final empty signed envelope
                self.inbox.put_nowait(None)
                continue
            inner = EventStreamBuffer()
            inner.add_data(envelope.payload)
            events = list(inner)
            if len(events) != 1:
                raise StandInError(400, f"envelope holds {len(events)} events, not 1")
            ev = events[0]
            kind = (ev.headers.get(":message-type"), ev.headers.get(":event-type"))
            if kind != ("event", "PayloadPart"):
                raise StandInError(400, f"unexpected event {kind}")
            data_type = ev.headers.get("DataType", "BINARY")
            if data_type not in ("BINARY", "UTF8"):
                raise StandInError(400, f"DataType {data_type!r}")
            self.record.parts_in.append((data_type, len(ev.payload)))
            self.inbox.put_nowait((data_type, ev.payload))

    def end_input(self) -> None:
        self.record.input_ended = True
        self.inbox.put_nowait(None)

    async def run(self) -> None:
        sd = self.conn.standin
        try:
            self.check_request()
            for data in self.early:
                self.end_input() if data is None else self.feed(data)
            self.early.clear()
            path = self.headers.get("x-amzn-sagemaker-model-invocation-path")
            path = "/" + path.lstrip("/") if path else CONTAINER_PATH
            query = self.headers.get("x-amzn-sagemaker-model-query-string")
            url = sd.container_url.rstrip("/") + path + (f"?{query}" if query else "")
            self.record.container_url = url
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url, autoping=True) as ws:
                    self.conn.respond(
                        self.id,
                        200,
                        {
                            "content-type": EVENTSTREAM_TYPE,
                            "x-amzn-invoked-production-variant": VARIANT,
                        },
                    )
                    up = asyncio.create_task(self._upstream(ws))
                    try:
                        await self._downstream(ws)
                    finally:
                        up.cancel()
            self.conn.end(self.id)
        except StandInError as exc:
            self.record.error = str(exc)
            log.warning("stand-in: %s", exc)
            self.conn.respond(
                self.id,
                exc.status,
                {"content-type": "application/json", "x-amzn-errortype": exc.error_type},
                json.dumps({"message": str(exc)}).encode(),
                end=True,
            )
        except (aiohttp.ClientError, ConnectionError) as exc:
            self.record.error = f"container: {exc}"
            self.conn.respond(
                self.id,
                424,
                {"content-type": "application/json", "x-amzn-errortype": "ModelError"},
                json.dumps({"message": str(exc)}).encode(),
                end=True,
            )
        finally:
            sd.records.append(self.record)

    async def _upstream(self, ws) -> None:
        """Client parts -> WebSocket frames; the client ending its input closes the socket."""
        while True:
            item = await self.inbox.get()
            if item is None:
                if not ws.closed:
                    await ws.close()
                return
            data_type, payload = item
            if data_type == "UTF8":
                await ws.send_str(payload.decode("utf-8"))
            else:
                await ws.send_bytes(payload)

    async def _downstream(self, ws) -> None:
        """WebSocket frames -> response events, until the container closes the socket."""
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.conn.send(self.id, payload_part_event(msg.data.encode(), "UTF8"))
            elif msg.type == aiohttp.WSMsgType.BINARY:
                self.conn.send(self.id, payload_part_event(msg.data, "BINARY"))
            else:
                break
            self.record.events_out += 1
        self.record.ws_close_code = ws.close_code
        # every close frame, the normal 1000 included, as SageMaker documents it
        self.conn.send(
            self.id,
            model_stream_error_event(
                f"the model closed the stream with code {ws.close_code}", str(ws.close_code)
            ),
        )


# -- HTTP/2 connection ----------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self, standin: "RuntimeStandIn"):
        self.standin = standin
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.streams: dict[int, _Stream] = {}
        self.pending: dict[int, bytearray] = {}  # response bytes waiting for window
        self.ending: set[int] = set()
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self._write()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("stand-in: HTTP/2 protocol error %s", exc)
            self._write()
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                s = _Stream(self, ev.stream_id, dict(ev.headers))
                self.streams[ev.stream_id] = s
                asyncio.get_running_loop().create_task(s.run())
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_data(ev.data)
            elif isinstance(ev, h2.events.StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.on_end()
            elif isinstance(ev, h2.events.StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.inbox.put_nowait(None)
            elif isinstance(ev, h2.events.WindowUpdated):
                self._flush()
        self._write()

    def connection_lost(self, exc) -> None:
        for s in self.streams.values():
            s.inbox.put_nowait(None)

    def respond(
        self, sid: int, status: int, headers: dict[str, str], body: bytes = b"", end: bool = False
    ) -> None:
        self.h2.send_headers(
            sid, [(":status", str(status)), *headers.items()], end_stream=end and not body
        )
        self._write()
        if body:
            self.send(sid, body)
        if end and body:
            self.end(sid)

    def send(self, sid: int, data: bytes) -> None:
        self.pending.setdefault(sid, bytearray()).extend(data)
        self._flush()

    def end(self, sid: int) -> None:
        self.ending.add(sid)
        self._flush()

    def _flush(self) -> None:
        for sid in list(self.pending.keys() | self.ending):
            buf = self.pending.get(sid, bytearray())
            try:
                while buf:
                    n = min(
                        len(buf),
                        self.h2.local_flow_control_window(sid),
                        self.h2.max_outbound_frame_size,
                    )
                    if n <= 0:
                        break
                    self.h2.send_data(sid, bytes(buf[:n]))
                    del buf[:n]
                if not buf and sid in self.ending:
                    self.h2.end_stream(sid)
                    self.ending.discard(sid)
                    self.pending.pop(sid, None)
            except h2.exceptions.StreamClosedError:
                self.pending.pop(sid, None)
                self.ending.discard(sid)
        self._write()

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


# -- the server -----------------------------------------------------------------------------


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost signed by it:
    (ca.pem, server.pem, server.key).  Needs the openssl CLI."""
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=streamasr test CA",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        str(ext),
        "-out",
        str(cert),
    )
    return ca, cert, key


class RuntimeStandIn:
    """``with RuntimeStandIn(container_url, credentials, region, cert, key) as s:`` serves on
    ``s.url`` (https://localhost:<port>) from a thread of its own; ``s.records`` says what
    each call looked like."""

    def __init__(
        self, container_url: str, credentials: dict[str, str], region: str, cert: Path, key: Path
    ):
        self.container_url, self.credentials, self.region = container_url, credentials, region
        self.ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl.load_cert_chain(str(cert), str(key))
        self.ssl.set_alpn_protocols(["h2"])
        self.records: list[StreamRecord] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sagemaker-standin", daemon=True
        )
        self._server = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def __enter__(self) -> "RuntimeStandIn":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _Connection(self), "127.0.0.1", 0, ssl=self.ssl),
            self._loop,
        )
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        async def stop():
            self._server.close()
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        except TimeoutError:
            log.warning("stand-in: server did not stop in 10 s")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
