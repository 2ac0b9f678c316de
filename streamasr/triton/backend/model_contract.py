"""Triton python backend ``streamasr_model_contract``: the acoustic model's contract as JSON
(``model_contract``)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from streamasr.triton.backend import edge


class ModelContractModel:
    """Backend `streamasr_model_contract` — serves the acoustic model's contract as JSON, so a
    client derives chunk size and sample rate from the model itself."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(args)
        self.contract_json = self.cfg.contract().to_json()

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[edge.strings_tensor("CONTRACT", [self.contract_json])]
            )
            for _ in requests
        ]
