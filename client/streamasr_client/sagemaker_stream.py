"""Stream a recording to the streamasr SageMaker endpoint.

Three ways, one framing (the gateway's, streamasr/sagemaker/):

* ``bidi`` — ``InvokeEndpointWithBidirectionalStream`` (HTTP/2) through AWS's Python SDK
  ``aws-sdk-sagemaker-runtime-http2`` 0.12 with its ``[awscrt]`` HTTP/2 transport
  (``make venv-http2`` builds ``.venv-http2`` from client/requirements-http2.txt).
  That package needs Python >= 3.12, so it is imported only when this mode runs.
  Credentials come from the SDK's default chain (environment, ``--profile``/``AWS_PROFILE``
  in the shared files, container and instance roles).
  SageMaker turns each BINARY PayloadPart into a binary WebSocket frame to the
  container and each UTF8 part into a text frame; the query string (sample rate,
  options) travels in ``ModelQueryString``.
* ``ws`` — the same frames straight to a container's WebSocket route (a local
  ``docker run -p 8080:8080`` or ``docker/serve``): no AWS involved.
* ``invocations`` — request-response fallback for clients without HTTP/2: one
  ``InvokeEndpoint`` per chunk in a SageMaker stateful session
  (``SessionId=NEW_SESSION`` first, then the id the container returned; ``close=true``
  in ``CustomAttributes`` ends it).  Needs boto3 only.

    python -m streamasr_client.sagemaker_stream recording.wav --endpoint streamasr
    python -m streamasr_client.sagemaker_stream recording.wav --url http://127.0.0.1:8080
    python -m streamasr_client.sagemaker_stream recording.wav --endpoint streamasr --mode invocations

Audio goes out as 16-bit little-endian PCM at the file's own rate (resampling, if any,
happens in the gateway), ``chunk_ms`` per frame; ``--realtime`` paces it like a
microphone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import quote

import numpy as np

from streamasr.protocol import (
    CLOSED_SESSION_HEADER,
    CONTROL_MESSAGES,
    CUSTOM_ATTRIBUTES_HEADER,
    INVOCATIONS_PATH,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    WS_PATH,
    final_text,
)

log = logging.getLogger("streamasr_client.sagemaker")

# ModelQueryString (X-Amzn-SageMaker-Model-Query-String): at most 2048 characters, keys and
# values of unreserved characters or %XX escapes, no empty values (API reference,
# InvokeEndpointWithBidirectionalStream).  Option sets that do not fit go in a Configure
# message, the stream's first text part.
MAX_QUERY_STRING = 2048
# A normal WebSocket close (RFC 6455).  SageMaker hands ANY close frame from the container
# to the client as a ModelStreamError carrying the close code, this one included.
CLOSE_NORMAL = 1000


# -- framing (shared by every transport) --------------------------------------------------


@dataclass
class Framing:
    """What goes over the wire for one recording."""

    sample_rate: int
    chunk_ms: int = 100
    options: dict[str, Any] = field(default_factory=dict)

    def _wire_options(self) -> dict[str, str]:
        out = {}
        for k, v in self.options.items():
            text = str(v).lower() if isinstance(v, bool) else str(v)
            if not text:
                raise ValueError(
                    f"option {k!r} has an empty value (ModelQueryString allows none): "
                    "leave the option out instead"
                )
            out[str(k)] = text
        return out

    def _format(self) -> dict[str, str]:
        return {"encoding": "linear16", "sample_rate": str(self.sample_rate)}

    @staticmethod
    def _encode(q: dict[str, str]) -> str:
        # quote(safe=""): only unreserved characters stay as they are; a space is %20
        # (urlencode's '+' is not allowed in ModelQueryString)
        return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in q.items())

    def wire(self) -> tuple[str, str | None]:
        """(query string, Configure message or None): the options travel in the query
        when it fits MAX_QUERY_STRING, else in a Configure text message sent before any
        audio (the query then holds only the audio format)."""
        options = self._wire_options()
        q = self._encode({**self._format(), **options})
        if len(q) <= MAX_QUERY_STRING:
            return q, None
        msg: dict[str, Any] = {"type": "Configure"}
        rest = dict(self.options)
        if "two_pass" in rest:
            msg["two_pass"] = rest.pop("two_pass")
        msg["options"] = rest
        return self._encode(self._format()), json.dumps(msg)

    def query_string(self) -> str:
        """The whole framing as one query string; ValueError if it does not fit
        MAX_QUERY_STRING (:meth:`wire` then moves the options to a Configure message)."""
        q, configure = self.wire()
        if configure is not None:
            raise ValueError(
                f"the options make a query string longer than {MAX_QUERY_STRING} "
                "characters: send them in a Configure message (Framing.wire)"
            )
        return q

    def chunk_bytes(self) -> int:
        return max(1, self.sample_rate * self.chunk_ms // 1000) * 2

    def audio_frames(self, pcm: bytes) -> Iterator[bytes]:
        step = self.chunk_bytes()
        for i in range(0, len(pcm), step):
            yield pcm[i : i + step]

    @staticmethod
    def control(kind: str) -> str:
        if kind not in CONTROL_MESSAGES:
            raise ValueError(f"unknown control message {kind!r}")
        return json.dumps({"type": kind})

    @staticmethod
    def parse(text: str | bytes) -> dict:
        return json.loads(text)


def read_pcm16(path: str | Path) -> tuple[bytes, int]:
    """A file (anything libsndfile reads) as mono int16 little-endian bytes + its rate."""
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="int16", always_2d=True)
    mono = (
        audio[:, 0] if audio.shape[1] == 1 else audio.astype(np.int32).mean(axis=1).astype(np.int16)
    )
    return mono.astype("<i2").tobytes(), int(rate)


class StreamFailed(RuntimeError):
    pass


async def _paced(frames: Iterator[bytes], framing: Framing, realtime: bool) -> AsyncIterator[bytes]:
    t0 = time.monotonic()
    sent_s = 0.0
    for f in frames:
        if realtime:
            delay = t0 + sent_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        sent_s += len(f) / 2 / framing.sample_rate
        yield f


# -- ws: straight to a container ------------------------------------------------------------


async def stream_websocket(
    base_url: str,
    pcm: bytes,
    framing: Framing,
    *,
    realtime: bool = False,
    on_message: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The container's own route, as SageMaker's platform drives it."""
    import aiohttp

    messages: list[dict] = []
    query, configure = framing.wire()
    url = base_url.rstrip("/") + WS_PATH + "?" + query
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url) as ws:
            if configure:
                await ws.send_str(configure)

            async def reader():
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.TEXT:
                        msg = framing.parse(m.data)
                        messages.append(msg)
                        if on_message:
                            on_message(msg)

            r = asyncio.create_task(reader())
            async for frame in _paced(framing.audio_frames(pcm), framing, realtime):
                await ws.send_bytes(frame)
            await ws.send_str(framing.control("CloseStream"))
            await r
            if ws.close_code != 1000:
                raise StreamFailed(
                    f"closed with {ws.close_code}: "
                    f"{[m for m in messages if m.get('type') == 'Error']}"
                )
    return messages


