"""Triton Python-based backend `streamasr_final_pass`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.final_pass import (
    FinalPassModel as TritonPythonModel,  # noqa: F401
)
