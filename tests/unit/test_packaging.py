"""A non-editable install (`pip install .`): the wheel holds the Python-based backends
(package data) and the code they load, the bundled CTC head streamasr-artifacts exports, and
no built artifact (~350 MB: streamasr-artifacts builds them into a cache); a server started
without a repository says how to get one.  tests/e2e/test_wheel.py serves from a real
install."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile

import pytest

from streamasr.triton.server import (
    ENV_BACKENDS,
    ENV_MODEL_REPOSITORY,
    PACKAGED_BACKENDS,
    ServerConfig,
    ServerError,
    TritonHome,
    TritonServer,
)

from ..helpers import ROOT, build_wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel")))


def backend_imports() -> dict[str, str]:
    """backend name -> the module its model.py imports TritonPythonModel from."""
    out = {}
    for model in sorted(PACKAGED_BACKENDS.glob("*/model.py")):
        tree = ast.parse(model.read_text())
        (mod,) = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        out[model.parent.name] = mod
    assert out, f"no {PACKAGED_BACKENDS}/*/model.py"
    return out


def test_the_wheel_holds_what_the_backends_and_the_gateway_load(wheel):
    names = set(wheel.namelist())
    for backend, module in backend_imports().items():
        path = module.replace(".", "/") + ".py"
        assert path in names, f"backend {backend} imports {module}: {path} not in the wheel"
        assert f"streamasr/triton/python_backends/{backend}/model.py" in names
    assert "streamasr/artifacts/head.npz" in names
    assert "streamasr/sagemaker/deploy/tritonserver-registries.json" in names
    assert "streamasr_client/stream.py" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"streamasr", "streamasr_client"}  # no tests/, training/, benchmarks/
    # no model files, but the feature step's voice-activity detector (1.2 MB, part of the
    # step like its mel filterbank: every stream of every repository runs it)
    assert "streamasr/core/vad_data/silero_vad_16k_sequence.onnx" in names
    assert "streamasr/core/vad_data/LICENSE-silero-vad" in names
    assert not [
        n
        for n in names
        if n.endswith((".onnx", ".arpa")) and not n.startswith("streamasr/core/vad_data/")
    ]


def test_without_a_checkout_the_server_names_the_missing_folder(tmp_path):
    with pytest.raises(ServerError, match=f"{ENV_BACKENDS} or pass --backends"):
        TritonHome(tmp_path / "home", tmp_path / "backends").prepare()
    srv = TritonServer(
        ServerConfig(model_repository=tmp_path / "model_repository", home=tmp_path / "h")
    )
    with pytest.raises(ServerError, match="streamasr-artifacts"):
        srv.start()
    assert srv.proc is None  # nothing was started


def test_the_launcher_takes_the_folders_from_the_environment(tmp_path):
    code = (
        "import streamasr.triton.server as s; "
        "a = s.parse_args([]); print(a.backends); print(a.model_repository)"
    )
    env = {ENV_BACKENDS: str(tmp_path / "b"), ENV_MODEL_REPOSITORY: str(tmp_path / "m")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [str(tmp_path / "b"), str(tmp_path / "m")]


# Provided by tritonserver's python backend at run time, not installable.
RUNTIME_ONLY_MODULES = {"triton_python_backend_utils"}


def test_every_top_level_import_of_the_package_resolves():
    """An import of a name that is neither installed nor ours (e.g. a module path a
    move left half-rewritten) fails only when Triton loads the model: catch it here."""
    import ast
    import importlib.util

    missing = []
    for path in sorted((ROOT / "streamasr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in RUNTIME_ONLY_MODULES:
                    continue
                if importlib.util.find_spec(top) is None:
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing
