"""Typed decoder and endpoint settings, parsed from Triton parameters or stream options.

Triton's ``config.pbtxt`` parameters and per-stream options arrive as strings ("2.4",
"true", "beam"); JSON clients may send typed values.  ``from_parameters`` accepts both,
rejects unknown keys and raises ``ValueError`` whose message starts with the bad key.

The two dataclasses have disjoint field names, so one flat dict of stream options can be
split between them by field name (the Triton adapter does exactly that).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from streamasr.core.params import (
    parse_bool,
    parse_choice,
    parse_float,
    parse_int,
    parse_ms_or_bool,
)

# -- decoding defaults -----------------------------------------------------------------
DECODING_METHODS = ("greedy", "beam")
DEFAULT_DECODING = "greedy"
#: Prefixes kept after every frame by the prefix beam search.
DEFAULT_BEAM_SIZE = 8
#: Non-blank tokens per frame the beam search considers (the frame's k most likely).
DEFAULT_BEAM_TOP_K = 8
#: ... of which only those with a log-probability of at least this (e^-8 = 3.4e-4) in
#: the frame; the frame's most likely one always.  Chosen by measurement (issue 14): on
#: the served beam 16 + LM, decoder CPU 11.1-11.5 -> 6.4-7.4 ms per audio second, WER
#: unchanged on assets/eval, JFK and Asterisk dev, +0.16 / -0.06 points on Asterisk
#: test / synthetic held-out (1 word each way); -5 halves the cost again but costs 0.5-1.1
#: WER points.  -1000 turns it off.
DEFAULT_BEAM_MIN_TOKEN_LOGP = -8.0
#: Log-domain bonus per matched hotword token when a hotword is given without a boost
#: (the per-token convention of sherpa-onnx's ``hotwords_score``).
DEFAULT_HOTWORD_BOOST = 1.5
# LM weights: chosen for the bundled model + the CMU LM (`make lm`) on the Asterisk dev
# prompts, never on a test set (`python -m training.eval_decoding --tune`).
#: Shallow-fusion weight of the word n-gram LM (natural-log LM score times alpha).
DEFAULT_LM_ALPHA = 0.8
#: Bonus per word scored by the LM (counteracts the LM's preference for short outputs).
DEFAULT_LM_BETA = 0.5
#: Charge an open word the LM look-ahead of its letters (see ``decoding.lm``).
DEFAULT_LM_PARTIAL_WORDS = True
#: log10 spelling cost per letter of a word the LM does not know, on top of P(<unk>):
#: makes one glued-together "word" cost more than the real words it swallows.
DEFAULT_LM_OOV_LETTER_LOG10 = -1.0
#: Where interims come from: "ctc" (the streaming model, every request) or "whisper"
#: (the open utterance re-decoded by Whisper, ``streaming_asr_two_pass`` only).
INTERIM_SOURCES = ("ctc", "whisper")
DEFAULT_INTERIMS = "ctc"
#: Whisper interims: audio seconds between re-decodes of the open utterance (chosen by
#: measurement: docs/accuracy.md).
DEFAULT_INTERIM_REFRESH_S = 2.0

# -- endpoint defaults (a voice-activity detector, and sherpa-onnx's three rules) -----------
#: Voice-activity endpointing (Deepgram's ``endpointing``): milliseconds of silence after
#: speech, as heard by the VAD (streamasr/core/vad.py), that end an utterance;
#: ``endpointing=true`` means this value, ``false`` (0) turns every endpoint rule off.
#: Chosen by measurement (docs/configuration.md#endpointing, benchmarks/results/finals/):
#: the shortest silence that does not split sentences -- finals per multi-word Asterisk
#: test prompt (53) 150 ms 1.40, 200 ms 1.13, 300 ms 1.00, 500 ms 0.98 = before (rule 2
#: alone) -- while the final follows the last word by ~0.38 s of audio.
DEFAULT_ENDPOINTING_MS = 300
#: Rule 1: this much trailing silence with nothing decoded ends the utterance silently.
DEFAULT_RULE1_MIN_TRAILING_SILENCE = 2.4
#: Rule 2: this much trailing silence after some text ends the utterance (speech_final).
DEFAULT_RULE2_MIN_TRAILING_SILENCE = 1.2
#: Rule 3: an utterance this long is finalized whatever its silence.
DEFAULT_RULE3_MIN_UTTERANCE_LENGTH = 20.0
#: Silence after the last word of a finalized utterance before an UtteranceEnd message
#: (Deepgram's ``utterance_end_ms``, 1000 ms being its minimum).
DEFAULT_UTTERANCE_END = 1.0

#: Keys that name files on the server: set them in config.pbtxt; an adapter should refuse
#: them as per-stream options from clients (a client must not make the server open paths).
SERVER_ONLY_PARAMETERS = frozenset({"lm_path"})

#: Accepted range (inclusive) of each numeric option, wherever it is set: values outside
#: it are refused by name (1e308 as a weight or an offset is no setting, it is an attack
#: on the arithmetic).  Stream options have tighter per-stream caps on top
#: (``triton_models.step_info.STREAM_OPTION_LIMITS``).
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "beam_size": (1, 1024),
    "beam_top_k": (1, 1024),
    "beam_min_token_logp": (-1000.0, 0.0),
    "hotword_boost": (0.0, 100.0),  # also each hotword's own boost
    "lm_alpha": (0.0, 10.0),
    "lm_beta": (-20.0, 20.0),
    "lm_oov_letter_log10": (-20.0, 0.0),
    "time_offset": (0.0, 366 * 86400.0),  # a year of seconds
    "interim_refresh_s": (0.2, 30.0),  # each refresh costs a Whisper decode
    "rule1_min_trailing_silence": (0.0, 3600.0),
    "rule2_min_trailing_silence": (0.0, 3600.0),
    "rule3_min_utterance_length": (0.0, 3600.0),
    "utterance_end": (0.0, 3600.0),
    "endpointing": (0, 3_600_000),
}


def check_ranges(values: Mapping[str, Any]) -> None:
    """Refuse parsed option values outside ``OPTION_RANGES``."""
    checks = [(k, v) for k, v in values.items() if k in OPTION_RANGES]
    checks += [("hotword_boost", boost) for _, boost in values.get("hotwords", ())]
    for key, value in checks:
        lo, hi = OPTION_RANGES[key]
        if not lo <= value <= hi:
            raise ValueError(f"{key}: must be between {lo:g} and {hi:g}, got {value:g}")


def parse_hotwords(key: str, raw: Any, default_boost: float) -> tuple[tuple[str, float], ...]:
    """Hotwords as ``(phrase, boost)`` pairs.

    Accepted forms: a sequence of phrases or ``(phrase, boost)`` pairs; a JSON string of
    the same (``'[["tensor rt", 2.0], "triton"]'``); or ``"phrase:boost,phrase"`` text.
    A phrase without a boost gets ``default_boost``.
    """
    if raw is None or raw == "":
        return ()
    items: Any = raw
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{key}: not valid JSON ({exc.msg})") from None
        else:
            items = []
            for part in text.split(","):
                if not part.strip():
                    continue
                phrase, sep, given = part.rpartition(":")
                items.append((phrase, given) if sep else part)
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{key}: must be a list of phrases or (phrase, boost) pairs, got {raw!r}")
    out = []
    for item in items:
        if isinstance(item, str):
            phrase, boost = item, default_boost
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            phrase, boost = item[0], parse_float(key, item[1])
        else:
            raise ValueError(
                f"{key}: each entry must be a phrase or a (phrase, boost) pair, got {item!r}"
            )
        phrase = " ".join(phrase.split())
        if not phrase:
            raise ValueError(f"{key}: empty hotword phrase in {raw!r}")
        out.append((phrase, float(boost)))
    return tuple(out)


def _check_unknown(cls, params: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(
            f"{unknown[0]}: unknown {cls.__name__} parameter "
            f"(unknown: {unknown}; known: {sorted(known)})"
        )


def _parsed_over_defaults(cls, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (known keys only) over ``cls``'s defaults, parsed by ``cls._parsed``."""
    _check_unknown(cls, params)
    return cls._parsed({**dataclasses.asdict(cls()), **params})


