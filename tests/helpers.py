"""Helpers the test modules share (fixtures live in conftest.py): paths, servers started
for a test, streaming and hand-built requests, metrics, docker/serve, and synthetic
decoder inputs.  Tests import from here, never from one another."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from streamasr.core.admission import ENV_LIMIT
from streamasr.core.decoding import DecoderConfig, EndpointConfig, StreamDecoder
from streamasr.pipeline import ctc_decoder, offline_asr
from streamasr.pipeline.common import read_config
from streamasr.protocol import STREAM_MODEL
from streamasr.protocol.contract import FeatureSpec, ModelContract
from streamasr.tools.serve_process import ServeFailed, ServeProcess, loopback_env
from streamasr.triton import repository
from streamasr.triton.repository import TWO_PASS_MODELS
from streamasr.triton.server import (
    ServerConfig,
    ServerError,
    TritonServer,
    free_port,
    free_ports,
)
from streamasr_client.stream import AsrConnection

# -- the repository, its files, and real servers -----------------------------------------

ROOT = Path(__file__).resolve().parent.parent


REPOSITORY = ROOT / "model_repository"


ACOUSTIC_MODEL = REPOSITORY / "acoustic_model" / "1" / "model.onnx"


# The recording the tests stream; STREAMASR_TEST_AUDIO runs the suite on another one.
DEMO_WAV = Path(os.environ.get("STREAMASR_TEST_AUDIO", ROOT / "assets" / "demo.wav"))


def start_server(
    repository: Path, log_path: Path, max_active_streams: int | None = 0
) -> TritonServer:
    """``max_active_streams``: the admission limit (streamasr.core.admission); 0 (no limit)
    by default, since tests leave streams open on purpose and share one server; None:
    the repository's own setting."""
    # Tests leave streams open on purpose; don't wait 30 s for them at shutdown.
    env = {} if max_active_streams is None else {ENV_LIMIT: str(max_active_streams)}
    cfg = ServerConfig(
        model_repository=repository,
        **free_ports(),
        exit_timeout_s=3,
        env=env,
    )
    server = TritonServer(cfg, log_path=log_path)
    try:
        server.start(timeout_s=180)
    except ServerError as exc:
        server.stop()
        pytest.fail(f"tritonserver did not start:\n{exc}", pytrace=False)
    return server


def copy_repository(
    dst: Path, parameter_overrides: dict[str, dict[str, str]], idle_us: dict[str, int] | None = None
) -> Path:
    """A copy of the model repository with some config values changed, without the
    two-pass models (230 MB of Whisper that these servers do not need)."""
    return repository.copy_repository(
        REPOSITORY, dst, parameter_overrides, idle_us=idle_us, leave_out=TWO_PASS_MODELS
    )


# -- the variants server: several configurations in ONE tritonserver ---------------------
# Each variant is its own feature_extractor_<v> / ctc_decoder_<v> / streaming_asr_<v> with
# changed config values (one server start instead of one per configuration); the base
# names carry the admission limit (they answer streamasr.core.admission's tests, which
# need the server's own setting: no STREAMASR_MAX_ACTIVE_STREAMS override on this server).
ADMISSION_LIMIT = 2
# isolation (test_isolation): reorder timeout within the test; well above an overtake's
# length on a loaded 2-core machine; small parking budgets, reached with a few MB.
REORDER_TIMEOUT_S = 3.0
PARKED_PER_STREAM = 1 << 20
PARKED_TOTAL = 3 << 20
# lead (test_backlog): a stream closed once its audio runs this far ahead of real time.
LEAD_S = 3.0
STREAMING_STEPS = ("feature_extractor", "ctc_decoder")


@dataclass(frozen=True)
class Variant:
    """A configuration of the streaming models: config values per step, Triton idle time."""

    parameters: dict[str, dict[str, str]]
    idle_us: dict[str, int] = field(default_factory=dict)


def variants() -> dict[str, Variant]:
    from streamasr import protocol
    from streamasr.core import admission

    unlimited = {admission.CONFIG_KEY: "0"}
    return {
        "short_ttl": Variant(
            {
                "feature_extractor": {
                    "stream_idle_timeout_s": str(TTL_S),
                    "max_stream_seconds": str(MAX_STREAM_S),
                    **unlimited,
                },
                "ctc_decoder": {"stream_idle_timeout_s": str(TTL_S)},
            },
            {"feature_extractor": TRITON_IDLE_US},
        ),
        "isolation": Variant(
            {
                "feature_extractor": unlimited,
                "ctc_decoder": {
                    "reorder_timeout_s": str(REORDER_TIMEOUT_S),
                    "max_parked_bytes_per_stream": str(PARKED_PER_STREAM),
                    "max_parked_bytes": str(PARKED_TOTAL),
                },
            }
        ),
        "lead": Variant(
            {"feature_extractor": {protocol.MAX_LEAD_PARAMETER: str(LEAD_S), **unlimited}}
        ),
        # the committed setting: the step calibrates its own limit while it loads
        "calibrated": Variant({"feature_extractor": {admission.CONFIG_KEY: admission.MEASURED}}),
    }


