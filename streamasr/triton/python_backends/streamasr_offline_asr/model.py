"""Triton Python-based backend `streamasr_offline_asr`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.offline_asr import (
    OfflineAsrModel as TritonPythonModel,  # noqa: F401
)
