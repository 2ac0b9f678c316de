"""Thin Triton python-backend adapters over the streamasr package.

Each ``backends/<name>/model.py`` re-exports one class from here as
``TritonPythonModel``.  The adapters only move tensors between ``pb_utils`` and the
plain-Python steps (``FeatureStep``, ``DecoderStep``, ...), so all behaviour is testable
without a server.  Importable only inside Triton (``triton_python_backend_utils``).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from ..admission import RefusedStreamEnded, StreamRefused
from ..contract import ModelContract
from ..decoding import StreamDecoder
from ..state import StreamError, StreamStore, Sweeper
from . import ctc_decoder, feature_extractor, final_pass, offline
from .common import (ConfigError, ModelConfig, parse_bool, parse_int, read_config,
                     request_parameters)


class _TritonLogHandler(logging.Handler):
    """Forward the package's logging to Triton's log, with the model name as prefix."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"[{self.prefix}] {record.getMessage()}"
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(msg)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(msg)
        else:
            pb_utils.Logger.log_verbose(msg)


def _setup_logging(prefix: str) -> logging.Logger:
    root = logging.getLogger("streamasr")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        root.addHandler(_TritonLogHandler(prefix))
    level = os.environ.get("STREAMASR_LOG_LEVEL", "INFO").upper()
    root.setLevel(getattr(logging, level, logging.INFO))
    root.propagate = False
    return logging.getLogger(f"streamasr.{prefix}")


def _error(message: str, unavailable: bool = False):
    """An error response; ``unavailable``: status UNAVAILABLE (retryable: gRPC
    UNAVAILABLE, HTTP 503 on unary calls; on a gRPC stream only the message travels)."""
    if unavailable:
        err = pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE)
    else:
        err = pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


def _strings(name: str, items: list[str]):
    return pb_utils.Tensor(name, np.array([s.encode("utf-8") for s in items], dtype=np.object_))


def _messages(name: str, msgs: list[dict]):
    """Result messages as a BYTES tensor, one JSON message per element."""
    return _strings(name, [json.dumps(m, ensure_ascii=False) for m in msgs])


def _read_messages(tensor) -> list[dict]:
    return [json.loads(m) for m in tensor.as_numpy().reshape(-1)]


def _utterances(utterances) -> "pb_utils.Tensor":
    """Two-pass utterances (streamasr.two_pass.Utterance) as the UTTERANCES tensor."""
    return pb_utils.Tensor("UTTERANCES", np.array([u.to_bytes() for u in utterances],
                                                  dtype=np.object_))


def _validate_io(cfg: ModelConfig, inputs: set[str], outputs: set[str]) -> None:
    have_in = {i["name"] for i in cfg.raw.get("input", [])}
    have_out = {o["name"] for o in cfg.raw.get("output", [])}
    if not inputs <= have_in or not outputs <= have_out:
        raise ConfigError(f"model {cfg.name!r} must declare inputs {sorted(inputs)} and outputs "
                          f"{sorted(outputs)}; config.pbtxt has {sorted(have_in)} / "
                          f"{sorted(have_out)}")


