"""The acoustic-model contract: the one source of truth for chunk geometry and features.

An acoustic model is an ONNX file whose ``metadata_props`` carry everything the server
and the client need.  Keys (all strings, JSON where noted)::

    streamasr.protocol.contract         "1"
    streamasr.name / .version / .license / .description
    streamasr.core.features         JSON FeatureSpec  (sample rate, frame shift, mel parameters...)
    streamasr.chunk_frames     feature frames the model emits output for, per window
    streamasr.left_frames      feature frames of left context fed before the chunk
    streamasr.right_frames     feature frames of look-ahead fed after the chunk
    streamasr.subsampling      feature frames per output frame
    streamasr.vocabulary       JSON list of token strings (index = output class)
    streamasr.blank_id         index of the CTC blank
    streamasr.word_boundary    "space": the token " " separates words;
                               "sentencepiece": a leading "\u2581" starts a word
    streamasr.input / .output  tensor names (default "features" / "log_probs")
    streamasr.idle_window      optional float: a window every value of which is this
                               number carries no audio, and the model answers a batch
                               made only of such windows without computing (its output
                               is discarded).  The feature step sends one when a request
                               completes no window (Triton cannot send a batch of zero);
                               without the key it sends a window of silence, computed.

Input ``[B, left+chunk+right, n_mels]`` float32 -> output ``[B, chunk/subsampling, V]``
float32 log-probabilities for the chunk's frames only.  The model is stateless: the left
context is recomputed from features the feature step keeps.

    python -m streamasr.protocol.contract model_repository/acoustic_model/1/model.onnx
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONTRACT_VERSION = "1"
PREFIX = "streamasr."
WORD_BOUNDARIES = ("space", "sentencepiece")
FEATURE_TYPES = ("log_mel", "waveform")


class ContractError(ValueError):
    """A model's metadata does not satisfy the contract; the message names each bad field."""


@dataclass(frozen=True)
class FeatureSpec:
    """Features computed frame by frame with no centre padding, so that a stream cut
    anywhere yields the same frames as the whole recording.

    ``type="log_mel"``: frame ``i`` is the normalised log-mel spectrum of samples
    ``[i*hop_length, i*hop_length + n_fft)``.
    ``type="waveform"`` (raw-audio models such as wav2vec2): frame ``i`` is the
    ``hop_length`` samples ``[i*hop_length, (i+1)*hop_length)`` themselves, as float32 in
    [-1, 1] (no FFT, no normalisation); ``n_fft`` and ``n_mels`` must both equal
    ``hop_length`` (a window is ``[B, W, hop_length]`` and the model reshapes it to
    ``W*hop_length`` samples); the mel fields are unused; padding is digital silence (0).
    """

    type: str = "log_mel"
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160  # samples per feature frame (the frame shift)
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = -7.5  # log10 power floor (a fixed stand-in for Whisper's max-8)
    offset: float = 4.0  # x -> (x + offset) / scale, as Whisper normalises
    scale: float = 4.0

    @property
    def frame_seconds(self) -> float:
        return self.hop_length / self.sample_rate

    def problems(self) -> list[str]:
        p = []
        if self.type not in FEATURE_TYPES:
            p.append(f"features.type {self.type!r} is not one of {FEATURE_TYPES}")
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                p.append(f"features.{name} must be a positive integer, got {v!r}")
        if not p and self.type == "waveform":
            if not self.n_fft == self.n_mels == self.hop_length:
                p.append(
                    "waveform features need n_fft == n_mels == hop_length (a frame is "
                    f"hop_length samples), got n_fft={self.n_fft} n_mels={self.n_mels} "
                    f"hop_length={self.hop_length}"
                )
            return p
        if not p and self.hop_length > self.n_fft:
            p.append("features.hop_length must not exceed features.n_fft")
        if not p and not (0 <= self.fmin < self.fmax <= self.sample_rate / 2):
            p.append("features need 0 <= fmin < fmax <= sample_rate/2")
        if self.scale == 0:
            p.append("features.scale must not be 0")
        return p


