"""Triton python backend ``streamasr_final_pass``: finals (and Whisper interims)
re-decoded by Whisper, the last step of ``streaming_asr_two_pass``, over
``triton_models.final_pass``."""

from __future__ import annotations

import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from streamasr.pipeline import final_pass
from streamasr.pipeline.common import ConfigError, parse_int
from streamasr.triton.backend import edge


class FinalPassModel:
    """Backend `streamasr_final_pass` — the last step of `streaming_asr_two_pass`: finals
    (and Whisper interims) re-decoded by Whisper (streamasr.core.two_pass); every other
    message passes unchanged.

    Decoupled, so a response need not wait for another's re-decode: requests with
    nothing to re-decode are answered inside ``execute``; the others go to one worker
    thread that re-decodes everything queued since its last batch in one batched call
    (streams' finals and interims share encoder calls and decoder loops)."""

    def initialize(self, args):
        self.cfg, self.log = edge.loaded(args, {"RESULTS_IN", "UTTERANCES"}, {"RESULTS"})
        if not pb_utils.using_decoupled_model_transaction_policy(self.cfg.raw):
            raise ConfigError(
                f"model {self.cfg.name!r} must be decoupled "
                "(model_transaction_policy { decoupled: true }): re-decodes "
                "must not hold up other streams' responses"
            )
        self.step = final_pass.build_step(self.cfg, args.get("model_instance_kind") == "GPU")
        self.max_requests = parse_int(
            "max_requests_per_batch",
            self.cfg.param(
                "max_requests_per_batch", str(int(self.cfg.raw.get("max_batch_size") or 1))
            ),
            1,
        )
        self.metrics = edge.StreamMetrics(self.cfg.name)
        self._queue: "queue.Queue[tuple | None]" = queue.Queue()
        # streams with requests at the worker: their later requests queue behind them, so
        # an interim never shows an older agreement than the response before it
        self._queued: dict[int, int] = {}
        self._queued_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="final-pass-worker", daemon=True)
        self._worker.start()
        self.log.info("ready: Whisper re-decoder from %s", self.step.whisper_dir)

    def _send(self, sender, out) -> None:
        if isinstance(out, Exception):
            self.metrics.error()
            resp = edge.error_response(str(out))
        else:  # max_batch_size > 0: each response is a batch of one
            resp = pb_utils.InferenceResponse(
                output_tensors=[edge.batch_of_one(edge.messages_tensor("RESULTS", out))]
            )
        sender.send(resp, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                msgs = edge.read_messages(pb_utils.get_input_tensor_by_name(request, "RESULTS_IN"))
                utts = pb_utils.get_input_tensor_by_name(request, "UTTERANCES")
                utterances = self.step.parse(
                    list(utts.as_numpy().reshape(-1)) if utts is not None else []
                )
                streams = {u.stream for u in utterances}
                with self._queued_lock:
                    behind = any(st in self._queued for st in streams)
                    if behind or self.step.needs_decode(utterances):
                        for st in streams:
                            self._queued[st] = self._queued.get(st, 0) + 1
                        self._queue.put((sender, msgs, utterances))
                        continue
                out = self.step.final_pass.process_many([(msgs, utterances)])[0]
            except ValueError as exc:
                out = exc
            except Exception as exc:  # noqa: BLE001 - one stream's bug must not fail others
                self.log.exception("unexpected error")
                out = RuntimeError(f"internal error in final_pass: {exc}")
            self._send(sender, out)
        return None

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_requests:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            try:
                results = self.step.final_pass.process_many([(m, u) for _, m, u in batch])
            except Exception as exc:  # noqa: BLE001 - answered as an internal error
                self.log.exception("unexpected error")
                results = [RuntimeError(f"internal error in final_pass: {exc}")] * len(batch)
            self.metrics.observe([time.perf_counter() - t0])
            for (sender, _, utterances), out in zip(batch, results):
                self._send(sender, out)
                with self._queued_lock:
                    for st in {u.stream for u in utterances}:
                        left = self._queued.pop(st) - 1
                        if left:
                            self._queued[st] = left

    def finalize(self):
        # re-decode what is queued, then stop (Triton waits for in-flight requests)
        self._queue.put(None)
        self._worker.join(timeout=60)
