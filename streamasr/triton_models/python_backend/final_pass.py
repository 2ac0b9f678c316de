"""Triton python backend ``streamasr_final_pass``: finals re-decoded by Whisper, the last
step of ``streaming_asr_two_pass``, over ``triton_models.final_pass``."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from .. import final_pass
from . import edge


class FinalPassModel:
    """Backend `streamasr_final_pass` — the last step of `streaming_asr_two_pass`: finals
    re-decoded by Whisper (streamasr.two_pass); every other message passes unchanged."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(args, {"RESULTS_IN", "UTTERANCES"}, {"RESULTS"})
        self.step = final_pass.build_step(self.cfg, args.get("model_instance_kind") == "GPU")
        self.metrics = edge.StreamMetrics(self.cfg.name)
        self.log.info("ready: Whisper re-decoder from %s", self.step.whisper_dir)

    def execute(self, requests):
        # the histogram times re-decodes, not pass-throughs
        return edge.serve_each(
            requests,
            self._respond,
            self.log,
            "final_pass",
            self.metrics,
            timed=lambda request: bool(self._utterances(request)),
        )

    @staticmethod
    def _utterances(request) -> list:
        utts = pb_utils.get_input_tensor_by_name(request, "UTTERANCES")
        return list(utts.as_numpy().reshape(-1)) if utts is not None else []

    def _respond(self, request) -> list:
        msgs = edge.read_messages(pb_utils.get_input_tensor_by_name(request, "RESULTS_IN"))
        out = self.step.process(msgs, self._utterances(request))
        return [edge.messages_tensor("RESULTS", out)]
