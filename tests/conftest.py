"""Shared fixtures: ONE real tritonserver for the session (readiness polled, log tail
shown on failure, always stopped), ONE docker/serve for the container's routes, clients,
and the audio the tests stream.  Helpers are in helpers.py."""

from __future__ import annotations

import numpy as np
import pytest

from streamasr.protocol.contract import ModelContract
from streamasr.triton.server import TritonServer
from streamasr_client.audio import load_audio
from streamasr_client.stream import AsrConnection

from .helpers import (
    ACOUSTIC_MODEL,
    DEMO_WAV,
    REPOSITORY,
    Launcher,
    Serve,
    VariantServer,
    copy_repository,
    sagemaker_env,
    start_server,
    variants_repository,
)

# Which tests start a server is decided by folder, not by a list of fixture names:
# tests/unit never does (tests/unit/conftest.py makes it fail), tests/integration and
# tests/e2e may (`make test-unit` runs tests/unit only).


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    srv = start_server(REPOSITORY, log)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def variants_server(tmp_path_factory):
    """ONE server for the configurations the reclaim, fault, limit, isolation, lead and
    admission tests need (helpers.variants): each its own renamed models."""
    root = tmp_path_factory.mktemp("variants")
    srv = start_server(variants_repository(root / "repo"), root / "tritonserver.log", None)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def short_ttl_server(variants_server):
    """Short TTLs (reclaim within seconds) and a 30 s per-stream limit (helpers.TTL_S and
    its neighbours)."""
    return VariantServer(variants_server, "short_ttl")


@pytest.fixture(scope="session")
def iso_server(variants_server):
    """A short reorder timeout and small parking budgets in the decoder."""
    return VariantServer(variants_server, "isolation")


@pytest.fixture(scope="session")
def lead_server(variants_server):
    """Streams closed once their audio runs helpers.LEAD_S ahead of real time."""
    return VariantServer(variants_server, "lead")


@pytest.fixture(scope="session")
def calibrated_server(variants_server):
    """The committed max_active_streams (measured): calibrated while it loads."""
    return VariantServer(variants_server, "calibrated")


@pytest.fixture(scope="session")
def limited_server(variants_server):
    """The base model names, limited to helpers.ADMISSION_LIMIT streams."""
    return VariantServer(variants_server, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test that used a server, append the server's log tail."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for name, srv in item.funcargs.items():
            if isinstance(srv, TritonServer) or callable(getattr(srv, "log_tail", None)):
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


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """docker/serve (tritonserver + the gateway) as SageMaker runs it, shared by every
    test that talks to the container's routes; tests that stop one start their own."""
    tmp = tmp_path_factory.mktemp("serve")
    s = Serve(sagemaker_env(tmp), tmp / "serve.log")
    s.startup_pings = s.wait_ready()
    yield s
    s.stop()


@pytest.fixture
def own_serve(tmp_path, request):
    """docker/serve for ONE test that stops it (SIGTERM drills, killed stubs): a repository
    copy without the two-pass models; always stopped, so no test depends on running before
    or after it.  Parametrize it (indirect) with a dict of further environment variables."""
    repo = copy_repository(tmp_path / "repo", {})
    extra = getattr(request, "param", {})
    env = sagemaker_env(tmp_path, STREAMASR_MODEL_REPOSITORY=str(repo), **extra)
    s = Serve(env, tmp_path / "serve.log")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """The launcher (`python -m streamasr.triton.server`, its default repository) with a
    self-signed gRPC certificate and a 1 s health poll, shared by a module's tests."""
    launcher = Launcher(tmp_path_factory.mktemp("launcher"))
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()


@pytest.fixture
def own_launcher(tmp_path):
    """A launcher for ONE test that breaks it (a killed stub): a repository copy without
    the two-pass models; always stopped."""
    launcher = Launcher(tmp_path, copy_repository(tmp_path / "repo", {}))
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()
