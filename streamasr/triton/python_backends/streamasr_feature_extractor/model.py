"""Triton Python-based backend `streamasr_feature_extractor`: a thin adapter, the logic lives in streamasr."""

from streamasr.triton.backend.feature_extractor import (
    FeatureExtractorModel as TritonPythonModel,  # noqa: F401
)
