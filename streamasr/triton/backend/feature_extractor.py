"""Triton python backend ``streamasr_feature_extractor``: the feature step of ``streaming_asr``
(audio chunks -> feature windows + STEP_INFO), over ``triton_models.feature_extractor``."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from streamasr.core.state import StreamError
from streamasr.pipeline import ctc_decoder, feature_extractor
from streamasr.pipeline.common import request_parameters
from streamasr.triton.backend import edge


class FeatureExtractorModel:
    """Backend `streamasr_feature_extractor` — the feature step of `streaming_asr`."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(
            args, {"AUDIO", "AUDIO_INT16", "SAMPLE_RATE"}, {"FEATURES", "STEP_INFO"}
        )
        self.step = feature_extractor.build_step(
            self.cfg, validate_options=ctc_decoder.validate_stream_options
        )
        self.metrics = edge.StreamMetrics(self.cfg.name)
        self.admission_metrics = edge.AdmissionMetrics(self.cfg.name, self.step.admission.limit)
        self.sweeper = edge.start_sweeper(self.step.store, self.metrics)
        self.log.info(
            "ready: chunk %.0f ms, window %d frames, idle timeout %.1f s, admits %s streams "
            "at once",
            self.step.contract.chunk_seconds * 1000,
            self.step.contract.window_frames,
            self.step.store.ttl_s,
            self.step.admission.limit or "any number of",
        )

    def execute(self, requests):
        responses = edge.serve_each(
            requests, self._respond, self.log, "feature_extractor", self.metrics, self.step.store
        )
        self.admission_metrics.sync((*self.step.admission.snapshot(), self.step.lead_closed))
        return responses

    def _respond(self, request) -> list:
        result = self.step.process(self._read(request))
        return [
            pb_utils.Tensor("FEATURES", result.features),
            edge.strings_tensor("STEP_INFO", [result.info.to_json()]),
        ]

    @staticmethod
    def _read(request) -> feature_extractor.FeatureRequest:
        f32 = pb_utils.get_input_tensor_by_name(request, "AUDIO")
        i16 = pb_utils.get_input_tensor_by_name(request, "AUDIO_INT16")
        if f32 is not None and i16 is not None:
            raise StreamError("send AUDIO (float32) or AUDIO_INT16, not both")
        audio = None
        if f32 is not None:
            audio = f32.as_numpy()
        elif i16 is not None:
            audio = i16.as_numpy()
        sr = pb_utils.get_input_tensor_by_name(request, "SAMPLE_RATE")
        sample_rate = None
        if sr is not None:
            v = sr.as_numpy().reshape(-1)
            if v.size != 1:
                raise StreamError("SAMPLE_RATE must hold exactly one value")
            sample_rate = int(v[0])
        return feature_extractor.FeatureRequest(
            corrid=request.correlation_id(),
            flags=request.flags(),
            audio=audio,
            sample_rate=sample_rate,
            parameters=request_parameters(request),
        )

    def finalize(self):
        self.sweeper.stop()
        self.log.info("unloading with %d open streams", len(self.step.store))
