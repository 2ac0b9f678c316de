"""Triton python backend ``streamasr_final_pass``: finals (and Whisper interims)
re-decoded by Whisper, the last step of ``streaming_asr_two_pass``, over
``triton_models.final_pass``."""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import triton_python_backend_utils as pb_utils

from streamasr.core.two_pass import Refresh
from streamasr.pipeline import final_pass
from streamasr.pipeline.common import ConfigError, parse_int
from streamasr.triton.backend import edge

#: Highest niceness Linux accepts.
MAX_NICENESS = 19


class FinalPassModel:
    """Backend `streamasr_final_pass` — the last step of `streaming_asr_two_pass`: finals
    (and Whisper interims) re-decoded by Whisper (streamasr.core.two_pass); every other
    message passes unchanged.

    Decoupled, so a response need not wait for another's re-decode: requests without a
    final to re-decode are answered inside ``execute``; the others go to one worker
    thread that re-decodes everything queued since its last batch in one batched call.

    Whisper interims never wait either: a request whose interim asks for a refresh is
    answered at once (the last refresh's words, then newer CTC words), and its response
    stays open; a second thread (niced: it takes spare CPU) re-decodes the newest
    refresh of every stream in one batch and sends each as a second response of its
    request (an interim marked ``refresh: true``), then closes it.  A refresh overtaken
    by a newer one of its stream, or by its utterance's final, closes with nothing."""

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
        # Whisper interim refreshes are best effort: at this niceness they take the CPU
        # the streaming steps (and finals) leave, so they never delay a chunk's answer
        self.niceness = parse_int("refresh_niceness", self.cfg.param("refresh_niceness"), 0)
        if self.niceness > MAX_NICENESS:
            raise ConfigError(
                f"model {self.cfg.name!r}: refresh_niceness must be 0..{MAX_NICENESS}, "
                f"got {self.niceness}"
            )
        self.metrics = edge.StreamMetrics(self.cfg.name)
        self._cv = threading.Condition()
        self._stopping = False
        self._finals: collections.deque[tuple] = collections.deque()
        # streams with requests at the worker: their later requests queue behind them, so
        # an interim never shows an older agreement than the response before it
        self._queued: dict[int, int] = {}
        # per stream its newest refresh not yet taken: (the request's open sender, job)
        self._refresh: dict[int, tuple[Any, Refresh]] = {}
        # Three threads answer (execute, the finals worker, the refresh thread): one at a
        # time, so Triton's gRPC stream never gets two of this model's responses at once
        # (tritonserver 2.51 aborted in TRITONBACKEND_ResponseSend / proto_buffer_writer
        # under concurrent decoupled responses: the image test, 2 of 3 runs).
        self._send_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name="final-pass-worker", daemon=True),
            threading.Thread(target=self._refresh_work, name="final-pass-refresh", daemon=True),
        ]
        for t in self._threads:
            t.start()
        self.log.info("ready: Whisper re-decoder from %s", self.step.whisper_dir)

    def _send(self, sender, out, refresh: Refresh | None = None) -> None:
        """A request's answer; with a refresh the response stays open for it."""
        if isinstance(out, Exception):
            self.metrics.error()
            self._locked_send(
                sender,
                edge.error_response(str(out)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
            return
        resp = self._response(out)
        if refresh is None:
            self._locked_send(sender, resp, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self._locked_send(sender, resp)
        overtaken: tuple[Any, Refresh] | None
        with self._cv:
            if self._stopping:  # the refresh thread is gone
                overtaken = (sender, refresh)
            else:
                overtaken = self._refresh.pop(refresh.stream, None)
                self._refresh[refresh.stream] = (sender, refresh)
                self._cv.notify_all()
        if overtaken is not None:
            self._locked_send(overtaken[0], flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _locked_send(self, sender, response=None, flags: int = 0) -> None:
        with self._send_lock:
            sender.send(response, flags=flags)

    @staticmethod
    def _response(msgs: list[dict]):
        # max_batch_size > 0: each response is a batch of one
        return pb_utils.InferenceResponse(
            output_tensors=[edge.batch_of_one(edge.messages_tensor("RESULTS", msgs))]
        )

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
                with self._cv:
                    behind = any(st in self._queued for st in streams)
                    if behind or self.step.needs_decode(utterances):
                        for st in streams:
                            self._queued[st] = self._queued.get(st, 0) + 1
                        self._finals.append((sender, msgs, utterances))
                        self._cv.notify_all()
                        continue
                (out,), (refresh,) = self.step.final_pass.answer_many([(msgs, utterances)])
            except ValueError as exc:
                out, refresh = exc, None
            except Exception as exc:  # noqa: BLE001 - one stream's bug must not fail others
                self.log.exception("unexpected error")
                out, refresh = RuntimeError(f"internal error in final_pass: {exc}"), None
            self._send(sender, out, refresh)
        return None

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._finals or self._stopping)
                if not self._finals:
                    return
                batch = [
                    self._finals.popleft() for _ in range(min(self.max_requests, len(self._finals)))
                ]
            t0 = time.perf_counter()
            try:
                results, refreshes = self.step.final_pass.answer_many([(m, u) for _, m, u in batch])
            except Exception as exc:  # noqa: BLE001 - answered as an internal error
                self.log.exception("unexpected error")
                results = [RuntimeError(f"internal error in final_pass: {exc}")] * len(batch)
                refreshes = [None] * len(batch)
            self.metrics.observe([time.perf_counter() - t0])
            for (sender, _, utterances), out, refresh in zip(batch, results, refreshes):
                self._send(sender, out, refresh)
                with self._cv:
                    for st in {u.stream for u in utterances}:
                        left = self._queued.pop(st) - 1
                        if left:
                            self._queued[st] = left

    def _refresh_work(self) -> None:
        try:  # Linux: a thread's own niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.niceness)
        except OSError as exc:
            self.log.warning("refresh thread keeps normal priority: %s", exc)
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._refresh or self._stopping)
                if self._stopping:
                    jobs, self._refresh = list(self._refresh.values()), {}
                    for sender, _ in jobs:
                        self._locked_send(
                            sender, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                        )
                    return
                streams = list(self._refresh)[: self.max_requests]
                jobs = [self._refresh.pop(st) for st in streams]
            try:
                msgs = self.step.final_pass.refresh_many([job for _, job in jobs])
            except Exception:  # noqa: BLE001 - a refresh is best effort: the interim stands
                self.log.exception("unexpected error in an interim refresh")
                msgs = [None] * len(jobs)
            fp = self.step.final_pass
            for (sender, job), msg in zip(jobs, msgs):
                # the lock orders this send before its utterance's final (noted under it
                # before the final's re-decode) or makes it stale
                with fp.agreements.lock:
                    if msg is not None and fp.is_open(job):
                        self._locked_send(
                            sender,
                            self._response([msg]),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                        )
                        continue
                self._locked_send(sender, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        # re-decode the finals queued, close open refreshes, then stop (Triton waits for
        # in-flight requests)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=60)
