"""Streams a file through Deepgram's own Python SDK and prints what the SDK handed the
application, as one JSON object: run by tests/e2e/test_deepgram.py with .venv-deepgram's
Python (``make venv-deepgram``: deepgram-sdk, deepgram-sagemaker, deepgram-captions, on
Python >= 3.12), never imported by the project's own venv.

    python tests/deepgram_sdk_client.py AUDIO --url ws://127.0.0.1:PORT [--param k=v ...]
    python tests/deepgram_sdk_client.py AUDIO --sagemaker ENDPOINT --endpoint-url URL \\
        --ca-bundle CA --region R [--param k=v ...]

AUDIO is a 16-bit WAV, or raw bytes (``--raw``) sent as they are.  The SDK is used as a
user's code uses it: ``listen.v1.connect(**params)``, ``on(EventType.MESSAGE)``,
``start_listening()``, ``send_media``, ``send_finalize``, ``send_close_stream``.
``--sagemaker``: ``AsyncDeepgramClient(transport_factory=SageMakerTransportFactory(...))``
from deepgram-sagemaker, unchanged but for the one thing a local stand-in needs:
deepgram-sagemaker 0.4.0 writes AWS's endpoint URL into its code
(``https://runtime.sagemaker.<region>.amazonaws.com:8443``) and trusts the system's CAs,
so the endpoint URL and the stand-in's CA are swapped in where its transport builds its
AWS client config; signing, the event stream, the invocation path and query string are
the package's own.

Output: {"messages": [{"class": SDK type name, "data": the parsed message}], "errors":
[repr of each EventType.ERROR], "webvtt": ..., "srt": ... (deepgram-captions on the
finals, "" when there are none)}.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import sys
import wave
from pathlib import Path

from deepgram import AsyncDeepgramClient
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment
from deepgram_captions import DeepgramConverter, srt, webvtt

CHUNK_S = 0.25
# --keepalive: one KeepAlive every this many chunks (2 s of audio), as a client keeps a
# quiet stream open; the gateway closes a client sending control messages by the dozen.
KEEPALIVE_EVERY = 8
# --wav: bytes per send_media (0.25 s of 16 kHz 16-bit mono; the header rides in the first)
WAV_CHUNK_BYTES = 8000


def read_audio(path: Path, raw: bool, rate: int, width: int) -> tuple[bytes, int, int]:
    """(bytes to send, bytes per CHUNK_S, sample rate)."""
    if raw:
        data = path.read_bytes()
        return data, int(rate * width * CHUNK_S), rate
    with wave.open(str(path), "rb") as w:
        rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
        data = w.readframes(w.getnframes())
    return data, int(rate * width * channels * CHUNK_S), rate


def sagemaker_factory(a: argparse.Namespace):
    import deepgram_sagemaker.transport as dst
    from awscrt import io as crt_io
    from deepgram_sagemaker import SageMakerTransportFactory

    base_config, base_http = dst.AsyncSageMakerRuntimeHTTP2Config, dst.AWSCRTHTTPClient

    class StandInConfig(base_config):  # type: ignore[misc, valid-type]
        @classmethod
        async def resolve(cls, **kw):
            kw["endpoint_uri"] = a.endpoint_url  # instead of AWS's URL
            return await base_config.resolve(**kw)

    class TrustingCRTClient(base_http):  # type: ignore[misc, valid-type]
        def __init__(self, **kw):
            super().__init__(**kw)
            opts = crt_io.TlsContextOptions()
            opts.override_default_trust_store_from_path(ca_filepath=a.ca_bundle)
            self._tls_ctx = crt_io.ClientTlsContext(opts)

        def __deepcopy__(self, memo):
            return TrustingCRTClient(eventloop=self._eventloop, client_config=self._config)

    dst.AsyncSageMakerRuntimeHTTP2Config = StandInConfig
    dst.AWSCRTHTTPClient = TrustingCRTClient
    return SageMakerTransportFactory(endpoint_name=a.sagemaker, region=a.region)


async def run(a: argparse.Namespace) -> dict:
    params = dict(p.split("=", 1) for p in a.param)
    params.setdefault("model", "nova-3")
    if a.wav:  # the file as it is, header and all; the server reads the format from it
        data, chunk = a.audio.read_bytes(), WAV_CHUNK_BYTES
    else:
        data, chunk, rate = read_audio(
            a.audio, a.raw, int(params.get("sample_rate", 8000)), a.width
        )
    if not (a.raw or a.wav):
        params.setdefault("encoding", "linear16")
        params.setdefault("sample_rate", str(rate))
    if a.sagemaker:
        client = AsyncDeepgramClient(api_key="unused", transport_factory=sagemaker_factory(a))
    else:
        env = DeepgramClientEnvironment(
            base=a.url.replace("ws", "http", 1), production=a.url, agent=a.url, agent_rest=a.url
        )
        client = AsyncDeepgramClient(api_key="unused", environment=env)
    messages: list[dict] = []
    errors: list[str] = []

    async def on_message(m) -> None:
        data = m if isinstance(m, bytes) else m.dict()
        messages.append({"class": type(m).__name__, "data": data})

    async def on_error(exc) -> None:
        errors.append(repr(exc))

    # a parameter connect() has no argument for goes as the SDK lets one through
    known = inspect.signature(client.listen.v1.connect).parameters
    other = {k: params.pop(k) for k in list(params) if k not in known}
    if other:
        params["request_options"] = {"additional_query_parameters": other}
    async with client.listen.v1.connect(**params) as conn:
        conn.on(EventType.MESSAGE, on_message)
        conn.on(EventType.ERROR, on_error)
        listening = asyncio.create_task(conn.start_listening())
        for n, i in enumerate(range(0, len(data), chunk)):
            await conn.send_media(data[i : i + chunk])
            if a.keepalive and n % KEEPALIVE_EVERY == 0:
                await conn.send_keep_alive()
        if a.finalize:
            await conn.send_finalize()
        if a.configure:
            await conn._send({"type": "Configure", "keyterms": ["streamasr"]})
        await conn.send_close_stream()
        await asyncio.wait_for(listening, a.timeout)
    return {"messages": messages, "errors": errors, **captions(messages)}


def captions(messages: list[dict]) -> dict:
    """deepgram-captions on the finals: each final an utterance of a Deepgram response."""
    finals = [
        m["data"]
        for m in messages
        if m["class"] == "ListenV1Results"
        and m["data"]["is_final"]
        and m["data"]["channel"]["alternatives"][0]["words"]
    ]
    if not finals:
        return {"webvtt": "", "srt": ""}
    meta = next((m["data"] for m in messages if m["class"] == "ListenV1Metadata"), {})
    response = {
        "metadata": meta,
        "results": {
            "channels": [{"alternatives": [finals[0]["channel"]["alternatives"][0]]}],
            "utterances": [
                {
                    **f["channel"]["alternatives"][0],
                    "start": f["start"],
                    "end": f["start"] + f["duration"],
                }
                for f in finals
            ],
        },
    }
    converter = DeepgramConverter(response)
    return {"webvtt": webvtt(converter), "srt": srt(converter)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", type=Path)
    p.add_argument("--url", help="ws://host:port of the gateway")
    p.add_argument("--sagemaker", metavar="ENDPOINT")
    p.add_argument("--endpoint-url")
    p.add_argument("--ca-bundle")
    p.add_argument("--region", default="us-west-2")
    p.add_argument("--param", action="append", default=[], help="a connect() parameter k=v")
    p.add_argument("--raw", action="store_true", help="AUDIO is raw bytes in the params' format")
    p.add_argument("--width", type=int, default=1, help="--raw: bytes per sample")
    p.add_argument("--wav", action="store_true", help="send the WAV file whole, no encoding")
    p.add_argument("--finalize", action="store_true", help="send Finalize before CloseStream")
    p.add_argument("--keepalive", action="store_true", help="a KeepAlive every 2 s of audio")
    p.add_argument("--configure", action="store_true", help="send Deepgram's Configure")
    p.add_argument("--timeout", type=float, default=240.0)
    a = p.parse_args()
    json.dump(asyncio.run(run(a)), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
