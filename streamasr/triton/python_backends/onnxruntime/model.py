"""Triton Python-based backend `onnxruntime`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.onnxruntime_standin import (
    OnnxRuntimeModel as TritonPythonModel,  # noqa: F401
)
