"""``docker/serve``: start tritonserver the way the stock SageMaker Triton ``serve``
script does (same SAGEMAKER_* variables), then the gateway on SageMaker's port.

Differences from the stock script: Triton's own SageMaker frontend stays off
(``--allow-sagemaker`` is not passed; the gateway owns the port), all models in the
repository are loaded (the ensemble needs every step), and HTTP always binds loopback
(the gateway polls it).  Variables read:

====================================  ==================================================
SAGEMAKER_BIND_TO_PORT                gateway port (8080)
SAGEMAKER_SAFE_PORT_RANGE             ``lo-hi``: Triton's internal http/grpc/metrics
                                      ports are taken from the top of this range
SAGEMAKER_TRITON_ALLOW_GRPC           ``true``: gRPC listens on 0.0.0.0 (else
                                      loopback, for the gateway only); only useful
                                      outside SageMaker, where nothing but the runtime
                                      API reaches the container
SAGEMAKER_TRITON_GRPC_PORT            gRPC port (8001)
SAGEMAKER_TRITON_ALLOW_METRICS        ``false`` turns metrics off (default on, loopback)
SAGEMAKER_TRITON_METRICS_PORT         metrics port (8002)
SAGEMAKER_TRITON_LOG_VERBOSE          ``true``/``false`` or a level (default 0)
SAGEMAKER_TRITON_LOG_INFO/_WARNING/_ERROR  ``false`` silences that level
SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE  python backend shm per model instance (default
                                      4 MiB: fits Docker's 64 MB /dev/shm)
SAGEMAKER_TRITON_SHM_GROWTH_BYTE_SIZE   python backend shm growth (default 1 MiB)
SAGEMAKER_TRITON_ADDITIONAL_ARGS      further tritonserver flags (shell-split)
STREAMASR_MODEL_REPOSITORY            model repository; default: /opt/ml/model when it
                                      holds one (ModelDataUrl), else the baked one
STREAMASR_BAKED_REPOSITORY            the image's own repository
                                      (/opt/streamasr/model_repository; else
                                      ./model_repository when run from a checkout)
STREAMASR_SAGEMAKER_MODEL_DIR         where SageMaker unpacks ModelDataUrl
                                      (/opt/ml/model; set only by tests)
STREAMASR_GRPC_TLS_CERT/_KEY          PEM paths: gRPC only over TLS (gateway included)
STREAMASR_GRPC_TLS_ROOT_CERT          CA the gateway trusts (default: the cert itself)
STREAMASR_TRITON_BINARY               tritonserver to run (default
                                      /opt/tritonserver/bin/tritonserver when present,
                                      else the nvidia-pytriton wheel's, via
                                      streamasr.triton.server.TritonServer)
STREAMASR_TRITON_BACKENDS             backend directory for that binary
                                      (default /opt/tritonserver/backends)
====================================  ==================================================

Health (streamasr/sagemaker/gateway/health.py): ``/ping`` turns 503 when a python backend
stub died, a model is not ready, or a canary stream misses its deadline
(STREAMASR_HEALTH_CANARY_INTERVAL / _CANARY_DEADLINE); once the pipeline has been healthy,
staying unhealthy for STREAMASR_HEALTH_EXIT_AFTER seconds (30; 0: never) stops the
container with exit status 3, the reason logged at ERROR.

SIGTERM/SIGINT: the gateway stops accepting, drains open streams (END to Triton, last
results sent, close 1001) within 10 s, gives running requests 5 s more, then tritonserver
gets SIGTERM and 8 s to exit (then SIGKILL): all within the 30 s SageMaker allows between
SIGTERM and SIGKILL (streamasr/sagemaker/gateway/platform.py).  If tritonserver dies, the gateway
stops too and the exit status is non-zero, so SageMaker replaces the container.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from streamasr.core.admission import QueueDelayGuard
from streamasr.core.params import parse_bool
from streamasr.sagemaker.gateway import platform
from streamasr.sagemaker.gateway.config import GatewayConfig
from streamasr.sagemaker.gateway.health import UNHEALTHY_EXIT_CODE, Backend
from streamasr.sagemaker.gateway.http import Gateway, serve_app
from streamasr.triton.server import REPO_ROOT, ServerConfig, ServerError, TritonServer

log = logging.getLogger("streamasr.serve")

IMAGE_TRITON = Path("/opt/tritonserver/bin/tritonserver")
IMAGE_BACKENDS = Path("/opt/tritonserver/backends")
# SageMaker unpacks ModelDataUrl here, and mounts volumes under /opt/ml: the image's own
# repository lives elsewhere so that a mount cannot hide it.
SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
BAKED_REPOSITORY = Path("/opt/streamasr/model_repository")
# The python backend maps one region of this size per model instance in /dev/shm (the stock
# serve script's 16 MiB default x 7 instances does not fit Docker's default 64 MB, and what
# SageMaker gives a container is not documented); regions grow by the growth size when a
# message needs more.
SHM_DEFAULT_BYTES = 4 * 1024 * 1024
SHM_GROWTH_BYTES = 1024 * 1024
# How often the watcher looks at tritonserver's process and the gateway's health state.
WATCH_INTERVAL_S = 0.5


def holds_repository(path: Path) -> bool:
    """A Triton model repository: a folder with at least one ``<model>/config.pbtxt``."""
    return path.is_dir() and any(p.is_file() for p in path.glob("*/config.pbtxt"))


def model_repository(env=None) -> Path:
    """STREAMASR_MODEL_REPOSITORY; else /opt/ml/model when it holds a repository (bring
    your own model via ModelDataUrl); else the repository baked into the image; else the
    checkout's (docker/serve run outside Docker)."""
    env = os.environ if env is None else env
    if env.get("STREAMASR_MODEL_REPOSITORY"):
        return Path(env["STREAMASR_MODEL_REPOSITORY"])
    model_dir = Path(env.get("STREAMASR_SAGEMAKER_MODEL_DIR") or SAGEMAKER_MODEL_DIR)
    if holds_repository(model_dir):
        log.info("model repository: %s (model data)", model_dir)
        return model_dir
    if model_dir.is_dir() and any(model_dir.iterdir()):
        log.warning(
            "%s has files but no <model>/config.pbtxt at its top level: not a model "
            "repository, using the image's own",
            model_dir,
        )
    baked = Path(env.get("STREAMASR_BAKED_REPOSITORY") or BAKED_REPOSITORY)
    repo = baked if holds_repository(baked) else REPO_ROOT / "model_repository"
    log.info("model repository: %s", repo)
    return repo