def variants_repository(dst: Path) -> Path:
    """A copy of the repository (no two-pass models) whose base streaming models are
    limited to ADMISSION_LIMIT streams, plus one renamed copy of them per variant."""
    from streamasr.core import admission
    from streamasr.triton.repository import edit_config, override

    repo = repository.copy_repository(
        REPOSITORY,
        dst,
        {"feature_extractor": {admission.CONFIG_KEY: str(ADMISSION_LIMIT)}},
        leave_out=TWO_PASS_MODELS,
        link_suffixes=(".onnx", ".arpa"),
    )
    for suffix, v in variants().items():
        renamed = {m: f"{m}_{suffix}" for m in (*STREAMING_STEPS, STREAM_MODEL)}
        for model, name in renamed.items():
            shutil.copytree(repo / model, repo / name, symlinks=True)

            def change(cfg, model=model, name=name, v=v, renamed=renamed):
                cfg.name = name
                override(cfg, v.parameters.get(model, {}), v.idle_us.get(model))
                for step in cfg.ensemble_scheduling.step:
                    step.model_name = renamed.get(step.model_name, step.model_name)

            edit_config(repo / name / "config.pbtxt", change)
    return repo


class VariantServer:
    """One variant of the variants server, used like a server of its own: the same
    addresses and process, model names with its suffix (``suffix`` None: the base names)."""

    def __init__(self, server: TritonServer, suffix: str | None):
        self.server, self.suffix = server, suffix

    def __getattr__(self, name: str):
        return getattr(self.server, name)

    def model(self, step: str = STREAM_MODEL) -> str:
        return f"{step}_{self.suffix}" if self.suffix else step

    def connect(self, **kwargs) -> AsrConnection:
        return AsrConnection(self.server.grpc_url, model=self.model(), **kwargs)


# -- streaming through a real server -----------------------------------------------------


def reference_messages(contract, onnx_session, audio, options=None) -> list[dict]:
    """Whole-file decode in this process: the same ONNX file, no server."""
    defaults = ctc_decoder.build_defaults(read_config(REPOSITORY / "ctc_decoder"))

    def run(features):
        return onnx_session.run([contract.output_name], {contract.input_name: features})[0]

    return offline_asr.transcribe_with_utterances(
        contract,
        audio,
        None,
        run,
        defaults,
        options or {},
        max_batch=16,
        max_seconds=3600,
        keep_utterances=False,
    )[0]


def finals_with_words(messages) -> list[tuple[str, list]]:
    """(transcript, words) of each final, for exact comparison."""
    out = []
    for m in messages:
        if m.get("type") == "Results" and m["is_final"]:
            alt = m["channel"]["alternatives"][0]
            out.append(
                (alt["transcript"], [(w["word"], w["start"], w["end"]) for w in alt["words"]])
            )
    return out


def stream(conn: AsrConnection, audio: np.ndarray, chunk: int, options=None):
    s = conn.open_session(options)
    for i in range(0, len(audio), chunk):
        s.send(audio[i : i + chunk])
    s.close()
    return s


# -- hand-built requests -----------------------------------------------------------------


def raw_request(session, inputs, *, start, end=False, sequence_id=None, params=None):
    """Send a hand-built request through a session's slot on the shared stream."""
    req = service_pb2.ModelInferRequest(model_name=session.conn.model)
    for name, dtype, shape, data in inputs:
        t = req.inputs.add(name=name, datatype=dtype)
        t.shape.extend(shape)
        req.raw_input_contents.append(data)
    sid = session.sequence_id if sequence_id is None else sequence_id
    if isinstance(sid, str):  # Triton also takes string sequence ids
        req.parameters["sequence_id"].string_param = sid
    else:
        req.parameters["sequence_id"].int64_param = sid
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    for k, v in (params or {}).items():
        req.parameters[k].string_param = v
    session.send_request(req)


def f32(a):
    a = np.asarray(a, np.float32)
    return ("AUDIO", "FP32", [len(a)], a.tobytes())


# -- metrics and polling -----------------------------------------------------------------


