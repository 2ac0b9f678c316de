"""A non-editable install (`pip install .`): the wheel holds the code Triton's Python-based
backends load, and a server started without a checkout says which folder it lacks and how
to point at it (--backends / STREAMASR_BACKENDS, --model-repository /
STREAMASR_MODEL_REPOSITORY).  The folders themselves (backends/, model_repository/ with
its ~350 MB of built artifacts) are not in the wheel."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from streamasr.triton.server import (
    ENV_BACKENDS,
    ENV_MODEL_REPOSITORY,
    ServerConfig,
    ServerError,
    TritonHome,
    TritonServer,
)

from ..helpers import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (PEP 517 backend, no network)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "streamasr-src"
    src.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("streamasr", "client"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp)!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return zipfile.ZipFile(tmp / out.stdout.strip().splitlines()[-1])


def backend_imports() -> dict[str, str]:
    """backend name -> the module its model.py imports TritonPythonModel from."""
    out = {}
    for model in sorted((ROOT / "backends").glob("*/model.py")):
        tree = ast.parse(model.read_text())
        (mod,) = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        out[model.parent.name] = mod
    assert out, "no backends/*/model.py"
    return out


def test_the_wheel_holds_what_the_backends_and_the_gateway_load(wheel):
    names = set(wheel.namelist())
    for backend, module in backend_imports().items():
        path = module.replace(".", "/") + ".py"
        assert path in names, f"backend {backend} imports {module}: {path} not in the wheel"
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
    with pytest.raises(ServerError, match=f"{ENV_BACKENDS}=.*--backends"):
        TritonHome(tmp_path / "home", tmp_path / "backends").prepare()
    srv = TritonServer(
        ServerConfig(model_repository=tmp_path / "model_repository", home=tmp_path / "h")
    )
    with pytest.raises(ServerError, match=f"{ENV_MODEL_REPOSITORY}=.*--model-repository"):
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

    from ..helpers import ROOT

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