@dataclass(frozen=True)
class ModelContract:
    features: FeatureSpec
    chunk_frames: int
    left_frames: int
    right_frames: int
    subsampling: int
    vocabulary: tuple[str, ...]
    blank_id: int = 0
    word_boundary: str = "space"
    input_name: str = "features"
    output_name: str = "log_probs"
    name: str = "unnamed"
    version: str = "0"
    license: str = "unknown"
    description: str = ""
    # between the feature step and the model: not part of what clients compare
    idle_window: float | None = field(default=None, compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    # -- geometry derived from the fields above (never stored twice) ---------------
    @property
    def window_frames(self) -> int:
        return self.left_frames + self.chunk_frames + self.right_frames

    @property
    def output_frames(self) -> int:
        return self.chunk_frames // self.subsampling

    @property
    def chunk_samples(self) -> int:
        return self.chunk_frames * self.features.hop_length

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_samples / self.features.sample_rate

    @property
    def output_frame_seconds(self) -> float:
        """Seconds per output (log-prob) frame."""
        return self.features.frame_seconds * self.subsampling

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    # -- (de)serialisation ---------------------------------------------------------
    def to_metadata(self) -> dict[str, str]:
        self.validate()
        m = {
            "contract": CONTRACT_VERSION,
            "name": self.name,
            "version": self.version,
            "license": self.license,
            "description": self.description,
            "features": json.dumps(asdict(self.features), sort_keys=True),
            "chunk_frames": str(self.chunk_frames),
            "left_frames": str(self.left_frames),
            "right_frames": str(self.right_frames),
            "subsampling": str(self.subsampling),
            "vocabulary": json.dumps(list(self.vocabulary), ensure_ascii=False),
            "blank_id": str(self.blank_id),
            "word_boundary": self.word_boundary,
            "input": self.input_name,
            "output": self.output_name,
        }
        if self.idle_window is not None:
            m["idle_window"] = repr(float(self.idle_window))
        m.update({k: str(v) for k, v in self.extra.items()})
        return {PREFIX + k: v for k, v in m.items()}

    def to_json(self) -> str:
        """The client-facing form (served by the `model_contract` model).  ``idle_window``
        is between the feature step and the model, and stays out: clients of earlier
        versions build the contract from every key they are given."""
        d = asdict(self)
        del d["idle_window"]
        d["vocabulary"] = list(self.vocabulary)
        d["window_frames"] = self.window_frames
        d["chunk_samples"] = self.chunk_samples
        d["output_frame_seconds"] = self.output_frame_seconds
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        d = json.loads(text)
        for derived in ("window_frames", "chunk_samples", "output_frame_seconds"):
            d.pop(derived, None)
        # keys a newer server may add are not this client's business
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["features"] = FeatureSpec(**d["features"])
        d["vocabulary"] = tuple(d["vocabulary"])
        c = cls(**d)
        c.validate()
        return c

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "ModelContract":
        problems: list[str] = []
        m = {k[len(PREFIX) :]: v for k, v in meta.items() if k.startswith(PREFIX)}
        if not m:
            raise ContractError(
                "no streamasr.* metadata: this ONNX file is not a streamasr "
                "acoustic model (see `python -m streamasr.protocol.contract --help`)"
            )
        if m.get("contract") != CONTRACT_VERSION:
            problems.append(
                f"streamasr.protocol.contract must be {CONTRACT_VERSION!r}, got {m.get('contract')!r}"
            )

        def integer(key: str, minimum: int) -> int:
            raw = m.get(key)
            try:
                v = int(raw)  # type: ignore[arg-type]  # None and junk are reported below
            except (TypeError, ValueError):
                problems.append(f"streamasr.{key} must be an integer, got {raw!r}")
                return minimum
            if v < minimum:
                problems.append(f"streamasr.{key} must be >= {minimum}, got {v}")
            return v

        def parsed(key: str, default):
            raw = m.get(key)
            if raw is None:
                problems.append(f"streamasr.{key} is missing")
                return default
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"streamasr.{key} is not valid JSON ({exc.msg})")
                return default

        fdict = parsed("features", {})
        features = FeatureSpec()
        if isinstance(fdict, dict):
            unknown = set(fdict) - set(FeatureSpec.__dataclass_fields__)
            if unknown:
                problems.append(f"streamasr.core.features has unknown fields {sorted(unknown)}")
            else:
                features = FeatureSpec(**fdict)
        else:
            problems.append("streamasr.core.features must be a JSON object")
        vocab = parsed("vocabulary", [])
        if not (isinstance(vocab, list) and vocab and all(isinstance(t, str) for t in vocab)):
            problems.append("streamasr.vocabulary must be a non-empty JSON list of strings")
            vocab = ["<blank>"]
        known = {
            "contract",
            "name",
            "version",
            "license",
            "description",
            "features",
            "chunk_frames",
            "left_frames",
            "right_frames",
            "subsampling",
            "vocabulary",
            "blank_id",
            "word_boundary",
            "input",
            "output",
            "idle_window",
        }
        idle_window = None
        if "idle_window" in m:
            try:
                idle_window = float(m["idle_window"])
            except ValueError:
                problems.append(f"streamasr.idle_window must be a number, got {m['idle_window']!r}")
            else:
                if not math.isfinite(idle_window):
                    problems.append(f"streamasr.idle_window must be finite, got {idle_window}")
        c = ModelContract(
            features=features,
            chunk_frames=integer("chunk_frames", 1),
            left_frames=integer("left_frames", 0),
            right_frames=integer("right_frames", 0),
            subsampling=integer("subsampling", 1),
            vocabulary=tuple(vocab),
            blank_id=integer("blank_id", 0),
            word_boundary=m.get("word_boundary", "space"),
            input_name=m.get("input", "features"),
            output_name=m.get("output", "log_probs"),
            name=m.get("name", "unnamed"),
            version=m.get("version", "0"),
            license=m.get("license", "unknown"),
            description=m.get("description", ""),
            idle_window=idle_window,
            extra={k: v for k, v in m.items() if k not in known},
        )
        problems += c.problems()
        if problems:
            raise ContractError("invalid acoustic-model contract:\n  - " + "\n  - ".join(problems))
        return c

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelContract":
        """Read the contract from an ONNX file's metadata without loading its weights."""
        import onnx  # only needed here; the runtime path uses onnxruntime's metadata

        model = onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        try:
            return cls.from_metadata(meta)
        except ContractError as exc:
            raise ContractError(f"{path}: {exc}") from None

    @classmethod
    def from_session(cls, session) -> "ModelContract":
        """Read the contract from an onnxruntime InferenceSession."""
        return cls.from_metadata(dict(session.get_modelmeta().custom_metadata_map))

    # -- validation ----------------------------------------------------------------
    def problems(self) -> list[str]:
        p = list(self.features.problems())
        if self.chunk_frames < 1:
            p.append("chunk_frames must be >= 1")
        if self.subsampling < 1:
            p.append("subsampling must be >= 1")
        elif self.chunk_frames % self.subsampling:
            p.append(
                f"chunk_frames ({self.chunk_frames}) must be a multiple of "
                f"subsampling ({self.subsampling})"
            )
        elif self.left_frames % self.subsampling:
            p.append(
                f"left_frames ({self.left_frames}) must be a multiple of "
                f"subsampling ({self.subsampling})"
            )
        if self.left_frames < 0 or self.right_frames < 0:
            p.append("left_frames and right_frames must be >= 0")
        if not 0 <= self.blank_id < len(self.vocabulary):
            p.append(
                f"blank_id {self.blank_id} is outside the vocabulary (size {len(self.vocabulary)})"
            )
        if self.word_boundary not in WORD_BOUNDARIES:
            p.append(f"word_boundary {self.word_boundary!r} is not one of {WORD_BOUNDARIES}")
        elif self.word_boundary == "space" and " " not in self.vocabulary:
            p.append('word_boundary "space" needs the token " " in the vocabulary')
        if len(set(self.vocabulary)) != len(self.vocabulary):
            p.append("vocabulary has duplicate tokens")
        return p

    def validate(self) -> "ModelContract":
        p = self.problems()
        if p:
            raise ContractError("invalid acoustic-model contract:\n  - " + "\n  - ".join(p))
        return self


