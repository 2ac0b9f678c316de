"""Typed reads of parameters that arrive as text (config.pbtxt values, request
parameters, query strings, environment variables) or as JSON values: one set of readers
for every layer, each raising ``ValueError`` whose message starts with the key."""

from __future__ import annotations

import math
from typing import Any

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def parse_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{key}: must be true or false, got {raw!r}")


def parse_float(key: str, raw: Any, minimum: float = 0.0) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"{key}: must be a number, got {raw!r}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{key}: must be finite, got {raw!r}")
    if value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def parse_int(key: str, raw: Any, minimum: int = 1) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"{key}: must be an integer, got {raw!r}")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"{key}: must be an integer, got {raw!r}")
        raw = int(raw)
    try:
        value = int(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def parse_ms_or_bool(key: str, raw: Any, when_true: int) -> int:
    """Milliseconds (an integer >= 0), or a boolean word: true -> ``when_true``, false ->
    0 (Deepgram's ``endpointing=false`` / ``endpointing=300``).  Digits are always
    milliseconds, so "1" is one millisecond, not true."""
    if isinstance(raw, bool):
        return when_true if raw else 0
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text in TRUE_WORDS - {"1", "0"}:
            return when_true
        if text in FALSE_WORDS - {"1", "0"}:
            return 0
    try:
        return parse_int(key, raw, minimum=0)
    except ValueError:
        raise ValueError(
            f"{key}: must be milliseconds (an integer >= 0) or true/false, got {raw!r}"
        ) from None


def parse_choice(key: str, raw: Any, choices: tuple[str, ...]) -> str:
    text = str(raw).strip().lower()
    if text not in choices:
        raise ValueError(f"{key}: must be one of {list(choices)}, got {raw!r}")
    return text