# -- bidi: InvokeEndpointWithBidirectionalStream ---------------------------------------------


def close_code_of(error_code: str | None, message: str | None) -> int | None:
    """The WebSocket close code a ModelStreamError carries: its ErrorCode when that is a
    number, else a close code (1000-4999) named in its message.  AWS documents that the
    code is passed on, not the exact format; None when neither holds one."""
    if error_code and error_code.strip().isdigit():
        return int(error_code.strip())
    found = re.search(r"\b([1-4]\d{3})\b", message or "")
    return int(found.group(1)) if found else None


def ended_cleanly(error_code: str | None, message: str | None, input_closed: bool) -> bool:
    """A ModelStreamError that is the container's normal close (1000) after the client
    sent CloseStream: the end of a good session, not a failure."""
    return input_closed and close_code_of(error_code, message) == CLOSE_NORMAL


# The release this client is written and tested against (client/requirements-http2.txt pins
# it with its dependencies).  The SDK is pre-1.0 and breaks its API between minor releases
# (0.10 dropped ``config.Config``); an untested release is refused rather than half-working.
SDK_PACKAGE = "aws-sdk-sagemaker-runtime-http2"
SDK_VERSION = "0.12"
SDK_REQUIREMENT = f"{SDK_PACKAGE}[awscrt]=={SDK_VERSION}.0"
# The bidirectional-stream API listens on 8443, not 443 (AWS API reference,
# InvokeEndpointWithBidirectionalStream: runtime.sagemaker.<region>.amazonaws.com:8443).
HTTP2_PORT = 8443


