"""STEP_INFO: what the feature step tells the decoder step about each request, in one
place: the message (``StepInfo``), its strict parser, and the per-stream option limits
both steps enforce (the decoder model can be called directly, so its STEP_INFO is client
input like any other).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from streamasr.core.state import StreamError

# Upper bounds on per-stream options a client may set (config.pbtxt is not limited): each
# bounds the CPU or memory one stream can take.  rule3 (the longest utterance before a
# forced final) also bounds the decoder's per-utterance state.
STREAM_OPTION_LIMITS = {
    "beam_size": 64,
    "beam_top_k": 64,
    "rule3_min_utterance_length": 600.0,
    "utterance_end": 600.0,
    "rule1_min_trailing_silence": 600.0,
    "rule2_min_trailing_silence": 600.0,
    "endpointing": 600_000,  # ms
}


MAX_HOTWORDS_CHARS = 4096


# Stream ids are Triton sequence ids: non-zero unsigned 64-bit (0 means "no sequence").
MAX_STREAM_ID = 2**64 - 1


@dataclass
class StepInfo:
    """Feature step -> decoder step, one per request (JSON in the STEP_INFO tensor).

    ``stream``/``start``/``end`` identify the request's stream and its place in it: the
    decoder is not a Triton sequence model, because Triton's ensemble does not keep a
    stream's requests in order between steps (measured: with two requests in flight an
    END could overtake the request before it, and a sequence batcher then rejects the
    late one).  ``windows`` real windows in this request's FEATURES (0: the acoustic model ran on one
    placeholder window because a batch of zero cannot be sent to it), ``valid_outputs``
    real output frames per window, ``seq`` the request's index in its stream (the decoder
    uses it to restore order), ``options`` per-stream decoder options (START only),
    ``endpoints`` the stream output frames at which the voice-activity detector ended an
    utterance (the windows up to each were flushed without waiting for right context).
    """

    stream: int
    seq: int
    start: bool = False
    end: bool = False
    windows: int = 0
    valid_outputs: list[int] = field(default_factory=list)
    finalize: bool = False
    keepalive: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    endpoints: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "StepInfo":
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls(**json.loads(text))


def check_option_limits(options: dict[str, Any]) -> None:
    """Refuse per-stream options above ``STREAM_OPTION_LIMITS``.  Values that are not
    numbers are left to the decoder's own validation, which refuses them."""
    for key, limit in STREAM_OPTION_LIMITS.items():
        if key not in options or isinstance(options[key], bool):
            continue
        try:
            value = float(options[key])
        except (TypeError, ValueError, OverflowError):
            continue
        if value > limit:
            raise StreamError(
                f"stream option {key!r} may be at most {limit:g} per stream, got {options[key]!r}"
            )
    hw = options.get("hotwords")
    if hw is not None and len(str(hw)) > MAX_HOTWORDS_CHARS:
        raise StreamError(
            f"stream option 'hotwords' may hold at most {MAX_HOTWORDS_CHARS} characters"
        )


_STEP_INFO_TYPES = {
    "stream": int,
    "seq": int,
    "start": bool,
    "end": bool,
    "windows": int,
    "valid_outputs": list,
    "finalize": bool,
    "keepalive": bool,
    "options": dict,
    "endpoints": list,
}


def parse_step_info(raw: Any) -> StepInfo:
    """A STEP_INFO element as the decoder step receives it, checked strictly: the decoder
    model can be called directly, so its STEP_INFO is client input like any other."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        d = json.loads(text)
    except (TypeError, ValueError):
        raise StreamError("STEP_INFO is not UTF-8 JSON") from None
    if not isinstance(d, dict):
        raise StreamError("STEP_INFO must be a JSON object")
    unknown = sorted(set(d) - set(_STEP_INFO_TYPES))
    missing = sorted({"stream", "seq"} - set(d))
    if unknown or missing:
        raise StreamError(f"STEP_INFO has unknown keys {unknown} / lacks {missing}")
    for k, v in d.items():
        want = _STEP_INFO_TYPES[k]
        # bool is an int subclass: keep them apart both ways
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise StreamError(f"STEP_INFO field {k!r} must be {want.__name__}")
    vo = d.get("valid_outputs", [])
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in vo):
        raise StreamError("STEP_INFO valid_outputs must be non-negative integers")
    ends = d.get("endpoints", [])
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ends):
        raise StreamError("STEP_INFO endpoints must be non-negative integers")
    if d["seq"] < 0 or d.get("windows", 0) < 0 or len(vo) != d.get("windows", 0):
        raise StreamError("STEP_INFO seq/windows/valid_outputs are inconsistent")
    if (d["seq"] == 0) != d.get("start", False):
        raise StreamError("STEP_INFO: a stream's first request (seq 0) and only it is START")
    if not 0 < d["stream"] < 2**64:
        raise StreamError("STEP_INFO stream must be a non-zero 64-bit id")
    check_option_limits(d.get("options", {}))
    return StepInfo(**d)