class _StreamMetrics:
    """Our Prometheus metrics on Triton's metrics port, labelled by model:
    streamasr_open_streams (gauge), streamasr_reclaimed_streams_total and
    streamasr_request_errors_total (counters).

    Published from execute() only, i.e. as of the model's last request: a pb_utils call
    from another thread races the stub's own IPC (tritonserver aborted with
    boost::interprocess::lock_exception under load while the sweeper thread published)."""

    _families: dict = {}
    _lock = threading.Lock()

    def __init__(self, model: str):
        fam = self._families
        if not fam:
            M = pb_utils.MetricFamily
            fam["open"] = M("streamasr_open_streams", "Streams with state held", M.GAUGE)
            fam["reclaimed"] = M("streamasr_reclaimed_streams_total",
                                 "Streams whose state was swept after going idle without END",
                                 M.COUNTER)
            fam["errors"] = M("streamasr_request_errors_total",
                              "Requests answered with an error", M.COUNTER)
            try:   # histograms: Triton >= 2.49's python backend
                fam["seconds"] = M("streamasr_request_seconds",
                                   "Time this step spent on one request (one audio chunk)",
                                   M.HISTOGRAM)
            except Exception:  # noqa: BLE001 - an older Triton: no histogram, no failure
                fam["seconds"] = None
        labels = {"model": model}
        self.open = fam["open"].Metric(labels=labels)
        self.reclaimed = fam["reclaimed"].Metric(labels=labels)
        self.errors = fam["errors"].Metric(labels=labels)
        self.seconds = None
        if fam["seconds"] is not None:
            try:
                self.seconds = fam["seconds"].Metric(labels=labels, buckets=self.BUCKETS)
            except Exception:  # noqa: BLE001
                self.seconds = None
        self._reported = 0
        self._open_reported: int | None = None

    BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

    def observe(self, durations: list[float]) -> None:
        if self.seconds is None or not durations:
            return
        with self._lock:
            for d in durations:
                self.seconds.observe(d)


    def sync(self, store: StreamStore) -> None:
        """Publish the store's figures.  ``reclaimed`` follows ``store.reclaimed``, which
        counts sweeps on the request path as well as the timer's."""
        with store.lock:
            reclaimed, n_open = store.reclaimed, len(store)
            delta = reclaimed - self._reported
            self._reported = reclaimed
        with self._lock:
            if delta:
                self.reclaimed.increment(delta)
            # Each metric call is a round trip to tritonserver: py-spy put this set() at
            # 71 % of the decoder step's time when it ran on every request.
            if n_open != self._open_reported:
                self.open.set(n_open)
                self._open_reported = n_open

    def error(self) -> None:
        with self._lock:
            self.errors.increment(1)


class _AdmissionMetrics:
    """Admission control on Triton's metrics port (streamasr.admission):
    streamasr_admitted_streams_total, streamasr_refused_streams_total (counters) and
    streamasr_stream_capacity (gauge: the limit; 0 = none).  Published from execute()."""

    def __init__(self, model: str, limit: int | None):
        M = pb_utils.MetricFamily
        labels = {"model": model}
        # the families must outlive their metrics: keep them
        self._families = (
            M("streamasr_admitted_streams_total", "Streams admitted at START", M.COUNTER),
            M("streamasr_refused_streams_total",
              "STARTs refused because the server held its limit of streams", M.COUNTER),
            M("streamasr_stream_capacity", "Streams admitted at most at once (0: no limit)",
              M.GAUGE))
        self.admitted, self.refused, self.capacity = (f.Metric(labels=labels)
                                                      for f in self._families)
        self.capacity.set(limit or 0)
        self._reported = (0, 0)

    def sync(self, counts: tuple[int, int]) -> None:
        if counts == self._reported:
            return
        (a0, r0), (a1, r1) = self._reported, counts
        self._reported = counts
        if a1 > a0:
            self.admitted.increment(a1 - a0)
        if r1 > r0:
            self.refused.increment(r1 - r0)


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise: thousands of
    swept streams' small arrays would stay in the stub's RSS for good)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):      # not glibc
        pass


def _start_sweeper(store: StreamStore, metrics: _StreamMetrics,
                   also=None) -> Sweeper:
    """Sweep on a timer too: Triton never tells a model that a sequence timed out.
    ``also``: a further pure-Python sweep to run each time (no pb_utils calls)."""
    trimmed = {"at": 0}

    def on_sweep(_n: int) -> None:
        if also is not None:
            also()
        # No pb_utils here (see _StreamMetrics); execute() publishes the counts.
        # after many streams went away (by TTL or END), at most once per sweep
        if store.reclaimed - trimmed["at"] >= 256 or (len(store) == 0 and
                                                      store.reclaimed != trimmed["at"]):
            trimmed["at"] = store.reclaimed
            _release_freed_memory()

    return Sweeper([store], max(store.ttl_s / 4, 0.05), on_sweep).start()