@dataclass(frozen=True)
class DecoderConfig:
    """How log-probabilities become tokens.

    decoding          "greedy" (best path, the default) or "beam" (CTC prefix beam search)
    beam_size         prefixes kept per frame (beam only)
    beam_top_k        non-blank candidate tokens per frame (beam only)
    beam_min_token_logp  of those, only tokens at least this likely (natural log; the
                      frame's best is always tried; beam only)
    hotwords          ((phrase, boost), ...): per-token log-domain bonus while a hotword's
                      tokens are being matched, kept only if the phrase completes (beam only)
    hotword_boost     boost of hotwords given without one
    lm_path           word n-gram LM (ARPA or KenLM binary) for shallow fusion (beam only;
                      needs the ``kenlm`` module); "" = none
    lm_alpha, lm_beta LM weight and per-word bonus
    lm_partial_words  charge unfinished words the LM look-ahead of their letters (ARPA LMs)
    lm_oov_letter_log10  log10 cost per letter of a word the LM does not know (<= 0)
    time_offset       seconds added to every time in the messages
    interims          "ctc" (every request) or "whisper" (re-decoded open utterance,
                      stable words marked; ``streaming_asr_two_pass`` only)
    interim_refresh_s audio seconds between Whisper re-decodes of the open utterance
    """

    decoding: str = DEFAULT_DECODING
    beam_size: int = DEFAULT_BEAM_SIZE
    beam_top_k: int = DEFAULT_BEAM_TOP_K
    beam_min_token_logp: float = DEFAULT_BEAM_MIN_TOKEN_LOGP
    hotwords: tuple[tuple[str, float], ...] = ()
    hotword_boost: float = DEFAULT_HOTWORD_BOOST
    lm_path: str = ""
    lm_alpha: float = DEFAULT_LM_ALPHA
    lm_beta: float = DEFAULT_LM_BETA
    lm_partial_words: bool = DEFAULT_LM_PARTIAL_WORDS
    lm_oov_letter_log10: float = DEFAULT_LM_OOV_LETTER_LOG10
    time_offset: float = 0.0
    interims: str = DEFAULT_INTERIMS
    interim_refresh_s: float = DEFAULT_INTERIM_REFRESH_S

    def __post_init__(self) -> None:
        # Normalise and validate values given directly to the constructor, too.
        norm = self._parsed(dataclasses.asdict(self))
        for k, v in norm.items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _parsed(p: Mapping[str, Any]) -> dict[str, Any]:
        boost = parse_float("hotword_boost", p.get("hotword_boost", DEFAULT_HOTWORD_BOOST))
        out = {
            "decoding": parse_choice("decoding", p["decoding"], DECODING_METHODS),
            "beam_size": parse_int("beam_size", p["beam_size"]),
            "beam_top_k": parse_int("beam_top_k", p["beam_top_k"]),
            # <= 0 (a log-probability) is enforced with every other range by check_ranges
            "beam_min_token_logp": parse_float(
                "beam_min_token_logp", p["beam_min_token_logp"], minimum=-math.inf
            ),
            "hotwords": parse_hotwords("hotwords", p["hotwords"], boost),
            "hotword_boost": boost,
            "lm_path": str(p["lm_path"] or "").strip(),
            "lm_alpha": parse_float("lm_alpha", p["lm_alpha"]),
            "lm_beta": parse_float("lm_beta", p["lm_beta"], minimum=-math.inf),
            "lm_partial_words": parse_bool("lm_partial_words", p["lm_partial_words"]),
            # <= 0 (a cost) is enforced with every other range by check_ranges
            "lm_oov_letter_log10": parse_float(
                "lm_oov_letter_log10", p["lm_oov_letter_log10"], minimum=-math.inf
            ),
            "time_offset": parse_float("time_offset", p["time_offset"]),
            "interims": parse_choice("interims", p["interims"], INTERIM_SOURCES),
            "interim_refresh_s": parse_float("interim_refresh_s", p["interim_refresh_s"]),
        }
        check_ranges(out)
        if out["lm_path"]:
            from streamasr.core.decoding.lm import (
                check_lm_path,  # kenlm is optional: imported only when asked for
            )

            check_lm_path("lm_path", str(out["lm_path"]))
        return out

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "DecoderConfig":
        """Parse Triton parameters / stream options (strings or typed values)."""
        return cls(**_parsed_over_defaults(cls, params))


