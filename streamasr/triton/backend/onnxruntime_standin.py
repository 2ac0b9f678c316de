"""Triton backend ``onnxruntime`` as a local stand-in: the machines without Triton's
native ONNX Runtime backend (the nvidia-pytriton wheel ships none) serve the acoustic
model through this python backend instead; the image uses the native one."""

from __future__ import annotations

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from streamasr.pipeline.common import ConfigError, parse_int
from streamasr.triton.backend import edge


class OnnxRuntimeModel:
    """Backend `onnxruntime` — a local stand-in for Triton's native ONNX Runtime backend.

    Serves an unchanged ``config.pbtxt`` (model file ``<version>/model.onnx``) and runs
    each batch Triton forms as ONE session call.  Uses the CUDA provider when the instance
    group asks for a GPU and onnxruntime-gpu offers it; otherwise the CPU.
    """

    def initialize(self, args):
        import onnxruntime as ort

        self.cfg, self.log = edge.loaded(args)
        version = args.get("model_version") or "1"
        filename = self.cfg.raw.get("default_model_filename") or "model.onnx"
        path = self.cfg.repository / str(version) / filename
        if not path.exists():
            raise ConfigError(f"model {self.cfg.name!r}: no ONNX file at {path}")
        self.batching = int(self.cfg.raw.get("max_batch_size", 0)) > 0
        self.inputs = [i["name"] for i in self.cfg.raw.get("input", [])]
        self.outputs = [o["name"] for o in self.cfg.raw.get("output", [])]
        opts = ort.SessionOptions()
        threads = parse_int(
            "intra_op_thread_count", self.cfg.param("intra_op_thread_count", "0"), 0
        )
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        want_gpu = args.get("model_instance_kind") == "GPU"
        providers = ["CPUExecutionProvider"]
        if want_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(
                0,
                (
                    "CUDAExecutionProvider",
                    {"device_id": int(args.get("model_instance_device_id", 0))},
                ),
            )
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(self.inputs) or not set(self.outputs) <= set(names_out):
            raise ConfigError(
                f"model {self.cfg.name!r}: config I/O {self.inputs}/{self.outputs}"
                f" does not match the ONNX graph's {names_in}/{names_out}"
            )
        self.log.info("loaded %s on %s", path.name, self.session.get_providers()[0])
        self._lock = threading.Lock()

    def execute(self, requests):
        if not self.batching:
            return [self._run([r])[0] for r in requests]
        return self._run(requests)

    def _run(self, requests):
        try:
            feeds, sizes = {}, []
            for name in self.inputs:
                arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
                feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                sizes = [len(a) for a in arrays]
            outs = self.session.run(self.outputs, feeds)
        except Exception as exc:
            self.log.exception("onnxruntime failed")
            return [edge.error_response(f"acoustic model failed: {exc}") for _ in requests]
        responses, offset = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(o[offset : offset + n]))
                for name, o in zip(self.outputs, outs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += n
        return responses