def default_endpoint_url(region: str) -> str:
    return f"https://runtime.sagemaker.{region}.amazonaws.com:{HTTP2_PORT}"


def _http2_sdk():
    """Import AWS's HTTP/2 SageMaker runtime SDK (Python >= 3.12) or say why not."""
    if sys.version_info < (3, 12):
        raise StreamFailed(
            f"InvokeEndpointWithBidirectionalStream needs {SDK_PACKAGE}, which "
            f"requires Python >= 3.12 (this is {sys.version.split()[0]}); use "
            "`make venv-http2` (.venv-http2), --mode invocations, or --url "
            "against a container"
        )
    from importlib import metadata

    try:
        version = metadata.version(SDK_PACKAGE)
    except metadata.PackageNotFoundError:
        raise StreamFailed(f"pip install '{SDK_REQUIREMENT}'") from None
    if not (version == SDK_VERSION or version.startswith(SDK_VERSION + ".")):
        raise StreamFailed(
            f"{SDK_PACKAGE} {version} is installed; this client is written for "
            f"{SDK_VERSION}.x (its API changes between minor releases): "
            f"pip install '{SDK_REQUIREMENT}'"
        )
    try:
        from aws_sdk_sagemaker_runtime_http2 import client as sm_client
        from aws_sdk_sagemaker_runtime_http2 import config as sm_config
        from aws_sdk_sagemaker_runtime_http2 import models as sm_models
        from smithy_http.aio.crt import AWSCRTHTTPClient
    except ImportError as exc:
        # AWSCRTHTTPClient is the only transport that can stream both ways at once; the
        # default aiohttp one raises UnsupportedTransportError on a duplex stream.
        raise StreamFailed(
            f"{exc}: pip install '{SDK_REQUIREMENT}' (the [awscrt] extra "
            "provides the HTTP/2 transport duplex streams need)"
        ) from None
    return sm_client, sm_config, sm_models, AWSCRTHTTPClient


def crt_transport(crt_client_cls, ca_bundle: str | None = None):
    """The CRT HTTP/2 transport, trusting ``ca_bundle`` (a PEM file) instead of the system
    store when given (``--ca-bundle`` / ``AWS_CA_BUNDLE``, as the AWS CLI names it: a TLS
    inspecting proxy, or a local stand-in endpoint)."""
    if not ca_bundle:
        return crt_client_cls()
    if not Path(ca_bundle).is_file():
        raise StreamFailed(f"CA bundle {ca_bundle} does not exist")
    from awscrt import io as crt_io

    class CABundleCRTClient(crt_client_cls):
        def __init__(self, **kw):
            super().__init__(**kw)
            opts = crt_io.TlsContextOptions()
            opts.override_default_trust_store_from_path(ca_filepath=ca_bundle)
            self._tls_ctx = crt_io.ClientTlsContext(opts)

        def __deepcopy__(self, memo):
            # The SDK deep-copies its config (transport included) per client; keep the CA.
            return CABundleCRTClient(eventloop=self._eventloop, client_config=self._config)

    return CABundleCRTClient()


