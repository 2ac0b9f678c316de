"""Triton python backend ``streamasr_ctc_decoder``: the decoder step of ``streaming_asr``
(log-probs + STEP_INFO -> result messages), over ``triton_models.ctc_decoder``."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from streamasr.pipeline import ctc_decoder
from streamasr.pipeline.step_info import parse_step_info
from streamasr.triton.backend import edge


class CtcDecoderModel:
    """Backend `streamasr_ctc_decoder` — the decoder step of `streaming_asr`."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(
            args, {"LOG_PROBS", "STEP_INFO", "FEATURES"}, {"RESULTS", "UTTERANCES"}
        )
        self.step = ctc_decoder.build_step(self.cfg)
        self.metrics = edge.StreamMetrics(self.cfg.name)
        # lost requests are noticed (and what their streams parked freed) on the timer too
        self.sweeper = edge.start_sweeper(self.step.store, self.metrics, also=self.step.expire_gaps)
        self.log.info("ready: idle timeout %.1f s", self.step.store.ttl_s)

    def execute(self, requests):
        return edge.serve_each(
            requests, self._respond, self.log, "ctc_decoder", self.metrics, self.step.store
        )

    def _respond(self, request) -> list:
        info_t = pb_utils.get_input_tensor_by_name(request, "STEP_INFO")
        info = parse_step_info(info_t.as_numpy().reshape(-1)[0])
        lp = pb_utils.get_input_tensor_by_name(request, "LOG_PROBS").as_numpy()
        feats = pb_utils.get_input_tensor_by_name(request, "FEATURES")  # two-pass
        msgs, utts = self.step.process_full(
            ctc_decoder.DecoderRequest(lp, info, feats.as_numpy() if feats is not None else None)
        )
        return [edge.messages_tensor("RESULTS", msgs), edge.utterances_tensor(utts)]

    def finalize(self):
        self.sweeper.stop()
        self.log.info("unloading with %d open streams", len(self.step.store))
