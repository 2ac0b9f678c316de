"""Stream a recording to the streamasr SageMaker endpoint.

Three ways, one framing (the gateway's, streamasr/gateway.py):

* ``bidi`` — ``InvokeEndpointWithBidirectionalStream`` (HTTP/2) through AWS's Python SDK
  ``aws-sdk-sagemaker-runtime-http2`` (``pip install aws-sdk-sagemaker-runtime-http2``).
  That package needs Python >= 3.12, so it is imported only when this mode runs.
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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlencode

import numpy as np

log = logging.getLogger("streamasr_client.sagemaker")

WS_PATH = "/invocations-bidirectional-stream"


# -- framing (shared by every transport) --------------------------------------------------

@dataclass
class Framing:
    """What goes over the wire for one recording."""
    sample_rate: int
    chunk_ms: int = 100
    options: dict[str, Any] = field(default_factory=dict)

    def query_string(self) -> str:
        q = {"encoding": "linear16", "sample_rate": self.sample_rate}
        q.update({k: str(v).lower() if isinstance(v, bool) else v
                  for k, v in self.options.items()})
        return urlencode(q)

    def chunk_bytes(self) -> int:
        return max(1, self.sample_rate * self.chunk_ms // 1000) * 2

    def audio_frames(self, pcm: bytes) -> Iterator[bytes]:
        step = self.chunk_bytes()
        for i in range(0, len(pcm), step):
            yield pcm[i:i + step]

    @staticmethod
    def control(kind: str) -> str:
        if kind not in ("Finalize", "KeepAlive", "CloseStream"):
            raise ValueError(f"unknown control message {kind!r}")
        return json.dumps({"type": kind})

    @staticmethod
    def parse(text: str | bytes) -> dict:
        return json.loads(text)


def read_pcm16(path: str | Path) -> tuple[bytes, int]:
    """A file (anything libsndfile reads) as mono int16 little-endian bytes + its rate."""
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="int16", always_2d=True)
    mono = audio[:, 0] if audio.shape[1] == 1 else \
        audio.astype(np.int32).mean(axis=1).astype(np.int16)
    return mono.astype("<i2").tobytes(), int(rate)


def transcript(messages: list[dict]) -> str:
    return " ".join(m["channel"]["alternatives"][0]["transcript"] for m in messages
                    if m.get("type") == "Results" and m.get("is_final")
                    and m["channel"]["alternatives"][0]["transcript"])


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

async def stream_websocket(base_url: str, pcm: bytes, framing: Framing, *,
                           realtime: bool = False,
                           on_message: Callable[[dict], None] | None = None) -> list[dict]:
    """The container's own route, as SageMaker's platform drives it."""
    import aiohttp

    messages: list[dict] = []
    url = base_url.rstrip("/") + WS_PATH + "?" + framing.query_string()
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url) as ws:
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
                raise StreamFailed(f"closed with {ws.close_code}: "
                                   f"{[m for m in messages if m.get('type') == 'Error']}")
    return messages


# -- bidi: InvokeEndpointWithBidirectionalStream ---------------------------------------------

def _http2_sdk():
    """Import AWS's HTTP/2 SageMaker runtime SDK (Python >= 3.12) or say why not."""
    if sys.version_info < (3, 12):
        raise StreamFailed("InvokeEndpointWithBidirectionalStream needs the "
                           "aws-sdk-sagemaker-runtime-http2 package, which requires Python "
                           f">= 3.12 (this is {sys.version.split()[0]}); use --mode "
                           "invocations, or --url against a container")
    try:
        from aws_sdk_sagemaker_runtime_http2 import client as sm_client
        from aws_sdk_sagemaker_runtime_http2 import config as sm_config
        from aws_sdk_sagemaker_runtime_http2 import models as sm_models
    except ImportError as exc:
        raise StreamFailed("pip install aws-sdk-sagemaker-runtime-http2 (Python >= 3.12)") \
            from exc
    return sm_client, sm_config, sm_models