# ---------------------------------------------------------------------------------------
class FeatureExtractorModel:
    """Backend `streamasr_features` — the feature step of `streaming_asr`."""

    def initialize(self, args):
        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        _validate_io(self.cfg, {"AUDIO", "AUDIO_INT16", "SAMPLE_RATE"},
                     {"FEATURES", "STEP_INFO"})
        defaults = ctc_decoder.build_defaults(self._decoder_config())
        self.step = feature_extractor.build_step(self.cfg, validate_options=defaults.validate)
        self.metrics = _StreamMetrics(self.cfg.name)
        self.admission_metrics = _AdmissionMetrics(self.cfg.name, self.step.admission.limit)
        self.sweeper = _start_sweeper(self.step.store, self.metrics)
        self.log.info("ready: chunk %.0f ms, window %d frames, idle timeout %.1f s, "
                      "admits %s streams at once", self.step.contract.chunk_seconds * 1000,
                      self.step.contract.window_frames, self.step.store.ttl_s,
                      self.step.admission.limit or "any number of")

    def _decoder_config(self) -> ModelConfig:
        """The decoder model's config, to validate stream options at the START request
        (a stream rejected there has state in neither step)."""
        name = self.cfg.param("decoder_model", "ctc_decoder")
        return read_config(self.cfg.repository.parent / name)

    def execute(self, requests):
        responses, took = [], []
        for request in requests:
            t0 = time.perf_counter()
            try:
                r = self._read(request)
                result = self.step.process(r)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("FEATURES", result.features),
                    _strings("STEP_INFO", [result.info.to_json()]),
                ]))
            except (StreamRefused, RefusedStreamEnded) as exc:   # no fault: not counted
                responses.append(_error(str(exc), unavailable=True))
            except (StreamError, ValueError) as exc:
                self.metrics.error()
                responses.append(_error(str(exc)))
            except Exception as exc:  # never let one stream's bug take down the batch
                self.metrics.error()
                self.log.exception("unexpected error")
                responses.append(_error(f"internal error in feature_extractor: {exc}"))
            took.append(time.perf_counter() - t0)
        self.metrics.sync(self.step.store)
        self.admission_metrics.sync(self.step.admission.snapshot())
        self.metrics.observe(took)
        return responses

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
            corrid=request.correlation_id(), flags=request.flags(), audio=audio,
            sample_rate=sample_rate, parameters=request_parameters(request))

    def finalize(self):
        self.sweeper.stop()
        self.log.info("unloading with %d open streams", len(self.step.store))


# ---------------------------------------------------------------------------------------
class CtcDecoderModel:
    """Backend `streamasr_decoder` — the decoder step of `streaming_asr`."""

    def initialize(self, args):
        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        _validate_io(self.cfg, {"LOG_PROBS", "STEP_INFO", "FEATURES"}, {"RESULTS", "UTTERANCES"})
        self.step = ctc_decoder.build_step(self.cfg)
        self.metrics = _StreamMetrics(self.cfg.name)
        # lost requests are noticed (and what their streams parked freed) on the timer too
        self.sweeper = _start_sweeper(self.step.store, self.metrics,
                                      also=self.step.expire_gaps)
        self.log.info("ready: idle timeout %.1f s", self.step.store.ttl_s)

    def execute(self, requests):
        responses, took = [], []
        for request in requests:
            t0 = time.perf_counter()
            try:
                info_t = pb_utils.get_input_tensor_by_name(request, "STEP_INFO")
                info = feature_extractor.parse_step_info(info_t.as_numpy().reshape(-1)[0])
                lp = pb_utils.get_input_tensor_by_name(request, "LOG_PROBS").as_numpy()
                feats = pb_utils.get_input_tensor_by_name(request, "FEATURES")   # two-pass
                msgs, utts = self.step.process_full(ctc_decoder.DecoderRequest(
                    lp, info, feats.as_numpy() if feats is not None else None))
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    _messages("RESULTS", msgs),
                    _utterances(utts)]))
            except (StreamError, ValueError) as exc:
                self.metrics.error()
                responses.append(_error(str(exc)))
            except Exception as exc:
                self.metrics.error()
                self.log.exception("unexpected error")
                responses.append(_error(f"internal error in ctc_decoder: {exc}"))
            took.append(time.perf_counter() - t0)
        self.metrics.sync(self.step.store)
        self.metrics.observe(took)
        return responses

    def finalize(self):
        self.sweeper.stop()
        self.log.info("unloading with %d open streams", len(self.step.store))


