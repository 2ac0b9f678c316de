"""Triton Python-based backend `streamasr_model_contract`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.model_contract import (
    ModelContractModel as TritonPythonModel,  # noqa: F401
)
