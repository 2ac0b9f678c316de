"""Options from clients, as the gateway takes them: a closed set, checked before anything
reaches Triton.

Options enter the gateway through WebSocket query strings and ``Configure`` messages,
``/invocations`` query strings and ``X-Amzn-SageMaker-Custom-Attributes``.  Everywhere:

* a key is one of the per-stream decoder/endpoint options (``protocol.STREAM_OPTION_KEYS``)
  or one the route itself reads (``encoding``, ``finalize``...); a reserved request
  field (``sequence_id``, ``sequence_end``, ``priority``...) is refused by name;
* a value is a string, a number or a boolean (hotwords also a JSON list), parsed and
  range-checked here exactly as the decoder will (``validate_stream_options``,
  ``check_option_limits``): a bad value is a clear error to that client alone, never a
  traceback or a request Triton would refuse halfway.

Errors are ``OptionError`` (a ValueError) whose message names the key: for the client,
never for the log (option values are customers' words).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from streamasr import protocol
from streamasr.core.state import StreamError
from streamasr.pipeline.ctc_decoder import validate_stream_options
from streamasr.pipeline.step_info import check_option_limits

#: Longest option value accepted (characters, as text): hotwords have their own, lower
#: limit (step_info.MAX_HOTWORDS_CHARS); nothing else needs more than a number's digits.
MAX_OPTION_VALUE_CHARS = 8192
#: Most options one request may name.
MAX_OPTIONS = 64


class OptionError(ValueError):
    """A client option the gateway refuses; the message names the key."""


def _value(key: str, raw: Any) -> Any:
    """One option value as it will go on the START request (str, bool, int, float)."""
    if isinstance(raw, bool | str):
        value: Any = raw
    elif isinstance(raw, int):
        if not protocol.INT64_MIN <= raw <= protocol.INT64_MAX:
            raise OptionError(f"{key}: {raw} is outside the 64-bit integer range")
        value = raw
    elif isinstance(raw, float):
        value = raw
    elif isinstance(raw, list) and key == "hotwords":
        value = json.dumps(raw)  # the decoder parses JSON lists of phrases / pairs
    else:
        raise OptionError(f"{key}: must be a string, number or boolean")
    if isinstance(value, str) and len(value) > MAX_OPTION_VALUE_CHARS:
        raise OptionError(f"{key}: value longer than {MAX_OPTION_VALUE_CHARS} characters")
    return value


def client_options(
    raw: Mapping[str, Any], route_keys: Iterable[str] = (), *, validate: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``raw`` into (stream options, the route's own keys), refusing everything
    else (OptionError).  ``validate``: parse and range-check the stream options as the
    decoder will (off only where the caller validates the merged set itself)."""
    if len(raw) > MAX_OPTIONS:
        raise OptionError(f"{len(raw)} options; at most {MAX_OPTIONS}")
    route = frozenset(route_keys)
    try:
        protocol.check_stream_options(raw, allowed=route)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    options = {k: _value(k, v) for k, v in raw.items() if k not in route}
    own = {k: v for k, v in raw.items() if k in route}
    if validate:
        check_values(options)
    return options, own


def check_values(options: Mapping[str, Any]) -> None:
    """Parse and range-check stream options as the feature step does at START."""
    try:
        check_option_limits(dict(options))
        validate_stream_options(dict(options))
    except (ValueError, StreamError) as exc:
        raise OptionError(str(exc)) from None


# -- what clients see of server messages ------------------------------------------------
HIDDEN_ID = "<this stream>"


def hide_sequence_id(text: str, sequence_id: int) -> str:
    """A server message as a client may see it: without the Triton sequence id (ids are
    the gateway's business; knowing one would be a first step into another stream)."""
    return text.replace(str(sequence_id), HIDDEN_ID)


def client_message(m: dict, sequence_id: int) -> dict:
    """A result message as a client may see it (Error texts without the sequence id)."""
    if m.get("type") == "Error" and isinstance(m.get("message"), str):
        return dict(m, message=hide_sequence_id(m["message"], sequence_id))
    return m
