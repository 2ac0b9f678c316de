"""The wire protocol between streamasr's server side and its clients, in one place.

Both sides import this module and nothing else of each other: the Triton model names a
client calls, the model contract (chunk geometry and features), the SageMaker
container's routes and headers, 16-bit PCM scaling, and typed accessors for the result
messages the decoder sends (``{"type": "Results", "is_final": ..., "channel":
{"alternatives": [{"transcript", "confidence", "words"}]}}``).

It imports only the standard library (and ``streamasr.protocol.contract``, which does too), so
a client installs no server dependency to use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from streamasr.protocol.contract import ContractError, FeatureSpec, ModelContract

__all__ = [
    "BUSY_CODE",
    "CAPACITY_MARKER",
    "CLOSED_SESSION_HEADER",
    "CONTRACT_MODEL",
    "DEFAULT_MAX_LEAD_SECONDS",
    "FEATURE_MODEL",
    "LEAD_MARKER",
    "MAX_LEAD_PARAMETER",
    "MAX_PENDING_REQUESTS",
    "CONTROL_MESSAGES",
    "CUSTOM_ATTRIBUTES_HEADER",
    "ContractError",
    "FeatureSpec",
    "INT64_MAX",
    "INT64_MIN",
    "INVOCATIONS_PATH",
    "is_capacity_refusal",
    "RESERVED_PARAMETERS",
    "RETRY_AFTER_S",
    "STREAM_OPTION_KEYS",
    "check_stream_options",
    "WS_TRY_AGAIN_LATER",
    "ModelContract",
    "NEW_SESSION",
    "NEW_SESSION_HEADER",
    "OFFLINE_MODEL",
    "OFFLINE_OPTION_KEYS",
    "PCM16_FULL_SCALE",
    "SESSION_HEADER",
    "STREAM_MODEL",
    "TWO_PASS_MODEL",
    "WS_PATH",
    "alternative",
    "final_text",
    "finals",
    "is_final",
    "is_results",
    "pcm16_to_float",
    "transcript",
    "words",
]

# -- Triton models a client calls ------------------------------------------------------
STREAM_MODEL = "streaming_asr"
#: The same stream protocol with finals re-decoded by Whisper (two-pass finals).
TWO_PASS_MODEL = "streaming_asr_two_pass"
CONTRACT_MODEL = "model_contract"
OFFLINE_MODEL = "offline_asr"
#: The streaming ensembles' first step: where a stream's per-stream limits are configured.
FEATURE_MODEL = "feature_extractor"

# -- what a client may set on a stream -----------------------------------------------
#: Per-stream options a client may send on a stream's START (decoder and endpoint
#: settings): a closed set.  Every other key is refused by name wherever options enter
#: (the client library, the gateway's query strings, Configure messages, headers).  The
#: decoder's own dataclasses are the definition; tests/e2e/test_hostile_clients.py checks this set
#: equals their fields less the server-only ones (``lm_path``).
STREAM_OPTION_KEYS = frozenset(
    {
        # DecoderConfig
        "decoding",
        "beam_size",
        "beam_top_k",
        "beam_min_token_logp",
        "hotwords",
        "hotword_boost",
        "lm_alpha",
        "lm_beta",
        "lm_partial_words",
        "lm_oov_letter_log10",
        "time_offset",
        "interims",
        "interim_refresh_s",
        # EndpointConfig
        "endpointing",
        "rule1_min_trailing_silence",
        "rule2_min_trailing_silence",
        "rule3_min_utterance_length",
        "empty_finals",
        "utterance_end",
    }
)
#: Keys OFFLINE_MODEL takes beside the stream options.
OFFLINE_OPTION_KEYS = frozenset({"two_pass"})
#: Request parameters Triton (or the KServe protocol) reads itself: a client option of
#: one of these names would steer the request -- another stream's sequence id, its END --
#: instead of the decoder.  Refused by name, and a request's own fields are set after
#: any option in any case.
RESERVED_PARAMETERS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "headers",
        "binary_data",
        "binary_data_size",
        "binary_data_output",
        "classification",
        "shared_memory_region",
        "shared_memory_offset",
        "shared_memory_byte_size",
    }
)
#: Range of an integer request parameter (int64_param): larger values are refused
#: before a request is built.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Parameter-name prefixes Triton keeps for itself.
RESERVED_PREFIXES = ("triton_", "sequence_")


def check_stream_options(options: Mapping[str, Any], allowed: Iterable[str] = ()) -> None:
    """Refuse (ValueError naming the key) any option that is not a per-stream option
    (``STREAM_OPTION_KEYS``, or one of ``allowed``): reserved request fields first, so
    the message says why."""
    extra = set(allowed)
    for key in options:
        if not isinstance(key, str):
            raise ValueError(f"option names must be strings, got {type(key).__name__}")
        if key in RESERVED_PARAMETERS or key.startswith(RESERVED_PREFIXES):
            raise ValueError(
                f"{key[:64]!r} is a reserved request field, not a stream option; "
                f"stream options: {sorted(STREAM_OPTION_KEYS)}"
            )
        if key not in STREAM_OPTION_KEYS and key not in extra:
            raise ValueError(
                f"{key[:64]!r} is not a stream option; stream options: {sorted(STREAM_OPTION_KEYS)}"
            )


# -- how fast one stream may send ------------------------------------------------------
#: A stream's audio may run at most this many seconds ahead of real time (wall time since
#: its START was served).  Beyond it the server closes the stream (an error naming the
#: limit): one stream may not take more than a real-time stream's share of the server
#: for long, which admission control counts on.  Whole recordings go to OFFLINE_MODEL.
#: The feature step's config parameter MAX_LEAD_PARAMETER overrides it (0: no limit);
#: AsrConnection reads that parameter and paces its sessions to stay within it.
DEFAULT_MAX_LEAD_SECONDS = 120.0
MAX_LEAD_PARAMETER = "max_lead_seconds"
#: Every such closure's message contains this.
LEAD_MARKER = "ahead of real time"
#: Requests one stream may have unanswered at once: AsrConnection's sessions wait to
#: send beyond it (backpressure), and the SageMaker gateway stops reading a session's
#: WebSocket (STREAMASR_GATEWAY_MAX_PENDING overrides it there).
MAX_PENDING_REQUESTS = 50

# -- the SageMaker container's routes and headers --------------------------------------
INVOCATIONS_PATH = "/invocations"
#: SageMaker's bidirectional-stream route (a WebSocket to the container).
WS_PATH = "/invocations-bidirectional-stream"
SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
#: The session id a client sends to open a stateful session.
NEW_SESSION = "NEW_SESSION"
#: Text control messages on the WebSocket route (``{"type": ...}``).
CONTROL_MESSAGES = ("Finalize", "KeepAlive", "CloseStream")

#: A START refused by admission control (the server holds its limit of streams): the
#: error message starts with this; retry later.  Triton status UNAVAILABLE; the gateway
#: sends an Error with code BUSY_CODE, then WebSocket close 1013 (HTTP: 503).
CAPACITY_MARKER = "server at capacity"
BUSY_CODE = "busy"
#: WebSocket close code "Try Again Later" (RFC 6455 registry) for a refused START.
WS_TRY_AGAIN_LATER = 1013
#: Seconds a refused HTTP client is asked to wait (Retry-After).
RETRY_AFTER_S = 1


def is_capacity_refusal(message: str | None) -> bool:
    """True when a server error message is an admission refusal (retry later)."""
    return message is not None and CAPACITY_MARKER in message


# -- audio -------------------------------------------------------------------------------
#: 16-bit PCM sample ``s`` is the float ``s / PCM16_FULL_SCALE`` in [-1, 1).
PCM16_FULL_SCALE = 32768.0


def pcm16_to_float(samples: Any, dtype: str = "float32") -> Any:
    """A numpy int16 array as floats in [-1, 1) (``dtype``: float32 or float64)."""
    return samples.astype(dtype) / PCM16_FULL_SCALE


# -- result messages ---------------------------------------------------------------------
Message = Mapping[str, Any]
M = TypeVar("M", bound=Message)


def is_results(message: Message) -> bool:
    return message.get("type") == "Results"


def is_final(message: Message) -> bool:
    return is_results(message) and bool(message.get("is_final"))


def alternative(message: Message) -> dict[str, Any]:
    """The best (and only) alternative of a Results message."""
    return message["channel"]["alternatives"][0]


def transcript(message: Message) -> str:
    return alternative(message)["transcript"]


def words(message: Message) -> list[dict[str, Any]]:
    return alternative(message)["words"]


def finals(messages: Iterable[M]) -> list[M]:
    return [m for m in messages if is_final(m)]


def final_text(messages: Iterable[Message]) -> str:
    """The finals' transcripts joined by spaces (empty finals skipped)."""
    return " ".join(t for t in (transcript(m) for m in finals(messages)) if t)
