"""Deepgram's live transcription API on the gateway: the ``/v1/listen`` WebSocket, so that
Deepgram's own SDKs (``deepgram-sdk``, ``deepgram-sagemaker``, ``@deepgram/sdk``...) work
against this container unchanged.

Through SageMaker the same route is reached by ``InvokeEndpointWithBidirectionalStream``
with ``X-Amzn-SageMaker-Model-Invocation-Path: v1/listen`` (what Deepgram's SageMaker
transports send): AWS documents that the container's WebSocket is opened on
``/invocations-bidirectional-stream`` unless that header names another path, with
``X-Amzn-SageMaker-Model-Query-String`` as its query.  So one route serves both.

What changes against the gateway's own WebSocket route (ws.py), and nothing else:

* the query string holds Deepgram's parameters, each mapped onto the closed option set
  (``protocol.STREAM_OPTION_KEYS``) or handled here (``PARAMETERS`` says how, one entry
  per parameter ``listen.v1.connect`` can send); a parameter that would change the
  transcript in a way this server cannot is refused by name;
* messages are Deepgram's: ``Results`` with ``channel_index``, ``metadata`` and, with
  ``punctuate``/``smart_format``, ``punctuated_word``; ``SpeechStarted``
  (``vad_events``), ``UtteranceEnd`` (``utterance_end_ms``), ``Metadata`` before a normal
  close, ``Error`` as ``{"type", "variant", "description"}``, compact JSON;
* control messages: ``KeepAlive``, ``Finalize``, ``CloseStream`` as on the own route;
  Deepgram's ``Configure`` (new keyterms mid-stream) is answered ``ConfigureFailure``;
* a session silent for the idle timeout closes 1011 ``NET-0001`` as Deepgram's does.

A refused parameter is answered after the socket is accepted (an ``Error`` message, then
close 1008), not by refusing the upgrade: SageMaker wants the socket accepted, and a
refused upgrade reaches a SageMaker client with no reason at all.  docs/deepgram.md is
the user's page; tests/unit/test_deepgram.py keeps it and ``PARAMETERS`` in step.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
from aiohttp import web

from streamasr import protocol
from streamasr.core.decoding.config import DEFAULT_ENDPOINTING_MS
from streamasr.core.params import parse_bool, parse_float, parse_int, parse_ms_or_bool
from streamasr.core.text import normalize
from streamasr.sagemaker.gateway.audio import ENCODINGS, parse_channels, parse_sample_rate
from streamasr.sagemaker.gateway.options import OptionError, check_values
from streamasr.sagemaker.gateway.ws import Gateway, ProtocolError, WsSession

log = logging.getLogger("streamasr.gateway")

#: The route (Deepgram's path; SageMaker's invocation path ``v1/listen``).
LISTEN_PATH = "/v1/listen"

# -- the parameters -------------------------------------------------------------------
MAPPED = "mapped"  # onto a stream option or the audio format
SERVED = "served"  # handled by this module (message shape)
IGNORED = "accepted and ignored"  # cannot change the transcript
FALSE_ONLY = "false accepted, true refused"  # a feature this server does not have
REFUSED = "refused"

#: Every query parameter ``listen.v1.connect`` (deepgram-sdk 7.16) can send: how it is
#: handled, and what it does here.  docs/deepgram.md's table is this table.
PARAMETERS: dict[str, tuple[str, str]] = {
    "callback": (REFUSED, "results are only sent on the socket (no outbound calls)"),
    "callback_method": (REFUSED, "as callback"),
    "channels": (MAPPED, "1-8 interleaved channels, mixed to one (results for channel 0)"),
    "detect_entities": (FALSE_ONLY, "no entity detection"),
    "diarize": (FALSE_ONLY, "no speaker labels"),
    "diarize_model": (REFUSED, "no speaker labels (any value turns diarization on)"),
    "dictation": (FALSE_ONLY, "spoken punctuation commands are transcribed as words"),
    "encoding": (
        MAPPED,
        "linear16, mulaw, alaw (raw audio); absent: a WAV stream (its header says the format)",
    ),
    "endpointing": (
        MAPPED,
        "ms of silence after speech (voice-activity detector) that ends an utterance (speech_final); "
        "false: only Finalize/CloseStream end one; absent or true: the server's default",
    ),
    "extra": (SERVED, "key:value pairs echoed in each Results' metadata.extra"),
    "interim_results": (SERVED, "true: interim Results too; false (default): finals only"),
    "keyterm": (
        MAPPED,
        "phrases boosted in the decoder (hotwords, default boost; 66 -> sixty six)",
    ),
    "keywords": (MAPPED, "word[:boost] boosted in the decoder (hotwords); boost >= 0"),
    "language": (MAPPED, "English only: en, en-US, en-GB, en-AU, en-IN, en-NZ"),
    "language_hint": (MAPPED, "as language"),
    "mip_opt_out": (IGNORED, "nothing is kept for model improvement anyway"),
    "model": (MAPPED, "Deepgram model names -> the server's default model; see Models"),
    "multichannel": (FALSE_ONLY, "channels are mixed to one, not transcribed apart"),
    "numerals": (FALSE_ONLY, "numbers are written as words"),
    "profanity_filter": (FALSE_ONLY, "no profanity filter"),
    "punctuate": (
        SERVED,
        "finals keep Whisper's punctuation and casing (two-pass model); the CTC model "
        "writes none, so punctuated_word = word there",
    ),
    "redact": (FALSE_ONLY, "no redaction"),
    "replace": (REFUSED, "no find-and-replace"),
    "sample_rate": (
        MAPPED,
        "8000-192000 Hz, resampled to the model's rate; with encoding, as Deepgram asks",
    ),
    "search": (REFUSED, "no search hits in the results"),
    "smart_format": (SERVED, "as punctuate (numbers, dates... stay words)"),
    "tag": (IGNORED, "usage tags: this server keeps no usage records"),
    "utterance_end_ms": (MAPPED, "UtteranceEnd after this many ms of silence after a final"),
    "vad_events": (SERVED, "SpeechStarted when an utterance's first word is heard"),
    "version": (MAPPED, "latest only (one version of each model)"),
}

#: Deepgram's model families and domains; every such name selects the server's default
#: model (the gateway's STREAMASR_TWO_PASS).  The Triton model names select one directly.
DEEPGRAM_FAMILIES = ("nova-3", "nova-2", "nova", "enhanced", "base")
DEEPGRAM_DOMAINS = (
    "general",
    "meeting",
    "phonecall",
    "finance",
    "conversationalai",
    "voicemail",
    "video",
    "medical",
    "drivethru",
    "automotive",
    "atc",
)
OWN_MODELS = {protocol.STREAM_MODEL: False, protocol.TWO_PASS_MODEL: True}
ENGLISH = re.compile(r"^en(-(us|gb|au|in|nz))?$", re.IGNORECASE)
DEEPGRAM_ENCODINGS = ("linear16", "mulaw", "alaw")
#: Between a keyword and its boost (``keywords=word:2``).
KEYWORD_SEP = ":"
#: Close reason Deepgram gives a stream that sent nothing within its timeout.
NO_AUDIO_REASON = "NET-0001"
#: ... with this close code (RFC 6455 "internal error"), as Deepgram documents it.
INTERNAL_ERROR = 1011
#: Error variant and close reason for audio that cannot be decoded (Deepgram's DATA-0000).
UNDECODABLE = "DATA-0000"
#: Error variant for a refused query parameter (ListenV1Error.variant).
BAD_PARAMETER = "INVALID_QUERY_PARAMETER"


class ListenParameterError(ValueError):
    """A query parameter this route refuses; the message starts with its name."""


def _single(name: str, values: Sequence[str]) -> str:
    if len(values) != 1:
        raise ListenParameterError(f"{name}: given {len(values)} times; give it once")
    return values[0]


def _flag(name: str, values: Sequence[str]) -> bool:
    try:
        return parse_bool(name, _single(name, values))
    except ValueError as exc:
        raise ListenParameterError(str(exc)) from None


def model_two_pass(name: str) -> bool | None:
    """The ``two_pass`` setting a ``model`` name selects (None: the server's default)."""
    if name in OWN_MODELS:
        return OWN_MODELS[name]
    low = name.strip().lower()
    for family in DEEPGRAM_FAMILIES:
        if low == family or (
            low.startswith(family + "-") and low[len(family) + 1 :] in DEEPGRAM_DOMAINS
        ):
            return None
    raise ListenParameterError(
        f"model: {name[:64]!r} is not served here; use one of {list(DEEPGRAM_FAMILIES)} "
        f"(optionally -<domain>, one of {list(DEEPGRAM_DOMAINS)}): the server's default "
        f"model, or one of {sorted(OWN_MODELS)}"
    )


def endpoint_options(value: str) -> dict[str, Any]:
    """Deepgram's ``endpointing`` (ms of silence after speech, or true/false) as our stream
    option of the same name and meaning: the voice-activity endpoint (speech_final=true);
    ``true``: the server's default; ``false`` (0): only Finalize/CloseStream end one."""
    try:
        return {"endpointing": parse_ms_or_bool("endpointing", value, DEFAULT_ENDPOINTING_MS)}
    except ValueError:
        raise ListenParameterError(
            f"endpointing: must be milliseconds (an integer >= 0) or true/false, got {value[:64]!r}"
        ) from None


def hotwords(name: str, values: Sequence[str], boosted: bool) -> list[Any]:
    """``keywords`` (``word[:boost]``) or ``keyterm`` (a phrase) as hotword entries, in
    the form the character models write (lower case, numbers as words, no punctuation)."""
    out: list[Any] = []
    for raw in values:
        phrase, boost = raw, None
        if boosted and KEYWORD_SEP in raw:
            phrase, _, number = raw.rpartition(KEYWORD_SEP)
            try:
                boost = parse_float(name, number, minimum=-1e9)
            except ValueError as exc:
                raise ListenParameterError(str(exc)) from None
            if boost < 0:
                raise ListenParameterError(
                    f"{name}: negative boosts (suppressing a word) are not supported, got {boost:g}"
                )
        phrase = normalize(phrase)  # the models' form: "Route 66" -> "route sixty six"
        if not phrase:
            raise ListenParameterError(f"{name}: empty phrase")
        out.append(phrase if boost is None else [phrase, boost])
    return out


@dataclass
class ListenRequest:
    """A ``/v1/listen`` query string, translated."""

    query: dict[str, Any]  # the own route's query: format, two_pass, stream options
    interim_results: bool = False
    punctuate: bool = False
    vad_events: bool = False
    utterance_end: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    wav: bool = False  # no encoding given: the stream starts with a WAV header


#: WAV format tags (and sample widths) the gateway decodes, as its encodings.
WAV_FORMATS = {(1, 16): "linear16", (3, 32): "float32", (6, 8): "alaw", (7, 8): "mulaw"}
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
#: Most bytes read while looking for a WAV header's data chunk.
MAX_WAV_HEADER_BYTES = 64 * 1024


class NotWav(ValueError):
    """The start of a stream without ``encoding`` is not a WAV header this route reads."""


def wav_header(head: bytes) -> tuple[str, int, int, int] | None:
    """(encoding, sample rate, channels, where the samples start) from the start of a WAV
    stream, or None while more bytes are needed (NotWav when it cannot be one).  The
    data chunk's length is not used: a live WAV stream often says 0 or 0xFFFFFFFF."""
    if len(head) >= 12 and (head[:4] != b"RIFF" or head[8:12] != b"WAVE"):
        raise NotWav(
            "the stream is not WAV and no encoding was given: send raw audio with "
            f"encoding ({', '.join(DEEPGRAM_ENCODINGS)}) and sample_rate, or a WAV stream"
        )
    at, fmt = 12, None
    while len(head) >= at + 8:
        kind, size = head[at : at + 4], int.from_bytes(head[at + 4 : at + 8], "little")
        if kind == b"data":
            if fmt is None:
                raise NotWav("WAV: the data chunk comes before the fmt chunk")
            return (*fmt, at + 8)
        if kind == b"fmt ":
            if len(head) < at + 8 + 16:
                return None
            body = head[at + 8 : at + 8 + size]
            tag, channels = int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little")
            rate, bits = int.from_bytes(body[4:8], "little"), int.from_bytes(body[14:16], "little")
            if tag == WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                tag = int.from_bytes(body[24:26], "little")  # the subformat GUID's first bytes
            encoding = WAV_FORMATS.get((tag, bits))
            if encoding is None:
                raise NotWav(
                    f"WAV format {tag} with {bits}-bit samples is not decoded here; "
                    "use 16-bit PCM, 32-bit float, mu-law or A-law"
                )
            fmt = (encoding, rate, channels)
        at += 8 + size + size % 2  # chunks are padded to even sizes
    if len(head) > MAX_WAV_HEADER_BYTES:
        raise NotWav(f"no WAV data chunk in the first {MAX_WAV_HEADER_BYTES} bytes")
    return None


def parse_listen_query(query: Mapping[str, Sequence[str]]) -> ListenRequest:
    """Translate Deepgram's parameters (each key with all its values) or refuse one by
    name (ListenParameterError)."""
    unknown = sorted(k[:64] for k in query if k not in PARAMETERS)
    if unknown:
        raise ListenParameterError(
            f"{unknown[0]}: not a parameter of Deepgram's live API that this server knows; "
            f"parameters: {sorted(PARAMETERS)}"
        )
    req = ListenRequest(query={})
    q = req.query
    options: dict[str, Any] = {}
    words: list[Any] = []
    for name, values in query.items():
        policy = PARAMETERS[name][0]
        if policy == REFUSED:
            raise ListenParameterError(f"{name}: not supported here ({PARAMETERS[name][1]})")
        if policy == FALSE_ONLY:
            if _flag(name, values):
                raise ListenParameterError(
                    f"{name}=true is not supported here ({PARAMETERS[name][1]})"
                )
            continue
        if policy == IGNORED:
            continue
        if name == "model":
            two_pass = model_two_pass(_single(name, values))
            if two_pass is not None:
                q["two_pass"] = two_pass
        elif name == "version":
            if _single(name, values).strip().lower() != "latest":
                raise ListenParameterError(f"version: only 'latest', got {values[0][:64]!r}")
        elif name in ("language", "language_hint"):
            for v in values:
                if not ENGLISH.match(v.strip()):
                    raise ListenParameterError(
                        f"{name}: {v[:64]!r} is not served here; the models are English "
                        "(en, en-US, en-GB, en-AU, en-IN, en-NZ)"
                    )
        elif name == "encoding":
            enc = _single(name, values).strip().lower()
            if enc not in DEEPGRAM_ENCODINGS:
                raise ListenParameterError(
                    f"encoding: {enc[:64]!r} is not supported here; use one of "
                    f"{list(DEEPGRAM_ENCODINGS)} (raw audio)"
                )
            q["encoding"] = enc
        elif name == "sample_rate":
            try:
                q["sample_rate"] = parse_sample_rate(_single(name, values))
            except ValueError as exc:
                raise ListenParameterError(str(exc)) from None
        elif name == "channels":
            try:
                q["channels"] = parse_channels(_single(name, values))
            except ValueError as exc:
                raise ListenParameterError(str(exc)) from None
        elif name == "endpointing":
            options.update(_checked(name, endpoint_options(_single(name, values))))
        elif name == "utterance_end_ms":
            try:
                ms = parse_int(name, _single(name, values), minimum=1)
            except ValueError as exc:
                raise ListenParameterError(str(exc)) from None
            options.update(_checked(name, {"utterance_end": ms / 1000.0}))
            req.utterance_end = True
        elif name in ("keywords", "keyterm"):
            words += hotwords(name, values, boosted=name == "keywords")
        elif name == "interim_results":
            req.interim_results = _flag(name, values)
        elif name in ("punctuate", "smart_format"):
            req.punctuate = req.punctuate or _flag(name, values)
        elif name == "vad_events":
            req.vad_events = _flag(name, values)
        elif name == "extra":
            for v in values:
                key, sep, value = v.partition(":")
                if not sep or not key:
                    raise ListenParameterError(f"extra: must be key:value, got {v[:64]!r}")
                req.extra[key] = value
        else:  # pragma: no cover - PARAMETERS and this function disagree
            raise AssertionError(f"unhandled parameter {name}")
    if ("encoding" in q) != ("sample_rate" in q):
        raise ListenParameterError(
            "encoding and sample_rate go together: raw audio "
            f"({', '.join(DEEPGRAM_ENCODINGS)}) needs both; a WAV stream neither"
        )
    req.wav = "encoding" not in q
    if words:
        options.update(
            _checked(
                "keywords" if "keywords" in query else "keyterm", {"hotwords": json.dumps(words)}
            )
        )
    if not req.utterance_end:
        options["utterance_end"] = 0.0  # Deepgram sends UtteranceEnd only when asked
    q.update(options)
    return req


def _checked(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Stream options, checked as the decoder will; an error names Deepgram's parameter."""
    try:
        check_values(options)
    except OptionError as exc:
        raise ListenParameterError(f"{name}: {exc}") from None
    return options


# -- the session ------------------------------------------------------------------------
def _version() -> str:
    try:
        return importlib_metadata.version("streamasr")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


MODEL_ARCH = {protocol.STREAM_MODEL: "ctc", protocol.TWO_PASS_MODEL: "ctc+whisper-tiny.en"}


def model_info(model: str) -> tuple[str, dict[str, str]]:
    """(model_uuid, model_info) of a served Triton model: a stable id from its name."""
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"streamasr:{model}"))
    return uid, {"name": model, "version": _version(), "arch": MODEL_ARCH.get(model, "ctc")}