@dataclass(frozen=True)
class EndpointConfig:
    """When an utterance ends (sherpa-onnx's rules; any rule set to 0 is disabled).

    endpointing                  ms of silence after speech (voice-activity detector)
                                 that end an utterance (speech_final=true); true = the
                                 default ms; false / 0: no endpoint rule at all,
                                 utterances end only at finalize()/close()
    rule1_min_trailing_silence   s of silence with nothing decoded -> reset, no final
                                 (an empty final if ``empty_finals``)
    rule2_min_trailing_silence   s of silence after text -> final, speech_final=true
    rule3_min_utterance_length   s of utterance -> final, speech_final=false
    empty_finals                 rule 1 emits an empty final instead of resetting silently
    utterance_end                s of silence after a finalized utterance's last word
                                 before an UtteranceEnd message; 0 = never
    """

    endpointing: int = DEFAULT_ENDPOINTING_MS
    rule1_min_trailing_silence: float = DEFAULT_RULE1_MIN_TRAILING_SILENCE
    rule2_min_trailing_silence: float = DEFAULT_RULE2_MIN_TRAILING_SILENCE
    rule3_min_utterance_length: float = DEFAULT_RULE3_MIN_UTTERANCE_LENGTH
    empty_finals: bool = False
    utterance_end: float = DEFAULT_UTTERANCE_END

    def __post_init__(self) -> None:
        for k, v in self._parsed(dataclasses.asdict(self)).items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _parsed(p: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(EndpointConfig):
            if f.name == "endpointing":
                out[f.name] = parse_ms_or_bool(f.name, p[f.name], DEFAULT_ENDPOINTING_MS)
            elif f.type in ("bool", bool):
                out[f.name] = parse_bool(f.name, p[f.name])
            else:
                out[f.name] = parse_float(f.name, p[f.name])
        check_ranges(out)
        return out

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any]) -> "EndpointConfig":
        """Parse Triton parameters / stream options (strings or typed values)."""
        return cls(**_parsed_over_defaults(cls, params))


__all__ = ["DecoderConfig", "EndpointConfig", "DECODING_METHODS", "SERVER_ONLY_PARAMETERS"]