def _flag(env, name: str, default: bool) -> bool:
    """A boolean environment variable; a value that is not one is refused by name."""
    v = env.get(name)
    return default if v is None else parse_bool(name, v)


def _ports(env) -> tuple[int, int, int]:
    """(http, grpc, metrics) for Triton."""
    http, grpc_, metrics = (
        8000,
        int(env.get("SAGEMAKER_TRITON_GRPC_PORT", 8001)),
        int(env.get("SAGEMAKER_TRITON_METRICS_PORT", 8002)),
    )
    rng = env.get("SAGEMAKER_SAFE_PORT_RANGE")
    if rng:
        lo, hi = (int(x) for x in rng.split("-"))
        if hi - lo < 2:
            raise ValueError(f"SAGEMAKER_SAFE_PORT_RANGE {rng} has fewer than 3 ports")
        http, grpc_, metrics = hi - 2, hi - 1, hi
    return http, grpc_, metrics


def server_config(env=None) -> ServerConfig:
    """The ServerConfig (incl. extra tritonserver flags) a SageMaker container gets."""
    env = os.environ if env is None else env
    http, grpc_port, metrics = _ports(env)
    repo = model_repository(env)
    extra: list[str] = []
    if _flag(env, "SAGEMAKER_TRITON_ALLOW_GRPC", False):
        extra.append("--grpc-address=0.0.0.0")  # later flags override earlier ones
    if not _flag(env, "SAGEMAKER_TRITON_ALLOW_METRICS", True):
        extra.append("--allow-metrics=false")
    verbose = env.get("SAGEMAKER_TRITON_LOG_VERBOSE", "0").strip().lower()
    level = {"true": 1, "false": 0}.get(verbose)
    level = int(verbose) if level is None else level
    for lvl in ("INFO", "WARNING", "ERROR"):
        if not _flag(env, f"SAGEMAKER_TRITON_LOG_{lvl}", True):
            extra.append(f"--log-{lvl.lower()}=false")
    shm = env.get("SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE", str(SHM_DEFAULT_BYTES))
    growth = env.get("SAGEMAKER_TRITON_SHM_GROWTH_BYTE_SIZE", str(SHM_GROWTH_BYTES))
    extra += [
        f"--backend-config=python,shm-default-byte-size={int(shm)}",
        f"--backend-config=python,shm-growth-byte-size={int(growth)}",
    ]
    extra += shlex.split(env.get("SAGEMAKER_TRITON_ADDITIONAL_ARGS", ""))
    cert, key = env.get("STREAMASR_GRPC_TLS_CERT"), env.get("STREAMASR_GRPC_TLS_KEY")
    return ServerConfig(
        model_repository=repo,
        http_port=http,
        grpc_port=grpc_port,
        metrics_port=metrics,
        log_verbose=level,
        extra_args=extra,
        exit_timeout_s=platform.TRITON_EXIT_S,
        grpc_cert=Path(cert) if cert else None,
        grpc_key=Path(key) if key else None,
    )


