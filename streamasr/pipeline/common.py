"""What every streamasr Triton model shares: typed config parameters, request
parameters and the location of the acoustic model (the step-info message the feature
step hands to the decoder step is in ``step_info``).

Nothing here imports ``triton_python_backend_utils``: the adapters pass it in, so this
module (and all logic behind it) runs in plain pytest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One set of typed parameter readers for config.pbtxt and request parameters alike.
from streamasr.core.params import parse_bool, parse_float, parse_int  # noqa: F401
from streamasr.protocol.contract import ModelContract

# Sequence control flags as Triton reports them in request.flags().
FLAG_START = 1
FLAG_END = 2


class ConfigError(ValueError):
    """A model's config.pbtxt is unusable; raised from initialize() so the load fails."""


@dataclass
class ModelConfig:
    """The parsed ``args["model_config"]`` of a Python model."""

    raw: dict
    repository: Path  # this model's folder
    name: str

    @classmethod
    def from_args(cls, args: dict) -> "ModelConfig":
        raw = json.loads(args["model_config"])
        return cls(
            raw=raw,
            repository=Path(args["model_repository"]),
            name=args.get("model_name", raw.get("name", "?")),
        )

    def parameters(self) -> dict[str, str]:
        return {k: v.get("string_value", "") for k, v in self.raw.get("parameters", {}).items()}

    def param(self, key: str, default: str | None = None) -> str:
        params = self.parameters()
        if key in params:
            return params[key]
        if default is None:
            raise ConfigError(f"model {self.name!r}: config.pbtxt parameter {key!r} is required")
        return default

    def sequence_idle_s(self) -> float:
        sb = self.raw.get("sequence_batching")
        if sb is None:
            raise ConfigError(f"model {self.name!r} needs sequence_batching")
        us = int(sb.get("max_sequence_idle_microseconds") or 1_000_000)  # Triton's default
        return us / 1e6

    def acoustic_model_path(self) -> Path:
        """The sibling acoustic model's ONNX file (config parameter `acoustic_model`)."""
        name = self.param("acoustic_model", "acoustic_model")
        folder = self.repository.parent / name
        versions = (
            sorted(
                (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                key=lambda p: int(p.name),
            )
            if folder.is_dir()
            else []
        )
        for v in reversed(versions):
            f = v / "model.onnx"
            if f.exists():
                return f
        raise ConfigError(f"model {self.name!r}: no {folder}/<version>/model.onnx")

    def contract(self) -> ModelContract:
        return ModelContract.from_onnx(self.acoustic_model_path())


def parse_config(path: Path) -> Any:
    """A ``config.pbtxt`` as a ``tritonclient`` ModelConfig protobuf message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def read_config(model_dir: Path) -> ModelConfig:
    """A model folder's config.pbtxt, parsed as Triton would hand it to initialize()."""
    from google.protobuf import json_format

    msg = parse_config(Path(model_dir) / "config.pbtxt")
    raw = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return ModelConfig(raw=raw, repository=Path(model_dir), name=raw.get("name", "?"))


def stream_idle_timeout(cfg: ModelConfig) -> float:
    """Our state TTL (`stream_idle_timeout_s`): shorter than Triton's sequence idle
    timeout, so a late request still reaches the model and is told 'expired' instead of
    Triton's bare 'must specify START'."""
    ttl = parse_float("stream_idle_timeout_s", cfg.param("stream_idle_timeout_s"), 0.001)
    if "sequence_batching" not in cfg.raw:
        return ttl
    triton_idle = cfg.sequence_idle_s()
    if ttl >= triton_idle:
        raise ConfigError(
            f"model {cfg.name!r}: stream_idle_timeout_s ({ttl:g}) must be shorter than "
            f"sequence_batching.max_sequence_idle_microseconds ({triton_idle:g} s)"
        )
    return ttl


def request_parameters(request) -> dict[str, Any]:
    """A request's parameters (tritonclient `parameters=`) as a dict."""
    raw = request.parameters()
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except (TypeError, ValueError):
        raise ValueError("request parameters are not valid JSON") from None
    if not isinstance(d, dict):
        raise ValueError("request parameters must be a JSON object")
    return d
