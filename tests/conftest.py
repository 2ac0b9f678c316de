"""Shared fixtures: ONE real tritonserver for the session (readiness polled, log tail
shown on failure, always stopped), clients, and the audio the tests stream."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamasr.admission import ENV_LIMIT
from streamasr.contract import ModelContract
from streamasr.repository import TWO_PASS_MODELS
from streamasr.server import ServerConfig, ServerError, TritonServer, free_port
from streamasr_client.audio import load_audio
from streamasr_client.stream import AsrConnection

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "model_repository"
ACOUSTIC_MODEL = REPOSITORY / "acoustic_model" / "1" / "model.onnx"
# The recording the tests stream; STREAMASR_TEST_AUDIO runs the suite on another one.
DEMO_WAV = Path(os.environ.get("STREAMASR_TEST_AUDIO", ROOT / "assets" / "demo.wav"))


def start_server(repository: Path, log_path: Path,
                 max_active_streams: int | None = 0) -> TritonServer:
    """``max_active_streams``: the admission limit (streamasr.admission); 0 (no limit)
    by default, since tests leave streams open on purpose and share one server; None:
    the repository's own setting."""
    # Tests leave streams open on purpose; don't wait 30 s for them at shutdown.
    env = {} if max_active_streams is None else {ENV_LIMIT: str(max_active_streams)}
    cfg = ServerConfig(model_repository=repository, http_port=free_port(),
                       grpc_port=free_port(), metrics_port=free_port(), exit_timeout_s=3,
                       env=env)
    server = TritonServer(cfg, log_path=log_path)
    try:
        server.start(timeout_s=180)
    except ServerError as exc:
        server.stop()
        pytest.fail(f"tritonserver did not start:\n{exc}", pytrace=False)
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    srv = start_server(REPOSITORY, log)
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test that used a server, append the server's log tail."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for name in ("server", "short_ttl_server"):
            srv = item.funcargs.get(name)
            if isinstance(srv, TritonServer):
                rep.sections.append((f"{name} log tail", srv.log_tail(80)))


@pytest.fixture
def conn(server):
    c = AsrConnection(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def contract() -> ModelContract:
    return ModelContract.from_onnx(ACOUSTIC_MODEL)


@pytest.fixture(scope="session")
def demo_audio(contract) -> np.ndarray:
    if not DEMO_WAV.exists():
        pytest.fail(f"the bundled recording {DEMO_WAV} is missing")
    return load_audio(DEMO_WAV, contract.sample_rate)


@pytest.fixture(scope="session")
def onnx_session():
    import onnxruntime as ort

    return ort.InferenceSession(str(ACOUSTIC_MODEL), providers=["CPUExecutionProvider"])


def copy_repository(dst: Path, parameter_overrides: dict[str, dict[str, str]],
                    idle_us: dict[str, int] | None = None) -> Path:
    """A copy of the model repository with some config values changed, edited as
    protobuf (no text substitution); without the two-pass models (230 MB of Whisper
    that these servers do not need)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(REPOSITORY, dst, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in TWO_PASS_MODELS]
                    if Path(d) == REPOSITORY else [])
    for model in set(parameter_overrides) | set(idle_us or {}):
        path = dst / model / "config.pbtxt"
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        for k, v in parameter_overrides.get(model, {}).items():
            cfg.parameters[k].string_value = v
        if idle_us and model in idle_us:
            cfg.sequence_batching.max_sequence_idle_microseconds = idle_us[model]
        path.write_text(text_format.MessageToString(cfg))
    return dst