class ImageTritonServer(TritonServer):
    """TritonServer for the SageMaker Triton image: its own binary and backend directory
    (native onnxruntime backend, GPU), no pytriton wheel involved."""

    def __init__(
        self,
        config: ServerConfig,
        binary: Path = IMAGE_TRITON,
        backend_dir: Path = IMAGE_BACKENDS,
        forward_logs: bool = True,
    ):
        self.config = config
        self.binary, self.backend_dir = binary, backend_dir
        self.forward_logs = forward_logs
        self._forwarder = None
        self._tmp = tempfile.TemporaryDirectory(prefix="streamasr-triton-")
        self.log_path = Path(self._tmp.name) / "tritonserver.log"
        self.proc = None
        self._log_file = None

    def launch_args(self) -> list[str]:
        # The image's own binary and backends (not the pytriton wheel's); the gateway, not
        # Triton, serves SageMaker's routes on 8080.
        return [
            str(self.binary),
            f"--backend-directory={self.backend_dir}",
            "--allow-sagemaker=false",
            "--allow-http=true",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.config.malloc_arena_max:
            env.setdefault("MALLOC_ARENA_MAX", str(self.config.malloc_arena_max))
        return env


def make_server(cfg: ServerConfig, env=None) -> TritonServer:
    env = os.environ if env is None else env
    binary = env.get("STREAMASR_TRITON_BINARY")
    if binary or IMAGE_TRITON.exists():
        return ImageTritonServer(
            cfg,
            Path(binary) if binary else IMAGE_TRITON,
            Path(env.get("STREAMASR_TRITON_BACKENDS", IMAGE_BACKENDS)),
        )
    return TritonServer(cfg, forward_logs=True)


def gateway_config(cfg: ServerConfig, env=None) -> GatewayConfig:
    env = os.environ if env is None else env
    g = GatewayConfig.from_env(env)
    g.triton_grpc = f"127.0.0.1:{cfg.grpc_port}"
    if cfg.grpc_cert:
        g.grpc_ssl = True
        g.grpc_root_cert = env.get("STREAMASR_GRPC_TLS_ROOT_CERT") or str(cfg.grpc_cert)
    return g


def main(argv: list[str] | None = None) -> int:
    """argv: SageMaker starts the image as `<image> serve`; no arguments are used."""
    if argv and argv != ["serve"]:
        log.warning("ignoring arguments %s (configuration is by environment)", argv)
    logging.basicConfig(
        level=os.environ.get("STREAMASR_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    cfg = server_config()
    server = make_server(cfg)
    gcfg = gateway_config(cfg)
    outcome: dict[str, int] = {"code": 0}
    main_pid = os.getpid()

    def _stop_gateway(code: int) -> None:
        outcome["code"] = code
        os.kill(main_pid, signal.SIGTERM)  # aiohttp turns it into a graceful exit

    def _start_and_watch() -> None:
        try:
            server.start(timeout_s=float(os.environ.get("STREAMASR_STARTUP_TIMEOUT", 600)))
        except ServerError as exc:
            log.error("tritonserver failed to start: %s", exc)
            _stop_gateway(1)
            return
        log.info("tritonserver ready (grpc %s)", server.grpc_url)
        assert server.proc is not None
        while not stopping.wait(WATCH_INTERVAL_S):
            code = server.proc.poll()
            if code is not None:
                log.error("tritonserver exited with code %s; stopping the gateway", code)
                _stop_gateway(1)
                return
            why = backend.state.fatal()
            if why is not None:
                log.error(
                    "UNHEALTHY: %s; stopping (exit status %d) so that SageMaker replaces "
                    "the container",
                    why,
                    UNHEALTHY_EXIT_CODE,
                )
                _stop_gateway(UNHEALTHY_EXIT_CODE)
                return

    stopping = threading.Event()
    # the gateway's health check also watches this tritonserver's python stubs
    backend = Backend(gcfg, list_stubs=server.python_stubs, queue_guard=QueueDelayGuard.from_env())
    # Triton starts in the background so that /ping answers (503) while models load.
    watcher = threading.Thread(target=_start_and_watch, name="triton", daemon=True)
    watcher.start()
    gw = Gateway(gcfg, backend)
    app = gw.app()

    async def _shutting_down(_app) -> None:
        stopping.set()  # a drain without health checks is no reason to exit 3

    app.on_shutdown.insert(0, _shutting_down)
    log.info("gateway on %s:%d", gcfg.host, gcfg.port)
    try:
        # on_shutdown drains the streams (DRAIN_S), then requests get HANDLER_SHUTDOWN_S
        serve_app(app, gcfg.host, gcfg.port, shutdown_timeout=platform.HANDLER_SHUTDOWN_S)
    finally:
        stopping.set()
        log.info("stopping tritonserver")
        try:
            server.stop(timeout_s=cfg.exit_timeout_s + 2)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("stopping tritonserver: %s", exc)
    return int(outcome["code"])


if __name__ == "__main__":
    sys.exit(main())
