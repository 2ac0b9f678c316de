"""The model repository as one typed spec: every ``model_repository/*/config.pbtxt`` is
rendered from the models declared here.  Tensors are declared once and shared by the models
and ensembles that use them, shared values are named constants written once, the two
ensembles are built from one list of steps (their inputs and outputs derived from the
steps' wiring), and ``check`` cross-checks the bounds between models before anything is
written.

    python -m streamasr.triton.spec --write model_repository   # make repository
    python -m streamasr.triton.spec --check model_repository   # exit 1 naming each file that differs

Only the ``config.pbtxt`` files are generated; the model files (``1/``) are not.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from streamasr.cli import argument_parser
from streamasr.core import admission
from streamasr.core.params import parse_int
from streamasr.pipeline import final_pass
from streamasr.pipeline.common import ModelConfig, stream_idle_timeout

log = logging.getLogger("streamasr.triton.spec")

DataType = Literal["TYPE_FP32", "TYPE_INT16", "TYPE_INT32", "TYPE_UINT64", "TYPE_STRING"]
InstanceKind = Literal["KIND_CPU", "KIND_GPU"]

#: Line width of the rendered files: a sub-message that fits goes on one line.
WIDTH = 92
HEADER = (
    "# GENERATED from streamasr/triton/spec.py: edit the spec, not this file, then run\n"
    "# `make repository` (python -m streamasr.triton.spec --write model_repository);\n"
    "# tests/unit/test_repository.py checks that the two agree.\n"
)


class SpecError(ValueError):
    """The spec (or a repository checked against the spec's rules) breaks a cross-check."""


# -- the vocabulary ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: DataType
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False

    def add_to(self, target: Any) -> None:
        """Append to a repeated ModelInput/ModelOutput field (an output has no
        ``optional`` or ``allow_ragged_batch``: setting one there raises)."""
        t = target.add(name=self.name, data_type=model_config_pb2.DataType.Value(self.data_type))
        t.dims.extend(self.dims)
        if self.optional:
            t.optional = True
        if self.allow_ragged_batch:
            t.allow_ragged_batch = True


@dataclass(frozen=True)
class Parameter:
    key: str
    value: str | int
    note: str = ""


@dataclass(frozen=True)
class Instances:
    count: int
    kind: InstanceKind = "KIND_CPU"


@dataclass(frozen=True)
class SequenceBatching:
    """A stateful step's Triton sequence batcher: the stream protocol's controls (START and
    END as INT32 0/1 flags, CORRID a UINT64 sequence id) and the oldest-first strategy."""

    idle_us: int
    max_candidate_sequences: int


@dataclass(frozen=True)
class Model:
    """A model served by a backend.  ``notes`` are comments rendered above a field
    (keys: ``model`` for the model as a whole, else a top-level field name)."""

    name: str
    backend: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 0
    instances: Instances = Instances(1)
    parameters: tuple[Parameter, ...] = ()
    dynamic_batching_delay_us: int | None = None  # None: no dynamic batcher
    sequence_batching: SequenceBatching | None = None
    decoupled: bool = False
    notes: Mapping[str, str] = field(default_factory=dict)

    def with_parameters(self, **values: str | int) -> Model:
        """A copy with these parameters' values changed (each must exist)."""
        unknown = set(values) - {p.key for p in self.parameters}
        if unknown:
            raise SpecError(f"{self.name} has no parameter {', '.join(sorted(unknown))}")
        return replace(
            self,
            parameters=tuple(
                replace(p, value=values[p.key]) if p.key in values else p for p in self.parameters
            ),
        )


@dataclass(frozen=True)
class Step:
    """One ensemble step: ``model``'s tensors -> the ensemble's tensor names."""

    model: Model
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


@dataclass(frozen=True)
class Ensemble:
    """An ensemble: its inputs are the tensors its steps consume that no earlier step
    produces, its outputs those a step produces that no later step consumes (each declared
    as the step's model declares it)."""

    name: str
    steps: tuple[Step, ...]
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        produced: set[str] = set()
        found: dict[str, Tensor] = {}
        for step in self.steps:
            declared = {t.name: t for t in step.model.inputs}
            for own, outer in step.inputs.items():
                if outer not in produced and outer not in found and own in declared:
                    found[outer] = replace(declared[own], name=outer)
            produced |= set(step.outputs.values())
        return tuple(found.values())

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        found: list[Tensor] = []
        for i, step in enumerate(self.steps):
            declared = {t.name: t for t in step.model.outputs}
            later = {outer for s in self.steps[i + 1 :] for outer in s.inputs.values()}
            for own, outer in step.outputs.items():
                if outer not in later and own in declared:
                    found.append(replace(declared[own], name=outer))
        return tuple(found)


# -- the tensors, declared once ----------------------------------------------------------

# A stream's audio: float32 samples or (half the bytes on the wire) int16 PCM, at the
# contract's sample rate unless SAMPLE_RATE says otherwise (then resampled).
AUDIO = Tensor("AUDIO", "TYPE_FP32", (-1,), optional=True)
AUDIO_INT16 = Tensor("AUDIO_INT16", "TYPE_INT16", (-1,), optional=True)
SAMPLE_RATE = Tensor("SAMPLE_RATE", "TYPE_INT32", (1,), optional=True)
STREAM_AUDIO = (AUDIO, AUDIO_INT16, SAMPLE_RATE)
# The model windows a request completed [N, left+chunk+right, n_mels].
FEATURES = Tensor("FEATURES", "TYPE_FP32", (-1, -1, -1))
# A request's stream id, index and flags (streamasr.pipeline.step_info), feature -> decoder.
STEP_INFO = Tensor("STEP_INFO", "TYPE_STRING", (1,))
LOG_PROBS = Tensor("LOG_PROBS", "TYPE_FP32", (-1, -1, -1))
# JSON result messages, one string each (the protocol: streamasr.protocol).
RESULTS = Tensor("RESULTS", "TYPE_STRING", (-1,))
# Each final's utterance (features + log-probs) for final_pass to re-decode.
UTTERANCES = Tensor("UTTERANCES", "TYPE_STRING", (-1,))

# The committed acoustic model's contract (tests/unit/test_repository.py checks these against
# the ONNX metadata): [left+chunk+right frames, n_mels] -> [chunk/subsampling, vocabulary].
ACOUSTIC_FEATURES = Tensor("features", "TYPE_FP32", (150, 80))
ACOUSTIC_LOG_PROBS = Tensor("log_probs", "TYPE_FP32", (20, 29))


# -- the shared values, written once -----------------------------------------------------

# Windows per acoustic-model call.  Bounds MAX_WINDOWS_PER_REQUEST and OFFLINE_MAX_BATCH
# (``check_acoustic_batches``): Triton rejects a larger batch.
ACOUSTIC_MAX_BATCH_SIZE = 32
# Windows one streaming request may yield (bounds MAX_CHUNK_SECONDS): its own fact (how
# much one request may carry), equal to the acoustic batch bound today.
MAX_WINDOWS_PER_REQUEST = 32
# Windows per acoustic-model call of offline_asr: its own fact (how a recording is cut
# into calls), equal to the acoustic batch bound today.
OFFLINE_MAX_BATCH = 32
# Our per-stream state TTL, one value for every stateful step: shorter than Triton's
# sequence idle time (a late request still reaches our step and is told "expired"), and
# no later step of a stream forgets it before the step that admits it
# (``check_stream_ttls``).
STREAM_IDLE_TIMEOUT_S = 30
# Triton forgets an idle sequence after this, without telling the model (60 s).
SEQUENCE_IDLE_US = 60_000_000
# Open streams one step's store holds at most (memory bound; a START beyond it is refused).
MAX_STREAMS = 4096
# Sequences Triton's batcher holds; a START beyond it waits in Triton's backlog
# (docs/reliability.md): raised along with MAX_STREAMS.
MAX_CANDIDATE_SEQUENCES = MAX_STREAMS
# One thread per ONNX Runtime session: the models share 2 cores with the Python steps.
ONE_THREAD = 1


# -- the models --------------------------------------------------------------------------

ACOUSTIC_MODEL = Model(
    name="acoustic_model",
    backend="onnxruntime",
    inputs=(ACOUSTIC_FEATURES,),
    outputs=(ACOUSTIC_LOG_PROBS,),
    max_batch_size=ACOUSTIC_MAX_BATCH_SIZE,
    dynamic_batching_delay_us=2000,
    instances=Instances(2),
    parameters=(Parameter("intra_op_thread_count", ONE_THREAD),),
    notes={
        "model": "The acoustic model (ONNX). In the SageMaker image Triton's native "
        "onnxruntime backend serves this on the GPU; locally streamasr/triton/python_backends/onnxruntime stands in "
        "for it on the CPU. dims must match the model's contract (tests/unit/test_repository.py "
        "checks them).",
        "max_batch_size": "Bounds feature_extractor max_windows_per_request and offline_asr "
        "max_batch (equal today, each its own fact; checked by the spec and by "
        "streamasr.triton.repository.check_limits before the server starts).",
        "instance_group": "Two CPU instances, one thread each: both cores run the model "
        "while the Python steps (the beam+LM decoder takes ~26 % of the CPU at the "
        "throughput limit) take their turns. Measured on the 2-core VM "
        '(benchmarks/results/capacity/, README "Capacity"): 16 paced streams held vs 8-12 '
        "with one instance x one thread (README runs 0501/0446); Triton's default "
        "(2 instances x all cores) oversubscribes the cores. The SageMaker image's overlay "
        "(streamasr/triton/repository.py) turns this into a GPU instance group.",
    },
)

#: Every model that locates the acoustic model (its ONNX file: the contract) names it so.
NAMES_ACOUSTIC_MODEL = Parameter("acoustic_model", ACOUSTIC_MODEL.name)

FEATURE_EXTRACTOR = Model(
    name="feature_extractor",
    backend="streamasr_feature_extractor",
    inputs=STREAM_AUDIO,
    outputs=(FEATURES, STEP_INFO),
    sequence_batching=SequenceBatching(SEQUENCE_IDLE_US, MAX_CANDIDATE_SEQUENCES),
    parameters=(
        NAMES_ACOUSTIC_MODEL,
        Parameter("stream_idle_timeout_s", STREAM_IDLE_TIMEOUT_S),
        Parameter(
            "max_chunk_seconds",
            10,
            "Longest audio accepted in one request (a larger one is rejected with an error).",
        ),
        Parameter(
            "max_windows_per_request",
            MAX_WINDOWS_PER_REQUEST,
            "Windows one request may yield (bounds max_chunk_seconds): the request's "
            "windows are one acoustic_model batch, so at most its max_batch_size. Its own "
            "fact, equal to that today; the bound is checked before the server starts "
            "(streamasr.triton.repository.check_limits).",
        ),
        Parameter("max_streams", MAX_STREAMS),
        Parameter(
            admission.CONFIG_KEY,
            admission.MEASURED,
            "Admission control (streamasr/core/admission.py): a START beyond this many open "
            'streams is refused with a retryable "server at capacity" error (status '
            'UNAVAILABLE). "measured": calibrated on each instance while this model loads '
            "(streamasr/pipeline/calibration.py: acoustic model, decoder and feature costs "
            "timed on the machine, x a documented headroom); the environment variable "
            "STREAMASR_MAX_ACTIVE_STREAMS overrides it; 0 = no limit.",
        ),
        Parameter(
            admission.LEAD_AT_CAPACITY_KEY,
            f"{admission.DEFAULT_LEAD_AT_CAPACITY_S:g}",
            "The limit is also a rate (its streams at real time): while the model windows "
            "sent on have spent it and another stream is at real time, a stream running "
            "more than this many seconds ahead of real time is closed (a file sent as fast "
            "as the server answers takes what is left, not the real-time streams' share); "
            "0 = no such check. streamasr/core/admission.py RealTimeBudget.",
        ),
    ),
    notes={
        "model": "Feature step: audio chunks -> model windows [N, left+chunk+right, n_mels]. "
        "Chunk geometry is read from the acoustic model's ONNX metadata "
        "(streamasr.protocol.contract).",
        "max_batch_size": "0: the output's first dimension is the number of windows this "
        "request completed, which the ensemble hands to acoustic_model as its batch.",
        "sequence_batching": "Triton forgets an idle sequence after "
        "max_sequence_idle_microseconds; our own state goes first (see "
        'stream_idle_timeout_s) so a late client is told "expired". START, END and CORRID '
        "carry the stream protocol's flags and sequence id.",
    },
)

CTC_DECODER = Model(
    name="ctc_decoder",
    backend="streamasr_ctc_decoder",
    inputs=(LOG_PROBS, STEP_INFO, replace(FEATURES, optional=True)),
    outputs=(RESULTS, UTTERANCES),
    parameters=(
        Parameter(
            "decoding",
            "beam",
            "Decoding for every stream (a stream's START options override it, e.g. "
            "decoding=greedy for the cheapest path): CTC prefix beam search fused with the "
            "CMU en-us word trigram (`make lm`; path relative to this folder); LM weights "
            "and every other default: streamasr/core/decoding/config.py. offline_asr "
            "decodes with these too (its decoder_model).",
        ),
        Parameter("beam_size", 16),
        Parameter("lm_path", "1/en-us.arpa"),
        NAMES_ACOUSTIC_MODEL,
        Parameter("stream_idle_timeout_s", STREAM_IDLE_TIMEOUT_S),
        Parameter("max_streams", MAX_STREAMS),
    ),
    notes={
        "model": "Decoder step: log-probs -> JSON result messages (interim/final, "
        "endpointing, words). Stateful, but NOT a Triton sequence model: Triton's ensemble "
        "does not keep a stream's requests in order between steps, and a sequence batcher "
        "rejects a request that an END overtook. The feature step tags each request with "
        "its stream id and index (STEP_INFO); the decoder applies them in order. One "
        "instance holds every stream's state.\n"
        "FEATURES comes only through streaming_asr_two_pass: the step then attaches each "
        "final's utterance (features + log-probs) as UTTERANCES for final_pass to "
        "re-decode.",
    },
)

# Whisper interim refreshes run at this niceness (final_pass parameter refresh_niceness).
REFRESH_NICENESS = 10
# Streams' responses final_pass takes at once (see its max_batch_size note).
FINAL_PASS_MAX_BATCH_SIZE = 8
# The first pass's messages, as final_pass takes them (a batch of streams' responses).
RESULTS_IN = Tensor("RESULTS_IN", "TYPE_STRING", (-1,), allow_ragged_batch=True)

FINAL_PASS = Model(
    name="final_pass",
    backend="streamasr_final_pass",
    inputs=(RESULTS_IN, replace(UTTERANCES, allow_ragged_batch=True)),
    outputs=(RESULTS,),
    max_batch_size=FINAL_PASS_MAX_BATCH_SIZE,
    decoupled=True,
    dynamic_batching_delay_us=0,
    parameters=(
        NAMES_ACOUSTIC_MODEL,
        Parameter("intra_op_thread_count", ONE_THREAD),
        Parameter(
            "final_graphs",
            final_pass.DEFAULT_FINAL_GRAPHS,
            "Whisper graphs for finals: int8 (one utterance per call: activations are "
            "quantized per call, so a batch could change a final's text) or float (finals "
            "queued together share one batched call). int8 measured on the 2-core VM: last "
            "word -> final 589 vs 761 ms (1 stream), 625 vs 886 ms (8), finals WER 6.1 vs "
            "7.9 % on assets/eval (benchmarks/results/finals/).",
        ),
        Parameter(
            "stream_idle_timeout_s",
            STREAM_IDLE_TIMEOUT_S,
            "Forget a stream's Whisper-interim agreement after this long without a re-decode.",
        ),
        Parameter(
            "refresh_niceness",
            REFRESH_NICENESS,
            "Niceness of the thread that re-decodes Whisper interims (0-19): refreshes take "
            "the CPU the streaming steps and finals leave, so they never delay a chunk's "
            "answer; on a machine shared with other work they then run rarely (0: as "
            "urgent as the rest).",
        ),
    ),
    notes={
        "model": "Two-pass finals: the last step of streaming_asr_two_pass. Re-decodes each "
        "final's utterance (and the open utterance of streams with interims=whisper) with "
        "Whisper tiny.en and re-aligns the text on the CTC log-probs; other messages pass "
        "through unchanged.\n"
        "Decoupled: a request without a final to re-decode is answered at once, never "
        "behind another stream's re-decode; the rest queue for one worker thread that "
        "re-decodes all queued utterances together (shared encoder calls and decoder loops, "
        "streamasr.core.whisper_redecoder). Whisper interims never wait: the chunk is "
        "answered at once and the open utterance's refresh (its unsettled tail, the stable "
        "words as prompt) is sent later as a second response of that request "
        "(refresh: true), by a niced thread that batches every stream's newest refresh. "
        "ONE instance: the Whisper interims' agreement state lives in it.\n"
        "The Whisper ONNX files (~230 MB, not in git) go in 1/: `make whisper` builds them.",
        "max_batch_size": "A request is one stream's response: the ensemble hands it over "
        "as a batch of one. Also the default of the parameters max_requests_per_batch "
        "(requests, i.e. streams' responses, re-decoded together at most) and "
        "max_utterances_per_call, set by neither here.",
        "dynamic_batching": "No queue delay: requests reach execute() (which returns at "
        "once) as they come.",
    },
)

MODEL_CONTRACT = Model(
    name="model_contract",
    backend="streamasr_model_contract",
    inputs=(Tensor("QUERY", "TYPE_STRING", (1,), optional=True),),
    outputs=(Tensor("CONTRACT", "TYPE_STRING", (1,)),),
    parameters=(NAMES_ACOUSTIC_MODEL,),
    notes={
        "model": "The acoustic model's contract as JSON (sample rate, chunk size, "
        "vocabulary...), so clients derive chunking from the model instead of "
        "hard-coding it.",
    },
)

OFFLINE_ASR = Model(
    name="offline_asr",
    backend="streamasr_offline_asr",
    inputs=(replace(AUDIO, optional=False), SAMPLE_RATE),
    outputs=(RESULTS,),
    parameters=(
        NAMES_ACOUSTIC_MODEL,
        Parameter(
            "decoder_model",
            CTC_DECODER.name,
            "Decodes exactly as this ctc_decoder model serves (its parameters over the "
            "declared defaults in streamasr/core/decoding/config.py), so a recording's "
            "messages equal a stream's.",
        ),
        Parameter(
            "max_batch",
            OFFLINE_MAX_BATCH,
            "Windows per acoustic-model call: its own fact (how a recording is cut into "
            "calls), equal to acoustic_model's max_batch_size today, and at most that "
            "(streamasr.triton.repository.check_limits, before the server starts).",
        ),
        Parameter("max_audio_seconds", 600),
    ),
    notes={
        "model": "Whole-recording transcription (SageMaker /invocations): the same "
        "windows, acoustic model (called through BLS) and decoder as a stream, so results "
        "match.",
    },
)

# -- the ensembles, from one list of steps -----------------------------------------------

# Audio -> windows -> log-probs: the steps every streaming ensemble begins with.
STREAM_STEPS = (
    Step(
        FEATURE_EXTRACTOR,
        {t.name: t.name for t in STREAM_AUDIO},
        {FEATURES.name: "features", STEP_INFO.name: "step_info"},
    ),
    Step(
        ACOUSTIC_MODEL,
        {ACOUSTIC_FEATURES.name: "features"},
        {ACOUSTIC_LOG_PROBS.name: "log_probs"},
    ),
)
DECODER_INPUTS = {LOG_PROBS.name: "log_probs", STEP_INFO.name: "step_info"}

STREAMING_NOTE = (
    "Streaming speech-to-text. Send a sequence (sequence_id, START ... END) of audio chunks "
    "over a gRPC stream; each request answers with RESULTS: JSON messages (see README).\n"
    "Triton forbids sequence_batching on an ensemble; the stateful steps each have one and "
    "the ensemble forwards the sequence id and flags to them."
)

STREAMING_ASR = Ensemble(
    name="streaming_asr",
    steps=(*STREAM_STEPS, Step(CTC_DECODER, DECODER_INPUTS, {RESULTS.name: RESULTS.name})),
    notes={"model": STREAMING_NOTE},
)

STREAMING_ASR_TWO_PASS = Ensemble(
    name="streaming_asr_two_pass",
    steps=(
        *STREAM_STEPS,
        Step(
            CTC_DECODER,
            {**DECODER_INPUTS, FEATURES.name: "features"},
            {RESULTS.name: "first_pass", UTTERANCES.name: "utterances"},
        ),
        Step(
            FINAL_PASS,
            {RESULTS_IN.name: "first_pass", UTTERANCES.name: "utterances"},
            {RESULTS.name: RESULTS.name},
        ),
    ),
    notes={
        "model": "Streaming speech-to-text with two-pass finals: the streaming_asr protocol "
        "and steps, and a final_pass step that re-decodes each final with Whisper tiny.en "
        "(interims stay streaming CTC; with interims=whisper a request may get a second "
        "response, a Whisper refresh of its interim). A final's response arrives after the "
        "re-decode: "
        "responses can come back out of send order, so clients order a stream's responses "
        "by request (the bundled client does). Choose per stream by model name: "
        "streaming_asr or this one.",
    },
)

REPOSITORY: tuple[Model | Ensemble, ...] = (
    ACOUSTIC_MODEL,
    CTC_DECODER,
    FEATURE_EXTRACTOR,
    FINAL_PASS,
    MODEL_CONTRACT,
    OFFLINE_ASR,
    STREAMING_ASR,
    STREAMING_ASR_TWO_PASS,
)


def with_model(
    new: Model, models: Sequence[Model | Ensemble] = REPOSITORY
) -> tuple[Model | Ensemble, ...]:
    """``models`` with the model named like ``new`` replaced by it, in the ensembles'
    steps too (a variant of the repository, e.g. for a test)."""

    def swap(m: Any) -> Any:
        if isinstance(m, Ensemble):
            steps = tuple(replace(s, model=swap(s.model)) for s in m.steps)
            return replace(m, steps=steps)
        return new if m.name == new.name else m

    if new.name not in {m.name for m in models}:
        raise SpecError(f"no model {new.name!r} to replace")
    return tuple(swap(m) for m in models)


# -- spec -> protobuf --------------------------------------------------------------------


def _sequence_batching(sb: SequenceBatching) -> Any:
    ctl = model_config_pb2.ModelSequenceBatching.Control
    msg = model_config_pb2.ModelSequenceBatching(max_sequence_idle_microseconds=sb.idle_us)
    for name, kind in (("START", ctl.CONTROL_SEQUENCE_START), ("END", ctl.CONTROL_SEQUENCE_END)):
        msg.control_input.add(name=name).control.add(kind=kind, int32_false_true=[0, 1])
    msg.control_input.add(name="CORRID").control.add(
        kind=ctl.CONTROL_SEQUENCE_CORRID, data_type=model_config_pb2.TYPE_UINT64
    )
    msg.oldest.max_candidate_sequences = sb.max_candidate_sequences
    return msg


def _fields(m: Model | Ensemble) -> list[tuple[str, Any]]:
    """``m`` as (field name, ModelConfig holding just that field or element), in the order
    the file lists them."""

    def one(**kwargs: Any) -> Any:
        return model_config_pb2.ModelConfig(**kwargs)

    out: list[tuple[str, Any]] = [("name", one(name=m.name))]
    if isinstance(m, Model):
        out.append(("backend", one(backend=m.backend)))
    else:
        out.append(("platform", one(platform="ensemble")))
    max_batch_size = m.max_batch_size if isinstance(m, Model) else 0
    out.append(("max_batch_size", one(max_batch_size=max_batch_size)))
    for kind, tensors in (("input", m.inputs), ("output", m.outputs)):
        for t in tensors:
            msg = one()
            t.add_to(getattr(msg, kind))
            out.append((kind, msg))
    if isinstance(m, Ensemble):
        msg = one()
        for s in m.steps:
            step = msg.ensemble_scheduling.step.add(model_name=s.model.name, model_version=-1)
            step.input_map.update(s.inputs)
            step.output_map.update(s.outputs)
        out.append(("ensemble_scheduling", msg))
        return out
    if m.decoupled:
        msg = one()
        msg.model_transaction_policy.decoupled = True
        out.append(("model_transaction_policy", msg))
    if m.dynamic_batching_delay_us is not None:
        msg = one()
        msg.dynamic_batching.SetInParent()
        msg.dynamic_batching.max_queue_delay_microseconds = m.dynamic_batching_delay_us
        out.append(("dynamic_batching", msg))
    if m.sequence_batching is not None:
        msg = one()
        msg.sequence_batching.CopyFrom(_sequence_batching(m.sequence_batching))
        out.append(("sequence_batching", msg))
    msg = one()
    msg.instance_group.add(
        kind=model_config_pb2.ModelInstanceGroup.Kind.Value(m.instances.kind),
        count=m.instances.count,
    )
    out.append(("instance_group", msg))
    for p in m.parameters:
        msg = one()
        msg.parameters[p.key].string_value = str(p.value)
        out.append(("parameters:" + p.key, msg))
    return out


def to_proto(m: Model | Ensemble) -> Any:
    """``m`` as the ModelConfig message Triton reads."""
    msg = model_config_pb2.ModelConfig()
    for _, part in _fields(m):
        msg.MergeFrom(part)
    return msg


# -- protobuf -> text --------------------------------------------------------------------


def _name_every_control_kind(message: Any, indent: int, as_one_line: bool) -> str | None:
    """CONTROL_SEQUENCE_START is the enum's zero value, which the text format leaves out:
    write it anyway, so a reader sees which control START is."""
    if message.DESCRIPTOR.full_name != "inference.ModelSequenceBatching.Control" or message.kind:
        return None
    body = text_format.MessageToString(message, as_one_line=True)
    return f"kind: {message.Kind.Name(message.kind)} {body}"


def _text(msg: Any, indent: int) -> list[str]:
    """``msg``'s fields as text lines: a field (or element) that fits on one line in
    ``WIDTH`` is written on one, a longer message is opened and its fields follow."""
    lines: list[str] = []
    pad = " " * indent
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            items = [(k, value[k]) for k in sorted(value)]
            parts = []
            for k, v in items:
                part = type(msg)()
                entry = getattr(part, fd.name)
                if fd.message_type.fields_by_name["value"].message_type is not None:
                    entry[k].CopyFrom(v)
                else:
                    entry[k] = v
                parts.append((part, None))
        elif fd.is_repeated and fd.message_type is not None:
            parts = []
            for v in value:
                part = type(msg)()
                getattr(part, fd.name).add().CopyFrom(v)
                parts.append((part, v))
        else:
            part = type(msg)()
            if fd.message_type is not None:
                getattr(part, fd.name).CopyFrom(value)
                parts = [(part, value)]
            elif fd.is_repeated:
                getattr(part, fd.name).extend(value)
                parts = [(part, None)]
            else:
                setattr(part, fd.name, value)
                parts = [(part, None)]
        for part, sub in parts:
            line = text_format.MessageToString(
                part, as_one_line=True, message_formatter=_name_every_control_kind
            )
            if sub is None or len(pad) + len(line) <= WIDTH:
                lines.append(pad + line)
            else:
                lines += [f"{pad}{fd.name} {{", *_text(sub, indent + 2), pad + "}"]
    return lines


def _comment(note: str) -> list[str]:
    return [
        "# " + line
        for para in note.split("\n")
        for line in textwrap.wrap(para, WIDTH - 2, break_on_hyphens=False)
    ]


def render(m: Model | Ensemble) -> str:
    """``m``'s config.pbtxt: the generated-file header, then each field under its note."""
    lines = HEADER.splitlines() + ["#"]
    if "model" in m.notes:
        lines += _comment(m.notes["model"])
    notes = dict(m.notes)
    if isinstance(m, Model):
        notes.update({"parameters:" + p.key: p.note for p in m.parameters if p.note})
    for name, part in _fields(m):
        if notes.get(name):
            lines += _comment(notes.pop(name))
        # a zero (max_batch_size: 0) is the text format's default, left out: say it
        lines += _text(part, 0) or [f"{name}: {getattr(part, name)}"]
    return "\n".join(lines) + "\n"


# -- cross-checks ------------------------------------------------------------------------

#: Per-request window counts that become one acoustic-model batch, (model, parameter):
#: each is its own fact, written once in its own config (how much one request may carry,
#: how a recording is cut into calls), bounded by the acoustic model's max_batch_size
#: (Triton rejects a larger batch).
ACOUSTIC_BATCH_BOUNDED = (
    ("feature_extractor", "max_windows_per_request"),
    ("offline_asr", "max_batch"),
)


def _params(cfg: Any) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def acoustic_model_of(cfg: Any) -> str:
    """The acoustic model a ModelConfig names (parameter ``acoustic_model``, as the steps
    read it: ``acoustic_model`` when not set)."""
    return _params(cfg).get("acoustic_model") or ACOUSTIC_MODEL.name


def check_acoustic_batches(configs: Mapping[str, Any]) -> list[str]:
    """Each of ``ACOUSTIC_BATCH_BOUNDED`` at most the ``max_batch_size`` of the acoustic
    model its model names (parameter ``acoustic_model``); models absent are skipped."""
    problems = []
    for model, key in ACOUSTIC_BATCH_BOUNDED:
        if model not in configs:
            continue
        params = _params(configs[model])
        acoustic = acoustic_model_of(configs[model])
        if key not in params or acoustic not in configs:
            continue
        value = parse_int(f"{model} {key}", params[key], 0)
        limit = configs[acoustic].max_batch_size
        if value > limit:
            problems.append(
                f"{model} {key} {value} exceeds {acoustic} max_batch_size {limit}: "
                "Triton would reject those batches"
            )
    return problems


def _ttl(cfg: Any) -> float | None:
    """A stateful step's stream TTL (checked shorter than its sequence idle time)."""
    if "stream_idle_timeout_s" not in cfg.parameters:
        return None
    raw = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    return stream_idle_timeout(ModelConfig(raw=raw, repository=Path(cfg.name), name=cfg.name))


def check_stream_ttls(configs: Mapping[str, Any]) -> list[str]:
    """Each stream TTL shorter than its model's Triton sequence idle time, and in each
    ensemble no later step's TTL shorter than that of the step that admits the stream (the
    one with a sequence batcher): else a later step would forget a stream the first still
    serves, and answer its next request "expired"."""
    problems: list[str] = []
    for cfg in configs.values():
        try:
            _ttl(cfg)
        except ValueError as exc:
            problems.append(str(exc))
    for ens in configs.values():
        steps = [s.model_name for s in ens.ensemble_scheduling.step if s.model_name in configs]
        admits = next((s for s in steps if configs[s].HasField("sequence_batching")), None)
        if admits is None:
            continue
        try:
            first = _ttl(configs[admits])
            later = [(s, _ttl(configs[s])) for s in steps[steps.index(admits) + 1 :]]
        except ValueError:
            continue  # said above
        for name, ttl in later:
            if first is not None and ttl is not None and ttl < first:
                problems.append(
                    f"{ens.name}: {name} stream_idle_timeout_s {ttl:g} is shorter than "
                    f"{admits}'s {first:g}: {name} would forget a stream {admits} still "
                    "serves and answer its next request 'expired'"
                )
    return sorted(set(problems))


def check_stream_limits(configs: Mapping[str, Any]) -> list[str]:
    """In each ensemble, no later step's ``max_streams`` below that of the step that admits
    the stream: else it would refuse a stream the first one accepted."""
    problems = []
    for ens in configs.values():
        steps = [s.model_name for s in ens.ensemble_scheduling.step if s.model_name in configs]
        raw = [(s, _params(configs[s]).get("max_streams")) for s in steps]
        limits = [(s, parse_int(f"{s} max_streams", v, 0)) for s, v in raw if v]
        for name, b in limits[1:]:
            first, a = limits[0]
            if b < a:
                problems.append(
                    f"{ens.name}: {name} max_streams {b} is below {first}'s {a}: {name} "
                    f"would refuse streams {first} accepted"
                )
    return problems


def check_wiring(configs: Mapping[str, Any]) -> list[str]:
    """Each ensemble step maps only tensors its model declares, every required input of
    the model, a tensor only after a step produced it (or the ensemble takes it), with the
    same data type at both ends; every acoustic_model/decoder_model names such a model."""
    problems = []
    for cfg in configs.values():
        params = _params(cfg)
        for key, backend in (("acoustic_model", None), ("decoder_model", "streamasr_ctc_decoder")):
            named = params.get(key)
            if named is not None and (
                named not in configs or (backend and configs[named].backend != backend)
            ):
                problems.append(f"{cfg.name} {key} {named!r} is not a {backend or 'model'} here")
        if not cfg.ensemble_scheduling.step:
            continue
        types = {t.name: t.data_type for t in cfg.input}
        steps = cfg.ensemble_scheduling.step
        first_made: dict[str, int] = {}
        for i, s in reversed(list(enumerate(steps))):
            first_made.update({outer: i for outer in s.output_map.values()})
        for i, s in enumerate(steps):
            where = f"{cfg.name} step {i} ({s.model_name})"
            if s.model_name not in configs:
                problems.append(f"{where}: no such model")
                continue
            model = configs[s.model_name]
            ins = {t.name: t for t in model.input}
            outs = {t.name: t for t in model.output}
            for own, outer in s.input_map.items():
                if own not in ins:
                    problems.append(f"{where}: {s.model_name} has no input {own!r}")
                elif first_made.get(outer, -1) >= i:
                    problems.append(f"{where}: {outer!r} is used before a step produces it")
                elif outer not in types:
                    problems.append(f"{where}: {outer!r} is no ensemble input nor step output")
                elif types[outer] != ins[own].data_type:
                    problems.append(f"{where}: {outer!r} has another data type than {own!r}")
            for own in sorted(set(ins) - set(s.input_map)):
                if not ins[own].optional:
                    problems.append(f"{where}: required input {own!r} is not mapped")
            for own, outer in s.output_map.items():
                if own not in outs:
                    problems.append(f"{where}: {s.model_name} has no output {own!r}")
                else:
                    types[outer] = outs[own].data_type
    return problems


CHECKS = (check_acoustic_batches, check_stream_ttls, check_stream_limits, check_wiring)


def problems(configs: Mapping[str, Any]) -> list[str]:
    """What in ``configs`` (model name -> ModelConfig) breaks a rule between models."""
    return [p for c in CHECKS for p in c(configs)]


def check(models: Sequence[Model | Ensemble] = REPOSITORY) -> dict[str, Any]:
    """``models`` as protobuf messages by name, after every cross-check: raises
    ``SpecError`` saying each broken rule."""
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"models declared twice: {', '.join(dupes)}")
    for m in models:
        steps = m.steps if isinstance(m, Ensemble) else ()
        for s in steps:
            if s.model not in models:
                raise SpecError(f"{m.name}: step {s.model.name!r} is not in the repository")
    configs = {m.name: to_proto(m) for m in models}
    found = problems(configs)
    if found:
        raise SpecError("; ".join(found))
    return configs


def rendered(models: Sequence[Model | Ensemble] = REPOSITORY) -> dict[str, str]:
    """Each model's config.pbtxt path (relative to the repository) -> its text."""
    check(models)
    return {f"{m.name}/config.pbtxt": render(m) for m in models}


def differing(repo: Path, models: Sequence[Model | Ensemble] = REPOSITORY) -> list[str]:
    """The config files of ``repo`` that differ from the spec's (or are missing)."""
    repo = Path(repo)
    return [
        rel
        for rel, text in rendered(models).items()
        if not (repo / rel).is_file() or (repo / rel).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    p = argument_parser("python -m streamasr.triton.spec", __doc__)
    p.add_argument("repository", type=Path)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write every config.pbtxt")
    mode.add_argument("--check", action="store_true", help="exit 1 if any file differs")
    a = p.parse_args(argv)
    try:
        texts = rendered()
    except SpecError as exc:
        log.error("the spec breaks a cross-check: %s", exc)
        return 2
    if a.check:
        stale = differing(a.repository)
        for rel in stale:
            log.error("%s differs from the spec: run `make repository`", a.repository / rel)
        return 1 if stale else 0
    for rel, text in texts.items():
        path = a.repository / rel
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