def check_onnx_io(path: str | Path, contract: ModelContract) -> list[str]:
    """Problems with the ONNX graph's inputs/outputs against the contract's geometry."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    problems = []
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    if list(ins) != [contract.input_name]:
        problems.append(f"inputs are {list(ins)}, expected exactly [{contract.input_name!r}]")
    else:
        shape = ins[contract.input_name].shape
        want = [None, contract.window_frames, contract.features.n_mels]
        if len(shape) != 3 or any(isinstance(w, int) and s != w for s, w in zip(shape, want)):
            problems.append(f"input shape {shape} does not match [B, {want[1]}, {want[2]}]")
    if contract.output_name not in outs:
        problems.append(f"no output {contract.output_name!r} (outputs: {list(outs)})")
    else:
        shape = outs[contract.output_name].shape
        want = [None, contract.output_frames, len(contract.vocabulary)]
        if len(shape) != 3 or any(
            isinstance(s, int) and isinstance(w, int) and s != w for s, w in zip(shape, want)
        ):
            problems.append(f"output shape {shape} does not match [B, {want[1]}, {want[2]}]")
    return problems


def main(argv: list[str] | None = None) -> int:

    from streamasr.cli import argument_parser

    p = argument_parser(
        "python -m streamasr.protocol.contract",
        __doc__,
        "Validate an acoustic model against the contract.",
    )
    p.add_argument("model", type=Path, help="ONNX file")
    a = p.parse_args(argv)
    try:
        c = ModelContract.from_onnx(a.model)
    except (ContractError, OSError) as exc:
        print(f"INVALID: {exc}", file=sys.stderr)
        return 1
    io_problems = check_onnx_io(a.model, c)
    if io_problems:
        print(f"INVALID: {a.model}:\n  - " + "\n  - ".join(io_problems), file=sys.stderr)
        return 1
    print(
        f"OK: {c.name} {c.version} ({c.license}); {c.sample_rate} Hz, "
        f"chunk {c.chunk_seconds * 1000:.0f} ms, left {c.left_frames} / right "
        f"{c.right_frames} frames, subsampling {c.subsampling}, vocabulary "
        f"{len(c.vocabulary)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
