"""Triton Python-based backend `streamasr_ctc_decoder`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.ctc_decoder import (
    CtcDecoderModel as TritonPythonModel,  # noqa: F401
)