async def stream_sagemaker(endpoint: str, pcm: bytes, framing: Framing, *, region: str,
                           realtime: bool = False, target_variant: str | None = None,
                           on_message: Callable[[dict], None] | None = None) -> list[dict]:
    """One bidirectional stream to a SageMaker endpoint.  NOT exercised here (needs
    Python >= 3.12 and an AWS endpoint); the framing it sends is the one the ``ws``
    mode sends, which the tests check against a real gateway."""
    sm_client, sm_config, m = _http2_sdk()
    from smithy_aws_core.identity import EnvironmentCredentialsResolver

    cfg = sm_config.Config(endpoint_uri=f"https://runtime.sagemaker.{region}.amazonaws.com:8443",
                           region=region,
                           aws_credentials_identity_resolver=EnvironmentCredentialsResolver())
    client = sm_client.SageMakerRuntimeHTTP2Client(config=cfg)
    kw = {"endpoint_name": endpoint, "model_query_string": framing.query_string()}
    if target_variant:
        kw["target_variant"] = target_variant
    stream = await client.invoke_endpoint_with_bidirectional_stream(
        m.InvokeEndpointWithBidirectionalStreamInput(**kw))

    def part(data: bytes, kind: str):
        return m.RequestStreamEventPayloadPart(
            value=m.RequestPayloadPart(bytes_=data, data_type=kind))

    messages: list[dict] = []

    async def reader():
        _, output = await stream.await_output()
        async for event in output:
            value = getattr(event, "value", None)
            if isinstance(event, m.ResponseStreamEventPayloadPart):
                msg = framing.parse(value.bytes_)
                messages.append(msg)
                if on_message:
                    on_message(msg)
            else:                   # ModelStreamError / InternalStreamFailure
                raise StreamFailed(f"{type(event).__name__}: {value}")

    r = asyncio.create_task(reader())
    async for frame in _paced(framing.audio_frames(pcm), framing, realtime):
        await stream.input_stream.send(part(frame, "BINARY"))
    await stream.input_stream.send(part(framing.control("CloseStream").encode(), "UTF8"))
    await r
    await stream.input_stream.close()
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

    def __init__(self, invoke: Callable[[bytes, str, str, str | None], Reply],
                 framing: Framing):
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
            reply = self.invoke(pcm, self.content_type, "NEW_SESSION", attrs or None)
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
        chunks = [pcm[i:i + step] for i in range(0, len(pcm), step)] or [b""]
        for c in chunks[:-1]:
            self.send(c)
        self.send(chunks[-1], close=True)
        return self.messages


def boto3_invoker(endpoint: str, region: str | None = None, client=None):
    if client is None:
        import boto3

        client = boto3.client("sagemaker-runtime", region_name=region)

    def invoke(body: bytes, content_type: str, session_id: str,
               custom_attributes: str | None) -> Reply:
        kw = {"EndpointName": endpoint, "Body": body, "ContentType": content_type,
              "Accept": "application/json", "SessionId": session_id}
        if custom_attributes:
            kw["CustomAttributes"] = custom_attributes
        r = client.invoke_endpoint(**kw)
        payload = json.loads(r["Body"].read())
        return Reply(payload.get("messages", []), r.get("NewSessionId"),
                     r.get("ClosedSessionId"))
    return invoke


def http_invoker(base_url: str):
    """InvokeEndpoint as SageMaker forwards it to the container (same headers)."""
    import urllib.error
    import urllib.request

    def invoke(body: bytes, content_type: str, session_id: str,
               custom_attributes: str | None) -> Reply:
        headers = {"Content-Type": content_type, "Accept": "application/json",
                   "X-Amzn-SageMaker-Session-Id": session_id}
        if custom_attributes:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = custom_attributes
        req = urllib.request.Request(base_url.rstrip("/") + "/invocations", data=body,
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                payload, h = json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            raise StreamFailed(f"HTTP {e.code}: {e.read()[:500]!r}") from None
        return Reply(payload.get("messages", []), h.get("X-Amzn-SageMaker-New-Session-Id"),
                     h.get("X-Amzn-SageMaker-Closed-Session-Id"))
    return invoke


# -- CLI ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m streamasr_client.sagemaker_stream",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", type=Path)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="SageMaker endpoint name")
    where.add_argument("--url", help="a container's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--mode", choices=("bidi", "invocations"), default="bidi")
    p.add_argument("--region", default=None)
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--realtime", action="store_true")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="per-stream decoder option (repeatable)")
    p.add_argument("--json", action="store_true", help="print every message")
    a = p.parse_args(argv)
    pcm, rate = read_pcm16(a.audio)
    framing = Framing(rate, a.chunk_ms, dict(o.split("=", 1) for o in a.option))
    show = (lambda m: sys.stdout.write(json.dumps(m) + "\n")) if a.json else None
    try:
        if a.mode == "invocations":
            invoke = http_invoker(a.url) if a.url else boto3_invoker(a.endpoint, a.region)
            messages = InvocationsSession(invoke, framing).stream(pcm, max(a.chunk_ms, 1000))
        elif a.url:
            messages = asyncio.run(stream_websocket(a.url, pcm, framing, realtime=a.realtime,
                                                    on_message=show))
        else:
            import boto3

            region = a.region or boto3.session.Session().region_name
            messages = asyncio.run(stream_sagemaker(a.endpoint, pcm, framing, region=region,
                                                    realtime=a.realtime, on_message=show))
    except StreamFailed as exc:
        log.error("%s", exc)
        return 1
    if not a.json:
        sys.stdout.write(transcript(messages) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