class Bystander:
    """A good stream sent in two halves around a fault; ``finish`` checks its finals."""

    def __init__(self, conn, contract, audio, expected):
        self.s = conn.open_session()
        self.audio, self.expected = audio, expected
        self.chunk = contract.chunk_samples
        self.half = (len(audio) // 2) // self.chunk * self.chunk
        for i in range(0, self.half, self.chunk):
            self.s.send(audio[i : i + self.chunk])

    def finish(self):
        for i in range(self.half, len(self.audio), self.chunk):
            self.s.send(self.audio[i : i + self.chunk])
        self.s.close()
        self.s.wait(timeout=180)
        assert self.s.errors == [], self.s.errors
        assert finals_with_words(self.s.messages) == self.expected


def metrics_text(server) -> str:
    url = f"http://{server.config.host}:{server.config.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(server, name: str, model: str) -> float:
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', metrics_text(server), re.M)
    assert m, f"{name}{{model={model!r}}} not in the metrics"
    return float(m.group(1))


def build_wheel(dest: Path) -> Path:
    """The wheel built from a copy of the sources (PEP 517 backend, no network)."""
    src = dest / "streamasr-src"
    src.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("streamasr", "client"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(dest)!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dest / out.stdout.strip().splitlines()[-1]


def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def publish_metrics(server) -> None:
    """The steps publish their metrics from execute(), so make both run once: a
    one-request stream (START and END together) that leaves nothing open."""
    model = server.model() if isinstance(server, VariantServer) else STREAM_MODEL
    with AsrConnection(server.grpc_url, model=model) as c:
        s = c.open_session()
        s.close(np.zeros(1600, np.float32))
        s.wait()
        assert s.errors == [], s.errors


# The short-TTL server (conftest.short_ttl_server): streams reclaimed within seconds, a
# late request still inside Triton's own idle window (so our step answers "expired"), and
# a per-stream audio limit above the bystander's audio (at most 25 s).  4 s, not less: on a
# 2-core machine at load 15 a bystander's pause around a fault reached 2 s and expired it.
TTL_S = 4.0
TRITON_IDLE_US = 20_000_000  # > 3 x TTL_S (test_reclaim's late request)
MAX_STREAM_S = 30.0


def all_reclaimed(server: VariantServer, since: dict[str, float], n: int) -> bool:
    publish_metrics(server)
    return all(
        metric(server, "streamasr_open_streams", server.model(m)) == 0
        and metric(server, "streamasr_reclaimed_streams_total", server.model(m)) - since[m] >= n
        for m in STREAMING_STEPS
    )


def reclaimed_now(server: VariantServer) -> dict[str, float]:
    publish_metrics(server)
    return {
        m: metric(server, "streamasr_reclaimed_streams_total", server.model(m))
        for m in STREAMING_STEPS
    }


# -- docker/serve as SageMaker runs it ---------------------------------------------------


needs_demo = pytest.mark.skipif(
    not DEMO_WAV.exists(), reason=f"{DEMO_WAV} not there yet (data helper adds it)"
)


def sagemaker_env(tmp: Path, **extra: str) -> dict[str, str]:
    defaults = {
        # tests run more sessions at once than the measured limit (test_admission
        # tests admission control on a server of its own)
        "STREAMASR_MAX_ACTIVE_STREAMS": "0",
        # ... and so overload it: a canary may then wait longer than the 4 s that
        # means "wedged" in production; the shared server must not exit over it
        # (tests/e2e/test_health.py tests the defaults on servers of its own)
        "STREAMASR_HEALTH_CANARY_DEADLINE": "60",
        "STREAMASR_HEALTH_EXIT_AFTER": "0",
        # ... nor refuse sessions over its canary's queue delay (the guard is tested
        # in tests/integration/test_admission.py with a gateway of its own)
        "STREAMASR_ADMISSION_MAX_QUEUE_DELAY": "0",
    }
    return loopback_env(REPOSITORY, **{**defaults, **extra})


class Serve(ServeProcess):
    """docker/serve as a child process; a failed start fails the test with its log."""

    def wait_ready(self, timeout: float = 180) -> list[int]:
        try:
            return super().wait_ready(timeout)
        except ServeFailed as exc:
            pytest.fail(str(exc), pytrace=False)


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (openssl CLI)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    cert, key = folder / "grpc.crt", folder / "grpc.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


class Launcher:
    """The launcher (`python -m streamasr.triton.server`) as a child process, with a self-signed
    gRPC certificate and a 1 s health poll; ``repository``: the model repository it
    serves (its default when None)."""

    def __init__(self, root: Path, repository: Path | None = None):
        self.cert_path, key = make_cert(root)
        ports = dict(http=free_port(), grpc=free_port(), metrics=free_port())
        self.log_path = root / "launcher.log"
        self._out = open(self.log_path, "wb")
        argv = [
            sys.executable,
            "-m",
            "streamasr.triton.server",
            "--http-port",
            str(ports["http"]),
            "--grpc-port",
            str(ports["grpc"]),
            "--metrics-port",
            str(ports["metrics"]),
            "--grpc-cert",
            str(self.cert_path),
            "--grpc-key",
            str(key),
            "--health-interval",
            "1",
            "--home",
            str(root / "home"),
        ]
        if repository is not None:
            argv += ["--model-repository", str(repository)]
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.cert = self.cert_path.read_bytes()
        self.grpc = f"127.0.0.1:{ports['grpc']}"
        self.http = f"127.0.0.1:{ports['http']}"

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the launcher logs that it is watching its models' health."""

        def watching() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            return "watching" in self.log_path.read_text()

        poll(watching, timeout, "the launcher to be ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def triton_children(pid: int) -> list[int]:
    from streamasr.triton.server import child_processes

    return [
        p for p, argv in child_processes(pid).items() if argv and argv[0].endswith("tritonserver")
    ]


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# -- synthetic log-prob matrices for the decoder -----------------------------------------

BLANK = "_"  # path symbol for the blank token


VOCAB = ("<blank>", " ", *string.ascii_lowercase, "'")


SUBSAMPLING = 4  # 10 ms feature frames -> 40 ms output frames


FRAME_S = 0.04


PEAK = 0.9  # posterior of each frame's path token in synthetic matrices


RULE2_FRAMES = 30  # 1.2 s default rule 2 / 40 ms


RULE1_FRAMES = 60  # 2.4 s default rule 1 / 40 ms


def make_contract(vocabulary=VOCAB, word_boundary="space") -> ModelContract:
    return ModelContract(
        features=FeatureSpec(),
        chunk_frames=32,
        left_frames=16,
        right_frames=8,
        subsampling=SUBSAMPLING,
        vocabulary=tuple(vocabulary),
        blank_id=0,
        word_boundary=word_boundary,
    ).validate()


CONTRACT = make_contract()


def path_matrix(path, contract=CONTRACT, peak=PEAK) -> np.ndarray:
    """[T, V] log-probs whose frame t has argmax ``path[t]`` with posterior ``peak``.

    ``path`` is a string (one character per frame, "_" = blank) or a list of tokens."""
    vocab = list(contract.vocabulary)
    V = len(vocab)
    rest = (1.0 - peak) / (V - 1)
    lp = np.full((len(path), V), np.log(rest), np.float32)
    for t, sym in enumerate(path):
        lp[t, contract.blank_id if sym == BLANK else vocab.index(sym)] = np.log(peak)
    return lp


def decoded_finals(msgs: list[dict]) -> list[tuple]:
    out = []
    for m in msgs:
        if m["type"] == "Results" and m["is_final"]:
            alt = m["channel"]["alternatives"][0]
            out.append(
                (
                    alt["transcript"],
                    m["speech_final"],
                    m["start"],
                    m["duration"],
                    alt["confidence"],
                    [(w["word"], w["start"], w["end"], w["confidence"]) for w in alt["words"]],
                )
            )
        elif m["type"] == "UtteranceEnd":
            out.append(("UtteranceEnd", m["last_word_end"]))
    return out


def random_path(rng: random.Random, n_words: int) -> str:
    """Words as frame paths (letters held 1-3 frames, sometimes repeated letters with a
    blank between), separated by spaces or by silences long enough for endpoints."""
    parts = []
    for _ in range(n_words):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 5)))
        frames = []
        for ch in word:
            frames.append(ch * rng.randint(1, 3))
            frames.append(BLANK * rng.randint(0, 2))
        parts.append("".join(frames))
        gap = rng.choice(
            [
                " ",
                "_ _",
                BLANK * rng.randint(1, 10),
                BLANK * rng.randint(RULE2_FRAMES - 2, RULE2_FRAMES + 5),
                BLANK * rng.randint(RULE1_FRAMES, RULE1_FRAMES + 20),
            ]
        )
        parts.append(gap)
    return "".join(parts)


def split_points(T: int, rng: random.Random, max_piece: int) -> list[int]:
    cuts, pos = [0], 0
    while pos < T:
        pos = min(T, pos + rng.randint(0, max_piece))  # 0: empty requests too
        cuts.append(pos)
    return cuts


def stream_pieces(
    lp: np.ndarray, cuts: list[int], config=None, endpoint=None, contract=CONTRACT
) -> list[dict]:
    dec = StreamDecoder(
        contract, config=config or DecoderConfig(), endpoint=endpoint or EndpointConfig()
    )
    msgs = []
    for a, b in zip(cuts, cuts[1:]):
        msgs += dec.accept(lp[a:b])
    assert dec.frames_decoded == lp.shape[0]
    return msgs + dec.close()
