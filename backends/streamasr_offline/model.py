"""Triton Python-based backend `streamasr_offline`: a thin adapter, the logic lives in streamasr."""
from streamasr.triton_models.adapters import OfflineAsrModel as TritonPythonModel  # noqa: F401
