"""The wheel serves: built from these sources, installed into a fresh venv (no checkout on
its path), `streamasr-artifacts` builds the model repository into a cache, `streamasr-server`
serves it, and the installed `transcribe` streams demo.wav through it.  Its finals equal
those of the checkout's server for the same audio."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from streamasr.protocol import final_text
from streamasr.triton.server import free_ports

from ..helpers import DEMO_WAV, ROOT, build_wheel, needs_demo, poll

INSTALL_TIMEOUT_S = 900  # torch, nvidia-pytriton, kenlm: minutes on 2 cores
BUILD_TIMEOUT_S = 600
READY_TIMEOUT_S = 180
# The exact versions the rest of the suite tests (requirements*.txt pin them).
CONSTRAINTS = ("requirements.txt", "requirements-build.txt")


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    out = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv[:3]} exited {out.returncode}:\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, environment, working folder) of a fresh install of the wheel."""
    tmp = tmp_path_factory.mktemp("wheel_install")
    wheel = build_wheel(tmp / "dist")
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    # Nothing of this checkout or of the test venv may leak into the install's imports.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["STREAMASR_CACHE"] = str(tmp / "cache")
    # pip's constraints take no extras: "tritonclient[grpc]==X" -> "tritonclient==X".
    pins = [
        re.sub(r"\[.*?\]", "", line)
        for c in CONSTRAINTS
        for line in (ROOT / c).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    (tmp / "constraints.txt").write_text("\n".join(pins) + "\n")
    constraints = ["-c", str(tmp / "constraints.txt")]
    run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", *constraints]
        + [f"{wheel}[server,artifacts]"],
        env,
        tmp,
        INSTALL_TIMEOUT_S,
    )
    return bin_dir, env, tmp


def test_the_installed_package_is_not_the_checkout(installed):
    bin_dir, env, tmp = installed
    where = run(
        [str(bin_dir / "python"), "-c", "import streamasr; print(streamasr.__file__)"],
        env,
        tmp,
        60,
    ).strip()
    assert Path(where).is_relative_to(tmp / "venv"), where
    assert not Path(where).is_relative_to(ROOT)


@needs_demo
def test_the_wheel_builds_its_artifacts_and_serves_demo_wav(installed, server, tmp_path):
    bin_dir, env, tmp = installed
    repo = Path(run([str(bin_dir / "streamasr-artifacts")], env, tmp, BUILD_TIMEOUT_S).strip())
    assert repo.is_relative_to(tmp / "cache")
    for built in ("acoustic_model/1/model.onnx", "ctc_decoder/1/en-us.arpa"):
        assert (repo / built).is_file(), built
    # A second run builds nothing (each artifact is complete or absent).
    again = subprocess.run(
        [str(bin_dir / "streamasr-artifacts")], env=env, cwd=tmp, capture_output=True, text=True
    )
    assert again.returncode == 0 and "built the" not in again.stderr

    ports = free_ports()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                str(bin_dir / "streamasr-server"),
                f"--http-port={ports['http_port']}",
                f"--grpc-port={ports['grpc_port']}",
                f"--metrics-port={ports['metrics_port']}",
                f"--home={tmp_path / 'home'}",
            ],
            env=env,
            cwd=tmp,  # not the checkout: the repository must come from the cache
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def watching() -> bool:
            assert proc.poll() is None, log_path.read_text()[-4000:]
            return "watching" in log_path.read_text()

        poll(watching, READY_TIMEOUT_S, "the installed streamasr-server to be ready")
        assert str(repo) in log_path.read_text()
        served = finals([str(bin_dir / "transcribe")], f"127.0.0.1:{ports['grpc_port']}", env, tmp)
    finally:
        proc.terminate()
        proc.wait(60)
    # The same client code from this checkout against the checkout's server.
    checkout = finals(
        [sys.executable, "-m", "streamasr_client.transcribe"],
        server.grpc_url,
        dict(os.environ),
        ROOT,
    )
    assert served and served == checkout


def finals(transcribe: list[str], url: str, env: dict[str, str], cwd: Path) -> str:
    """demo.wav's finals through the `transcribe` CLI (raw result messages)."""
    out = run(
        transcribe + [str(DEMO_WAV), f"--url={url}", "--json", "--no-interims"], env, cwd, 120
    )
    return final_text(json.loads(line) for line in out.splitlines() if line.strip())