CHANNEL = [0, 1]  # results are for channel 0 of 1 (channels are mixed to one)


class DeepgramSession(WsSession):
    """A ``/v1/listen`` WebSocket: the own route's session with Deepgram's parameters and
    messages (see the module documentation)."""

    def __init__(self, gw: Gateway, ws: web.WebSocketResponse, query: Mapping[str, Sequence[str]]):
        super().__init__(gw, ws, {})
        self.listen_query = query
        self.listen = ListenRequest(query={})
        self.request_id = str(uuid.uuid4())
        self.created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.sha256 = hashlib.sha256()  # of everything received (Metadata.sha256)
        self.bytes_in = 0  # audio bytes (a WAV header not counted)
        self.header: bytes | None = b""  # a WAV stream's header so far; None: read
        self.in_speech = False  # SpeechStarted sent for the open utterance
        self.model = ""
        self.model_uuid = ""
        self.model_info: dict[str, str] = {}

    def _query(self) -> None:
        try:
            self.listen = parse_listen_query(self.listen_query)
        except ListenParameterError as exc:
            raise ProtocolError(BAD_PARAMETER, str(exc)) from None
        self.query = self.listen.query
        super()._query()
        self.model = self.cfg.stream_model(self.two_pass)
        self.model_uuid, self.model_info = model_info(self.model)

    async def _audio(self, data: bytes) -> None:
        if self.draining:
            return
        self.sha256.update(data)
        if self.listen.wav and self.header is not None:
            data = self._after_header(data)
            if not data:
                return
        self.bytes_in += len(data)
        await super()._audio(data)

    def _after_header(self, data: bytes) -> bytes:
        """Read the WAV header off the stream's first bytes: it sets the format; what
        follows it is audio (b"" while the header is still incomplete)."""
        assert self.header is not None
        self.header += data
        try:
            found = wav_header(self.header)
            if found is None:
                return b""
            encoding, rate, channels, start = found
            self.encoding = encoding
            self.sample_rate = parse_sample_rate(rate)
            self.channels = parse_channels(channels)
        except ValueError as exc:  # NotWav, or a rate or channel count out of range
            raise ProtocolError(UNDECODABLE, str(exc)) from None
        audio, self.header = self.header[start:], None
        return audio

    async def _control(self, text: str) -> bool:
        if self.draining:
            return False
        kind = self._parse_control(text)["type"]
        if kind == "Configure":  # Deepgram's: new keyterms mid-stream
            self._put(
                {
                    "type": "ConfigureFailure",
                    "request_id": self.request_id,
                    "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                    "description": "keyterms are fixed for the stream's life here "
                    "(set them with keyterm= on the query string)",
                }
            )
            return False
        if kind not in protocol.CONTROL_MESSAGES:
            raise ProtocolError(
                "SchemaError", f"unknown message type; types: {list(protocol.CONTROL_MESSAGES)}"
            )
        return await super()._control(text)

    async def _next_frame(self) -> Any:
        try:
            return await super()._next_frame()
        except ProtocolError as exc:
            if exc.code != "idle_timeout":
                raise
            # Deepgram's close for a stream that sent nothing in time
            raise ProtocolError(NO_AUDIO_REASON, str(exc), close_code=INTERNAL_ERROR) from None

    async def _finish(self) -> None:
        await super()._finish()
        self._put(self._metadata())  # after the last results, before the close

    def _metadata(self) -> dict:
        sample_bytes = np.dtype(ENCODINGS[self.encoding][0]).itemsize * self.channels
        rate = self.sample_rate or 1
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self.sha256.hexdigest(),
            "created": self.created,
            "duration": round(self.bytes_in / sample_bytes / rate, 3),
            "channels": 1,
            "models": [self.model_uuid],
            "model_info": {self.model_uuid: self.model_info},
        }

    # -- messages ----------------------------------------------------------------------
    def _outgoing(self, m: dict) -> list[dict]:
        kind = m.get("type")
        if kind == "Results":
            return self._results(m)
        if kind == "UtteranceEnd":
            return [
                {"type": "UtteranceEnd", "channel": CHANNEL, "last_word_end": m["last_word_end"]}
            ]
        if kind == "Error":
            return [self._error_message(str(m.get("code", "model_error")), str(m.get("message")))]
        return []  # nothing else of the model's has a Deepgram form

    def _results(self, m: dict) -> list[dict]:
        out: list[dict] = []
        alt = protocol.alternative(m)
        words = [dict(w) for w in alt["words"]]
        if self.listen.vad_events and words and not self.in_speech:
            out.append({"type": "SpeechStarted", "channel": [0], "timestamp": words[0]["start"]})
            self.in_speech = True
        final = bool(m.get("is_final"))
        if final:
            self.in_speech = False
        if not final and not self.listen.interim_results:
            return out
        transcript = alt["transcript"]
        if self.listen.punctuate:
            for w in words:
                w.setdefault("punctuated_word", w["word"])
            transcript = " ".join(w["punctuated_word"] for w in words)
        else:
            for w in words:
                w.pop("punctuated_word", None)
        metadata: dict[str, Any] = {
            "request_id": self.request_id,
            "model_info": self.model_info,
            "model_uuid": self.model_uuid,
        }
        if self.listen.extra:
            metadata["extra"] = self.listen.extra
        out.append(
            {
                **m,
                "channel_index": CHANNEL,
                "channel": {"alternatives": [{**alt, "transcript": transcript, "words": words}]},
                "metadata": metadata,
            }
        )
        return out

    @staticmethod
    def _dumps(m: dict) -> str:
        return json.dumps(m, ensure_ascii=False, separators=(",", ":"))

    @staticmethod
    def _error_message(code: str, message: str) -> dict:
        return {"type": "Error", "variant": code, "description": message, "message": ""}


def listen_query(request: web.Request) -> dict[str, list[str]]:
    """The query string with every value of a repeated key (keyterm=a&keyterm=b)."""
    return {k: request.query.getall(k) for k in request.query.keys()}
