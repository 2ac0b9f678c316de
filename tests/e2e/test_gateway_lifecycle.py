"""docker/serve: gRPC TLS from the environment (TLS works, plaintext refused, the gateway
itself speaks TLS to Triton), gRPC opened to the VPC by SAGEMAKER_TRITON_ALLOW_GRPC,
SIGTERM stopping both processes, and a dead tritonserver taking the container down."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from streamasr.sagemaker.gateway.serve import server_config
from streamasr_client.stream import AsrConnection, AsrError

from ..helpers import Serve, make_cert, sagemaker_env, triton_children

# Every test here starts docker/serve of its own (TLS, restarts, a dying Triton).


def listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp[6]) listening on ``port``."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                out.append(addr)
    return out


def test_env_to_flags():
    cfg = server_config(
        {
            "SAGEMAKER_SAFE_PORT_RANGE": "9000-9009",
            "SAGEMAKER_TRITON_ALLOW_GRPC": "true",
            "SAGEMAKER_TRITON_ALLOW_METRICS": "false",
            "SAGEMAKER_TRITON_LOG_VERBOSE": "true",
            "SAGEMAKER_TRITON_LOG_INFO": "false",
            "SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE": "33554432",
            "SAGEMAKER_TRITON_ADDITIONAL_ARGS": "--exit-on-error=false --foo='a b'",
            "STREAMASR_MODEL_REPOSITORY": "/tmp/repo",
            "STREAMASR_GRPC_TLS_CERT": "/c.pem",
            "STREAMASR_GRPC_TLS_KEY": "/k.pem",
        }
    )
    assert (cfg.http_port, cfg.grpc_port, cfg.metrics_port) == (9007, 9008, 9009)
    assert cfg.log_verbose == 1 and str(cfg.model_repository) == "/tmp/repo"
    assert str(cfg.grpc_cert) == "/c.pem" and str(cfg.grpc_key) == "/k.pem"
    for flag in (
        "--grpc-address=0.0.0.0",
        "--allow-metrics=false",
        "--log-info=false",
        "--backend-config=python,shm-default-byte-size=33554432",
        "--exit-on-error=false",
        "--foo=a b",
    ):
        assert flag in cfg.extra_args
    plain = server_config({})
    assert (plain.grpc_port, plain.log_verbose, plain.grpc_cert) == (8001, 0, None)
    assert "--grpc-address=0.0.0.0" not in plain.extra_args
    with pytest.raises(ValueError):
        server_config({"SAGEMAKER_SAFE_PORT_RANGE": "9000-9001"})


def test_tls_grpc_and_clean_sigterm(tmp_path):
    cert, key = make_cert(tmp_path)
    env = sagemaker_env(
        tmp_path,
        STREAMASR_GRPC_TLS_CERT=str(cert),
        STREAMASR_GRPC_TLS_KEY=str(key),
        SAGEMAKER_TRITON_ALLOW_GRPC="true",
    )
    s = Serve(env, tmp_path / "serve.log")
    try:
        s.wait_ready()  # the gateway reached Triton over TLS
        url = f"127.0.0.1:{s.grpc_port}"
        with AsrConnection(url, ssl=True, root_certificates=cert.read_bytes()) as c:
            assert c.contract().sample_rate > 0
        plain = AsrConnection(url)
        with pytest.raises((grpc.RpcError, AsrError)):
            plain.contract()
        plain.close()
        # a client that does not trust the certificate is refused too
        stranger = AsrConnection(url, ssl=True)
        with pytest.raises(grpc.RpcError):
            stranger.contract()
        stranger.close()
        # 0.0.0.0 (gRPC makes it a dual-stack [::] socket): reachable from the VPC
        assert listening(s.grpc_port) and all(set(a) == {"0"} for a in listening(s.grpc_port))
        assert listening(s.port)
        kids = triton_children(s.proc.pid)
        assert len(kids) == 1
    finally:
        code = s.stop()
    assert code == 0, s.log()
    assert (
        not Path(f"/proc/{kids[0]}").exists()
        or Path(f"/proc/{kids[0]}/stat").read_text().split(")")[1].split()[0] == "Z"
    )
    assert not listening(s.port) and not listening(s.grpc_port)


def test_dead_tritonserver_stops_the_container(tmp_path):
    s = Serve(sagemaker_env(tmp_path), tmp_path / "serve.log")
    try:
        s.wait_ready()
        (kid,) = triton_children(s.proc.pid)
        import os

        os.killpg(kid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while s.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        code = s.stop()
    assert code not in (0, None), s.log()
    assert "tritonserver exited" in s.log()


def test_image_code_path_with_a_real_tritonserver(tmp_path):
    """The path the SageMaker image takes (ImageTritonServer: a given tritonserver binary
    and backend directory, --allow-sagemaker=false, no pytriton helpers), run here with
    the wheel's binary and a backend directory laid out like /opt/tritonserver/backends."""
    from streamasr.triton.server import ServerConfig, TritonHome, TritonServer, _pytriton_dirs

    server_dir, _ = _pytriton_dirs()
    home = TritonHome(tmp_path / "home").prepare()
    # the library path / python the wheel's binary needs on this machine (the image's
    # binary needs none of this)
    helper_env = TritonServer.__new__(TritonServer)
    helper_env.config = ServerConfig()
    env = sagemaker_env(
        tmp_path,
        STREAMASR_TRITON_BINARY=str(server_dir / "bin" / "tritonserver"),
        STREAMASR_TRITON_BACKENDS=str(home.backend_dir),
    )
    base = helper_env.environment()
    for k in ("LD_LIBRARY_PATH", "PATH", "PYTHONPATH"):
        env[k] = base[k]
    s = Serve(env, tmp_path / "serve.log")
    try:
        s.wait_ready()
        (kid,) = triton_children(s.proc.pid)
        argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
        assert b"--allow-sagemaker=false" in argv
        assert f"--backend-directory={home.backend_dir}".encode() in argv
    finally:
        assert s.stop() == 0, s.log()