async def sagemaker_http2_client(
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    ca_bundle: str | None = None,
):
    """An ``AsyncSageMakerRuntimeHTTP2Client`` for SDK 0.12: config resolved from the
    environment and the shared config files like any AWS SDK (region: argument,
    ``AWS_REGION``, the profile's ``region``), credentials from the SDK's default chain
    (environment, shared credentials/config files and ``AWS_PROFILE``, SSO/process,
    container and instance roles), and the CRT transport (HTTP/2 duplex)."""
    sm_client, sm_config, _, crt_client = _http2_sdk()
    overrides: dict[str, Any] = {
        "transport": crt_transport(crt_client, ca_bundle or os.environ.get("AWS_CA_BUNDLE"))
    }
    if region:
        overrides["region"] = region
    cfg = await sm_config.AsyncSageMakerRuntimeHTTP2Config.resolve(profile=profile, **overrides)
    if not cfg.region:
        raise StreamFailed(
            "no AWS region: pass --region, set AWS_REGION, or give the profile a region"
        )
    if endpoint_url:
        cfg.endpoint_uri = endpoint_url
    elif cfg.endpoint_uri is None:  # AWS_ENDPOINT_URL[_SAGEMAKER_RUNTIME_HTTP2] wins
        cfg.endpoint_uri = default_endpoint_url(cfg.region)
    # aws_credentials_identity_resolver stays None: the client builds the default chain.
    return sm_client.AsyncSageMakerRuntimeHTTP2Client(config=cfg)


def _quiet_completed_stream_writes(loop: asyncio.AbstractEventLoop) -> None:
    """awscrt 0.32 writes the request's END_STREAM from a background task; when the
    endpoint has already ended the stream (normal at the end of a session, and on any
    refusal) that write fails with AWS_ERROR_HTTP_STREAM_HAS_COMPLETED and asyncio prints
    the unretrieved exception as a traceback.  Log that one case at debug level."""
    previous = loop.get_exception_handler()

    def handler(lp, context):
        exc = context.get("exception")
        if isinstance(exc, RuntimeError) and "AWS_ERROR_HTTP_STREAM_HAS_COMPLETED" in str(exc):
            log.debug("request stream already completed by the endpoint: %s", exc)
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


