"""Triton python backend ``streamasr_offline_asr``: a whole recording in one request
(``offline_asr``), over ``triton_models.offline_asr``."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from streamasr.core.decoding import StreamDecoder
from streamasr.pipeline import ctc_decoder, offline_asr
from streamasr.pipeline.common import parse_bool, parse_int, request_parameters
from streamasr.protocol.contract import ModelContract
from streamasr.triton.backend import edge


class OfflineAsrModel:
    """Backend `streamasr_offline_asr` — a whole recording in one request, the same messages
    a stream of it would produce (SageMaker `/invocations` calls this).  Runs the served
    acoustic model through BLS, in batches it accepts; with the request parameter
    ``two_pass=true`` the finals go through the served `final_pass` model too."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(args, {"AUDIO", "SAMPLE_RATE"}, {"RESULTS"})
        self.contract: ModelContract = self.cfg.contract()
        self.acoustic_model = self.cfg.param("acoustic_model", "acoustic_model")
        self.max_batch = parse_int("max_batch", self.cfg.param("max_batch"), 1)
        self.max_seconds = float(self.cfg.param("max_audio_seconds", "600"))
        # Decodes as the stream does: the decoding its config's `decoder_model` serves.
        self.defaults = ctc_decoder.served_defaults(
            self.cfg.repository.parent / self.cfg.param("decoder_model")
        )
        StreamDecoder(self.contract, *self.defaults.configs({}))  # load the LM now
        self.final_pass_model = self.cfg.param("final_pass_model", "final_pass")

    def _final_pass(self, msgs: list[dict], utterances) -> list[dict]:
        req = pb_utils.InferenceRequest(
            model_name=self.final_pass_model,
            requested_output_names=["RESULTS"],
            # final_pass batches requests: each is a batch of one
            inputs=[
                edge.batch_of_one(edge.messages_tensor("RESULTS_IN", msgs)),
                edge.batch_of_one(edge.utterances_tensor(utterances)),
            ],
        )
        # final_pass is decoupled: one response (flagged final) per request
        for resp in req.exec(decoupled=True):
            if resp.has_error():
                raise RuntimeError(f"{self.final_pass_model}: {resp.error().message()}")
            out = pb_utils.get_output_tensor_by_name(resp, "RESULTS")
            if out is not None:
                return edge.read_messages(out)
        raise RuntimeError(f"{self.final_pass_model}: no response")

    def _run_model(self, features: np.ndarray) -> np.ndarray:
        req = pb_utils.InferenceRequest(
            model_name=self.acoustic_model,
            requested_output_names=[self.contract.output_name],
            inputs=[pb_utils.Tensor(self.contract.input_name, features)],
        )
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        return pb_utils.get_output_tensor_by_name(resp, self.contract.output_name).as_numpy()

    def execute(self, requests):
        return edge.serve_each(requests, self._respond, self.log, "offline_asr")

    def _respond(self, request) -> list:
        audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
        sr_t = pb_utils.get_input_tensor_by_name(request, "SAMPLE_RATE")
        sr = int(sr_t.as_numpy().reshape(-1)[0]) if sr_t is not None else None
        options = request_parameters(request)
        two_pass = parse_bool("two_pass", options.pop("two_pass", False))
        msgs, utts = offline_asr.transcribe_with_utterances(
            self.contract,
            audio,
            sr,
            self._run_model,
            self.defaults,
            options,
            self.max_batch,
            self.max_seconds,
            two_pass,
        )
        if utts:
            msgs = self._final_pass(msgs, utts)
        return [edge.messages_tensor("RESULTS", msgs)]
