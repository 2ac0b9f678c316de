"""Triton Python-based backend `onnxruntime`: a thin adapter, the logic lives in streamasr."""
from streamasr.triton_models.adapters import OnnxRuntimeModel as TritonPythonModel  # noqa: F401