async def stream_sagemaker(
    endpoint: str,
    pcm: bytes,
    framing: Framing,
    *,
    region: str | None = None,
    realtime: bool = False,
    target_variant: str | None = None,
    endpoint_url: str | None = None,
    profile: str | None = None,
    ca_bundle: str | None = None,
    on_message: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One bidirectional stream to a SageMaker endpoint: audio as BINARY payload parts,
    CloseStream as a UTF8 part, results from the response stream until SageMaker ends
    it (the container closed its WebSocket), then the input side is closed."""
    _, _, m, _ = _http2_sdk()
    from awscrt.exceptions import AwsCrtError
    from smithy_core.exceptions import SmithyError

    query, configure = framing.wire()
    kw = {"endpoint_name": endpoint, "model_query_string": query}
    if target_variant:
        kw["target_variant"] = target_variant

    def part(data: bytes, kind: str):
        return m.RequestStreamEventPayloadPart(
            value=m.RequestPayloadPart(bytes_=data, data_type=kind)
        )

    messages: list[dict] = []
    input_closed = False  # CloseStream sent

    def model_stream_error(err) -> None:
        """The container closed its WebSocket: SageMaker says so with a ModelStreamError
        for every close code; 1000 after CloseStream is the session's normal end."""
        code, text = getattr(err, "error_code", None), getattr(err, "message", None)
        if ended_cleanly(code, text, input_closed):
            log.debug("stream ended: ModelStreamError %s (normal close)", code)
            return
        raise StreamFailed(f"ModelStreamError {code}: {text}")

    async def reader(stream) -> None:
        _, output = await stream.await_output()
        try:
            async for event in output:
                if isinstance(event, m.ResponseStreamEventPayloadPart):
                    msg = framing.parse(event.value.bytes_)
                    messages.append(msg)
                    if on_message:
                        on_message(msg)
                elif isinstance(event, m.ResponseStreamEventModelStreamError):
                    return model_stream_error(event.value)
                else:  # InternalStreamFailure / unknown
                    raise StreamFailed(f"{type(event).__name__}: {getattr(event, 'value', event)}")
        except m.ModelStreamError as err:  # the SDK may raise the event instead
            model_stream_error(err)

    _quiet_completed_stream_writes(asyncio.get_running_loop())
    client = None
    try:
        client = await sagemaker_http2_client(
            region=region, endpoint_url=endpoint_url, profile=profile, ca_bundle=ca_bundle
        )
        stream = await client.invoke_endpoint_with_bidirectional_stream(
            m.InvokeEndpointWithBidirectionalStreamInput(**kw)
        )
        async with stream:  # closes both directions, also on errors
            r = asyncio.create_task(reader(stream))
            try:
                if configure:  # options too long for the query: before any audio
                    await stream.input_stream.send(part(configure.encode(), "UTF8"))
                async for frame in _paced(framing.audio_frames(pcm), framing, realtime):
                    if r.done():  # the endpoint ended the stream early: say why
                        break
                    await stream.input_stream.send(part(frame, "BINARY"))
                if not r.done():
                    # set first: the container's close may be read before send() returns
                    input_closed = True
                    await stream.input_stream.send(
                        part(framing.control("CloseStream").encode(), "UTF8")
                    )
                await r
            finally:
                if not r.done():
                    r.cancel()
    except (SmithyError, AwsCrtError) as exc:
        # refusals (AccessDenied, validation, model errors), missing credentials, TLS and
        # connection failures: one line, not a traceback
        raise StreamFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        if client is not None:
            await client.close()
    return messages


# -- invocations: request-response fallback with a stateful session --------------------------


@dataclass
class Reply:
    messages: list[dict]
    new_session_id: str | None = None
    closed_session_id: str | None = None


class InvocationsSession:
    """Chunks of one recording as InvokeEndpoint calls in one SageMaker stateful session.
    ``invoke(body, content_type, session_id, custom_attributes) -> Reply`` is the
    transport: ``boto3_invoker`` for an endpoint, ``http_invoker`` for a container."""

    def __init__(self, invoke: Callable[[bytes, str, str, str | None], Reply], framing: Framing):
        self.invoke, self.framing = invoke, framing
        self.session_id: str | None = None
        self.messages: list[dict] = []

    @property
    def content_type(self) -> str:
        return f"audio/l16;rate={self.framing.sample_rate}"

    def send(self, pcm: bytes, *, finalize: bool = False, close: bool = False) -> list[dict]:
        attrs = ";".join(k + "=true" for k, on in (("finalize", finalize), ("close", close)) if on)
        if self.session_id is None:
            opts = ";".join(f"{k}={v}" for k, v in self.framing.options.items())
            attrs = ";".join(a for a in (attrs, opts) if a)
            reply = self.invoke(pcm, self.content_type, NEW_SESSION, attrs or None)
            if not reply.new_session_id:
                raise StreamFailed("the endpoint did not open a session (no NewSessionId)")
            self.session_id = reply.new_session_id.split(";")[0].strip()
        else:
            reply = self.invoke(pcm, self.content_type, self.session_id, attrs or None)
        if close:
            if (reply.closed_session_id or "").strip() != self.session_id:
                raise StreamFailed(f"session {self.session_id} was not closed")
            self.session_id = None
        self.messages.extend(reply.messages)
        return reply.messages

    def stream(self, pcm: bytes, chunk_ms: int = 1000) -> list[dict]:
        step = max(1, self.framing.sample_rate * chunk_ms // 1000) * 2
        chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)] or [b""]
        for c in chunks[:-1]:
            self.send(c)
        self.send(chunks[-1], close=True)
        return self.messages