# ---------------------------------------------------------------------------------------
class FinalPassModel:
    """Backend `streamasr_final_pass` — the last step of `streaming_asr_two_pass`: finals
    (and Whisper interims) re-decoded by Whisper (streamasr.two_pass); every other
    message passes unchanged.

    Decoupled, so a response need not wait for another's re-decode: requests with
    nothing to re-decode are answered inside ``execute``; the others go to one worker
    thread that re-decodes everything queued since its last batch in one batched call
    (streams' finals and interims share encoder calls and decoder loops)."""

    def initialize(self, args):
        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        _validate_io(self.cfg, {"RESULTS_IN", "UTTERANCES"}, {"RESULTS"})
        if not pb_utils.using_decoupled_model_transaction_policy(self.cfg.raw):
            raise ConfigError(f"model {self.cfg.name!r} must be decoupled "
                              "(model_transaction_policy {{ decoupled: true }}): re-decodes "
                              "must not hold up other streams' responses")
        self.step = final_pass.build_step(self.cfg, args.get("model_instance_kind") == "GPU")
        self.max_requests = parse_int("max_requests_per_batch", self.cfg.param(
            "max_requests_per_batch", str(int(self.cfg.raw.get("max_batch_size") or 1))), 1)
        self.metrics = _StreamMetrics(self.cfg.name)
        self._queue: "queue.Queue[tuple | None]" = queue.Queue()
        # streams with requests at the worker: their later requests queue behind them, so
        # an interim never shows an older agreement than the response before it
        self._queued: dict[int, int] = {}
        self._queued_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="final-pass-worker",
                                        daemon=True)
        self._worker.start()
        self.log.info("ready: Whisper re-decoder from %s", self.step.whisper_dir)

    def _send(self, sender, out) -> None:
        if isinstance(out, Exception):
            self.metrics.error()
            resp = _error(str(out))
        else:          # max_batch_size > 0: each response is a batch of one
            resp = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                "RESULTS", _messages("RESULTS", out).as_numpy()[None])])
        sender.send(resp, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                msgs = _read_messages(pb_utils.get_input_tensor_by_name(request, "RESULTS_IN"))
                utts = pb_utils.get_input_tensor_by_name(request, "UTTERANCES")
                utterances = self.step.parse(list(utts.as_numpy().reshape(-1))
                                             if utts is not None else [])
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
            except Exception as exc:
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
                    self._queue.put(None)       # stop after this batch
                    break
                batch.append(nxt)
            t0 = time.perf_counter()
            try:
                results = self.step.final_pass.process_many([(m, u) for _, m, u in batch])
            except Exception as exc:
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


# ---------------------------------------------------------------------------------------
class OnnxRuntimeModel:
    """Backend `onnxruntime` — a local stand-in for Triton's native ONNX Runtime backend.

    Serves an unchanged ``config.pbtxt`` (model file ``<version>/model.onnx``) and runs
    each batch Triton forms as ONE session call.  Uses the CUDA provider when the instance
    group asks for a GPU and onnxruntime-gpu offers it; otherwise the CPU.
    """

    def initialize(self, args):
        import onnxruntime as ort

        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        version = args.get("model_version") or "1"
        filename = self.cfg.raw.get("default_model_filename") or "model.onnx"
        path = self.cfg.repository / str(version) / filename
        if not path.exists():
            raise ConfigError(f"model {self.cfg.name!r}: no ONNX file at {path}")
        self.batching = int(self.cfg.raw.get("max_batch_size", 0)) > 0
        self.inputs = [i["name"] for i in self.cfg.raw.get("input", [])]
        self.outputs = [o["name"] for o in self.cfg.raw.get("output", [])]
        opts = ort.SessionOptions()
        threads = parse_int("intra_op_thread_count",
                            self.cfg.param("intra_op_thread_count", "0"), 0)
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        want_gpu = args.get("model_instance_kind") == "GPU"
        providers = ["CPUExecutionProvider"]
        if want_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider",
                                 {"device_id": int(args.get("model_instance_device_id", 0))}))
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if sorted(names_in) != sorted(self.inputs) or not set(self.outputs) <= set(names_out):
            raise ConfigError(f"model {self.cfg.name!r}: config I/O {self.inputs}/{self.outputs}"
                              f" does not match the ONNX graph's {names_in}/{names_out}")
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
            return [_error(f"acoustic model failed: {exc}") for _ in requests]
        responses, offset = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(o[offset:offset + n]))
                       for name, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            offset += n
        return responses


# ---------------------------------------------------------------------------------------
class ContractModel:
    """Backend `streamasr_contract` — serves the acoustic model's contract as JSON, so a
    client derives chunk size and sample rate from the model itself."""

    def initialize(self, args):
        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        self.contract_json = self.cfg.contract().to_json()

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[
            _strings("CONTRACT", [self.contract_json])]) for _ in requests]


# ---------------------------------------------------------------------------------------
class OfflineAsrModel:
    """Backend `streamasr_offline` — a whole recording in one request, the same messages
    a stream of it would produce (SageMaker `/invocations` calls this).  Runs the served
    acoustic model through BLS, in batches it accepts; with the request parameter
    ``two_pass=true`` the finals go through the served `final_pass` model too."""

    def initialize(self, args):
        self.cfg = ModelConfig.from_args(args)
        self.log = _setup_logging(self.cfg.name)
        _validate_io(self.cfg, {"AUDIO", "SAMPLE_RATE"}, {"RESULTS"})
        self.contract: ModelContract = self.cfg.contract()
        self.acoustic_model = self.cfg.param("acoustic_model", "acoustic_model")
        self.max_batch = parse_int("max_batch", self.cfg.param("max_batch", "8"), 1)
        self.max_seconds = float(self.cfg.param("max_audio_seconds", "600"))
        self.defaults = ctc_decoder.build_defaults(read_config(
            self.cfg.repository.parent / self.cfg.param("decoder_model", "ctc_decoder")))
        StreamDecoder(self.contract, *self.defaults.configs({}))   # load the LM now
        self.final_pass_model = self.cfg.param("final_pass_model", "final_pass")

    def _final_pass(self, msgs: list[dict], utterances) -> list[dict]:
        req = pb_utils.InferenceRequest(
            model_name=self.final_pass_model, requested_output_names=["RESULTS"],
            # final_pass batches requests: each is a batch of one
            inputs=[pb_utils.Tensor("RESULTS_IN", _messages("RESULTS_IN", msgs).as_numpy()[None]),
                    pb_utils.Tensor("UTTERANCES", _utterances(utterances).as_numpy()[None])])
        # final_pass is decoupled: one response (flagged final) per request
        for resp in req.exec(decoupled=True):
            if resp.has_error():
                raise RuntimeError(f"{self.final_pass_model}: {resp.error().message()}")
            out = pb_utils.get_output_tensor_by_name(resp, "RESULTS")
            if out is not None:
                return _read_messages(out)
        raise RuntimeError(f"{self.final_pass_model}: no response")

    def _run_model(self, features: np.ndarray) -> np.ndarray:
        req = pb_utils.InferenceRequest(
            model_name=self.acoustic_model,
            requested_output_names=[self.contract.output_name],
            inputs=[pb_utils.Tensor(self.contract.input_name, features)])
        resp = req.exec()
        if resp.has_error():
            raise RuntimeError(resp.error().message())
        return pb_utils.get_output_tensor_by_name(resp, self.contract.output_name).as_numpy()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
                sr_t = pb_utils.get_input_tensor_by_name(request, "SAMPLE_RATE")
                sr = int(sr_t.as_numpy().reshape(-1)[0]) if sr_t is not None else None
                options = request_parameters(request)
                two_pass = parse_bool("two_pass", options.pop("two_pass", False))
                msgs, utts = offline.transcribe_with_utterances(
                    self.contract, audio, sr, self._run_model, self.defaults, options,
                    self.max_batch, self.max_seconds, two_pass)
                if utts:
                    msgs = self._final_pass(msgs, utts)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    _messages("RESULTS", msgs)]))
            except (StreamError, ValueError) as exc:
                responses.append(_error(str(exc)))
            except Exception as exc:
                self.log.exception("unexpected error")
                responses.append(_error(f"internal error in offline_asr: {exc}"))
        return responses