def boto3_invoker(endpoint: str, region: str | None = None, client=None):
    if client is None:
        import boto3

        client = boto3.client("sagemaker-runtime", region_name=region)

    def invoke(
        body: bytes, content_type: str, session_id: str, custom_attributes: str | None
    ) -> Reply:
        kw = {
            "EndpointName": endpoint,
            "Body": body,
            "ContentType": content_type,
            "Accept": "application/json",
            "SessionId": session_id,
        }
        if custom_attributes:
            kw["CustomAttributes"] = custom_attributes
        r = client.invoke_endpoint(**kw)
        payload = json.loads(r["Body"].read())
        return Reply(payload.get("messages", []), r.get("NewSessionId"), r.get("ClosedSessionId"))

    return invoke


def http_invoker(base_url: str):
    """InvokeEndpoint as SageMaker forwards it to the container (same headers)."""
    import urllib.error
    import urllib.request

    def invoke(
        body: bytes, content_type: str, session_id: str, custom_attributes: str | None
    ) -> Reply:
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            SESSION_HEADER: session_id,
        }
        if custom_attributes:
            headers[CUSTOM_ATTRIBUTES_HEADER] = custom_attributes
        req = urllib.request.Request(
            base_url.rstrip("/") + INVOCATIONS_PATH, data=body, headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                payload, h = json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            raise StreamFailed(f"HTTP {e.code}: {e.read()[:500]!r}") from None
        # SageMaker takes the new session's id from X-Amzn-SageMaker-Session-Id; the
        # container also answers it as X-Amzn-SageMaker-New-Session-Id (older images).
        new = h.get(SESSION_HEADER) if session_id == NEW_SESSION else None
        return Reply(
            payload.get("messages", []),
            new or h.get(NEW_SESSION_HEADER),
            h.get(CLOSED_SESSION_HEADER),
        )

    return invoke


# -- CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m streamasr_client.sagemaker_stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("audio", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="SageMaker endpoint name")
    where.add_argument("--url", help="a container's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--mode", choices=("bidi", "invocations"), default="bidi")
    p.add_argument(
        "--region", default=None, help="AWS region (default: AWS_REGION, else the profile's region)"
    )
    p.add_argument(
        "--profile",
        default=None,
        help="shared-config profile for credentials and region (default: "
        "AWS_PROFILE, else the SDK's default chain)",
    )
    p.add_argument("--target-variant", default=None)
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="bidi mode: the runtime endpoint (default https://runtime.sagemaker."
        f"<region>.amazonaws.com:{HTTP2_PORT})",
    )
    p.add_argument(
        "--ca-bundle",
        default=None,
        help="bidi mode: PEM file of CAs to trust instead of the system store "
        "(default: AWS_CA_BUNDLE)",
    )
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--realtime", action="store_true")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="per-stream decoder option (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print every message")
    a = p.parse_args(argv)
    pcm, rate = read_pcm16(a.audio)
    framing = Framing(rate, a.chunk_ms, dict(o.split("=", 1) for o in a.option))

    def print_json(m: dict) -> None:
        sys.stdout.write(json.dumps(m) + "\n")

    show = print_json if a.json else None
    try:
        if a.mode == "invocations":
            invoke = http_invoker(a.url) if a.url else boto3_invoker(a.endpoint, a.region)
            messages = InvocationsSession(invoke, framing).stream(pcm, max(a.chunk_ms, 1000))
        elif a.url:
            messages = asyncio.run(
                stream_websocket(a.url, pcm, framing, realtime=a.realtime, on_message=show)
            )
        else:
            messages = asyncio.run(
                stream_sagemaker(
                    a.endpoint,
                    pcm,
                    framing,
                    region=a.region,
                    realtime=a.realtime,
                    target_variant=a.target_variant,
                    endpoint_url=a.endpoint_url,
                    profile=a.profile,
                    ca_bundle=a.ca_bundle,
                    on_message=show,
                )
            )
    except (StreamFailed, ValueError) as exc:  # ValueError: options the query cannot carry
        log.error("%s", exc)
        return 1
    if not a.json:
        sys.stdout.write(final_text(messages) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
