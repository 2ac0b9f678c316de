"""Launch a real Triton server on this machine from the PyPI ``nvidia-pytriton`` wheel.

The wheel ships ``tritonserver`` (2.51), the python backend and one stub per Python
version, but not as a ready-to-run install.  ``TritonHome`` lays out a backend
directory (python backend + the stub for *this* interpreter + our Python-based
backends, package data under ``python_backends/``), ``TritonServer`` starts the binary
with the right library path, polls readiness, and stops it.

    python -m streamasr.triton.server      # or: streamasr-server

The model repository: ``--model-repository`` or STREAMASR_MODEL_REPOSITORY; else the
checkout's ``model_repository/`` when run from one; else the repository
``streamasr-artifacts`` built in the artifact cache (what a wheel install serves).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import BinaryIO, TypedDict

from streamasr import checkout
from streamasr.cli import argument_parser

log = logging.getLogger("streamasr.triton.server")

REPO_ROOT = checkout.ROOT
# Where the model repository and the Python-based backends are when not given.
ENV_MODEL_REPOSITORY = "STREAMASR_MODEL_REPOSITORY"
ENV_BACKENDS = "STREAMASR_BACKENDS"
#: The Python-based backends (<name>/model.py) ship inside this package (package data).
PACKAGED_BACKENDS = Path(str(resources.files("streamasr.triton") / "python_backends"))


def default_model_repository() -> Path:
    """$STREAMASR_MODEL_REPOSITORY; else the checkout's model_repository/ when run from a
    checkout; else the one ``streamasr-artifacts`` builds in the artifact cache."""
    value = os.environ.get(ENV_MODEL_REPOSITORY)
    if value:
        return Path(value)
    return checkout.checkout_repository() or checkout.cached_repository()


def missing_folder(what: str, path: Path, env_var: str, flag: str) -> str:
    """The error for a folder that is not there, saying how to get or point at one."""
    return (
        f"no {what} at {path}: build one with `streamasr-artifacts` (pip install "
        f"'streamasr[artifacts]'), or set {env_var} or pass {flag}"
    )


DEFAULT_MODEL_REPOSITORY = default_model_repository()
DEFAULT_BACKENDS = Path(os.environ.get(ENV_BACKENDS) or PACKAGED_BACKENDS)
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    pass


def _pytriton_dirs() -> tuple[Path, Path]:
    """(tritonserver folder inside the wheel, the wheel's bundled shared libraries)."""
    try:
        import pytriton  # noqa: F401  (only its location is needed)
    except ImportError as exc:  # pragma: no cover - install problem, said plainly
        raise ServerError("nvidia-pytriton is not installed: run `make venv`") from exc
    site = Path(pytriton.__file__).resolve().parent.parent
    server_dir = site / "pytriton" / "tritonserver"
    libs = site / "nvidia_pytriton.libs"
    if not (server_dir / "bin" / "tritonserver").exists():
        raise ServerError(f"no tritonserver binary under {server_dir}")
    return server_dir, libs


def child_processes(pid: int) -> dict[int, list[str]]:
    """Live (not zombie) children of ``pid`` with their argv, read from /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # after the parenthesised command (which may hold spaces): state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out[int(d)] = [a.decode(errors="replace") for a in argv if a]
    return out


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_range(n: int = 3, host: str = LOOPBACK) -> tuple[int, int]:
    """(lo, lo + n - 1): n consecutive ports, all free right now (SageMaker's
    SAGEMAKER_SAFE_PORT_RANGE for a docker/serve beside others)."""
    for _ in range(200):
        lo = free_port(host)
        socks = []
        try:
            for p in range(lo, lo + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return lo, lo + n - 1
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class Ports(TypedDict):
    http_port: int
    grpc_port: int
    metrics_port: int


def free_ports() -> Ports:
    """ServerConfig's three ports, each a free one: ``ServerConfig(**free_ports(), ...)``
    for a server beside others on the same machine (tests, benchmarks, the demo)."""
    return Ports(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())


@dataclass
class TritonHome:
    """A backend directory Triton can load: python backend + stub + our backends."""

    root: Path
    backends_src: Path = DEFAULT_BACKENDS

    @property
    def backend_dir(self) -> Path:
        return self.root / "backends"

    def prepare(self) -> "TritonHome":
        server_dir, _ = _pytriton_dirs()
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise ServerError(f"pytriton ships no python backend stub for Python {py}")
        # Copies, not symlinks: Triton refuses backend files that resolve outside
        # the backend directory.
        python_dir = self.backend_dir / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            _copy(server_dir / "backends" / "python" / name, python_dir / name)
        _copy(stub, python_dir / "triton_python_backend_stub")
        # Python-based backends: a folder holding model.py, named as config.pbtxt's `backend`.
        if not self.backends_src.is_dir():
            raise ServerError(
                missing_folder(
                    "Python-based backends folder", self.backends_src, ENV_BACKENDS, "--backends"
                )
            )
        for src in sorted(self.backends_src.iterdir()):
            if (src / "model.py").exists():
                dst = self.backend_dir / src.name
                dst.mkdir(exist_ok=True)
                _copy(src / "model.py", dst / "model.py")
        (self.root / "cache").mkdir(exist_ok=True)
        return self


def _copy(src: Path, dst: Path) -> None:
    """Copy unless dst already holds the same bytes (keeps re-preparing cheap)."""
    if (
        dst.exists()
        and dst.stat().st_size == src.stat().st_size
        and dst.read_bytes() == src.read_bytes()
    ):
        return
    shutil.copy2(src, dst)


@dataclass
class ServerConfig:
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    # streamasr/triton/python_backends/<name>/model.py: the Python-based backends config.pbtxt files name
    backends: Path = DEFAULT_BACKENDS
    host: str = LOOPBACK
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    home: Path | None = None
    log_verbose: int = 0
    # On SIGTERM Triton waits this long for in-flight work; an open sequence (a stream
    # without END) counts as in flight until its idle timeout.
    exit_timeout_s: int = 30
    extra_args: list[str] = field(default_factory=list)
    # TLS for the gRPC endpoint (both set, or neither).
    grpc_cert: Path | None = None
    grpc_key: Path | None = None
    # glibc malloc arenas for tritonserver and its stubs (MALLOC_ARENA_MAX; None: glibc's
    # default of 8 per core).  Measured (benchmarks/soak.py, 10 000 abandoned streams,
    # 2 cores): with the default, tritonserver's RSS kept +38 % after the streams were
    # gone (freed memory stranded in many arenas); with 2, +1 %.  An environment value
    # set by the caller wins.
    malloc_arena_max: int | None = 2
    # Environment variables for tritonserver and its stubs, over this process's own
    # (e.g. STREAMASR_MAX_ACTIVE_STREAMS, streamasr.core.admission).
    env: dict[str, str] = field(default_factory=dict)


class TritonServer:
    """A tritonserver child process; use as a context manager."""

    def __init__(
        self, config: ServerConfig, log_path: Path | None = None, forward_logs: bool = False
    ):
        """forward_logs: also copy Triton's log lines to our stderr as they come."""
        self.config = config
        self.forward_logs = forward_logs
        self._forwarder: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        home_root = config.home
        if home_root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="streamasr-triton-")
            home_root = Path(self._tmp.name)
        self.home = TritonHome(Path(home_root), Path(config.backends)).prepare()
        self.log_path = log_path or (self.home.root / "tritonserver.log")
        self.proc: subprocess.Popen | None = None
        self._log_file: BinaryIO | None = None

    # -- command line -------------------------------------------------------
    def command(self) -> list[str]:
        return self.launch_args() + self.common_args()

    def launch_args(self) -> list[str]:
        """Binary and backend location: what differs between the PyPI wheel used here and
        an installed Triton (the SageMaker image overrides this)."""
        server_dir, _ = _pytriton_dirs()
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--backend-directory={self.home.backend_dir}",
            f"--cache-directory={self.home.root / 'cache'}",
            "--allow-gpu-metrics=false",
        ]

    def common_args(self) -> list[str]:
        c = self.config
        cmd = [
            f"--model-repository={Path(c.model_repository).resolve()}",
            "--model-control-mode=explicit",
            "--load-model=*",
            "--allow-metrics=true",
            f"--http-address={c.host}",
            f"--http-port={c.http_port}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            f"--log-verbose={c.log_verbose}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            # The python backend names its shared-memory regions by this prefix; keep
            # each server's apart from any other's on the machine.
            f"--backend-config=python,shm-region-prefix-name=streamasr_{os.getpid()}_"
            f"{c.grpc_port}_",
        ]
        if c.grpc_cert or c.grpc_key:
            if not (c.grpc_cert and c.grpc_key):
                raise ServerError("gRPC TLS needs both a certificate and a key")
            cmd += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={c.grpc_cert}",
                f"--grpc-server-key={c.grpc_key}",
            ]
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        _, libs = _pytriton_dirs()
        env = dict(os.environ)
        if self.config.malloc_arena_max:
            env.setdefault("MALLOC_ARENA_MAX", str(self.config.malloc_arena_max))
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        # The stub must load the same libpython as this interpreter, and find `python3`
        # of this environment so that models import from its site-packages.
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(libs), libdir, env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.update(self.config.env)
        return env

    # -- lifecycle ----------------------------------------------------------
    @property
    def http_url(self) -> str:
        """host:port of Triton's HTTP endpoint (health and repository APIs)."""
        cfg = self.config
        return f"{cfg.host}:{cfg.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of Triton's gRPC endpoint, for AsrConnection."""
        cfg = self.config
        return f"{cfg.host}:{cfg.grpc_port}"

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        from streamasr.triton.repository import check_limits

        repo = Path(self.config.model_repository)
        if not repo.is_dir():
            raise ServerError(
                missing_folder("model repository", repo, ENV_MODEL_REPOSITORY, "--model-repository")
            )
        problems = check_limits(repo)
        if problems:
            raise ServerError(f"{repo}: " + "; ".join(problems))
        self._log_file = open(self.log_path, "ab")
        log.info("starting tritonserver (log: %s)", self.log_path)
        self.proc = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=subprocess.PIPE if self.forward_logs else self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.forward_logs:
            self._forwarder = threading.Thread(target=self._forward, name="triton-log", daemon=True)
            self._forwarder.start()
        self.wait_ready(timeout_s)
        return self

    def _forward(self) -> None:
        """Tee the server's output into the log file and our stderr."""
        assert self.proc is not None and self.proc.stdout is not None
        assert self._log_file is not None
        for line in iter(self.proc.stdout.readline, b""):
            self._log_file.write(line)
            self._log_file.flush()
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.proc.returncode} before it was ready\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f}s\n" + self.log_tail())

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(["--- tritonserver log tail ---", *text[-lines:]])

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s`` (default: Triton's exit timeout +
        10 s).  Triton answers in-flight requests first; but measured on 2.51, while a
        client holds a streaming RPC open it never exits by itself, even after its exit
        timeout ("Exiting immediately"), so the kill is the normal end in that case."""
        if self.proc is None:
            return None
        if timeout_s is None:
            timeout_s = self.config.exit_timeout_s + 10.0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tritonserver still running %.0f s after SIGTERM (a client "
                    "holding a stream open keeps it from exiting); killing it",
                    timeout_s,
                )
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Python backend stubs are in the server's process group; one still finalizing
        # when the server gave up waiting would outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._forwarder is not None:
            self._forwarder.join(timeout=5)
        if self._log_file:
            self._log_file.close()
        code = self.proc.returncode
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    # -- health ---------------------------------------------------------------------
    def ready_models(self) -> list[str]:
        """Names of the models the repository index reports READY."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}")
        with urllib.request.urlopen(req, timeout=5) as r:
            index = json.loads(r.read())
        return sorted(m["name"] for m in index if m.get("state") == "READY")

    def python_stubs(self) -> dict[int, str]:
        """pid -> model name of every live python backend stub (one per model instance).
        Triton 2.51 keeps reporting a model READY after its stub died (its requests
        then fail with "Stub process ... is not healthy"), so the launcher watches them."""
        if self.proc is None:
            return {}
        return {
            pid: Path(argv[1]).parent.parent.name
            for pid, argv in child_processes(self.proc.pid).items()
            if len(argv) > 1 and argv[0].endswith("triton_python_backend_stub")
        }

    def unready_models(self, models: list[str]) -> list[str]:
        """Those of ``models`` whose ``/v2/models/<m>/ready`` does not answer 200."""
        bad = []
        for m in models:
            try:
                with urllib.request.urlopen(
                    f"http://{self.http_url}/v2/models/{m}/ready", timeout=5
                ) as r:
                    if r.status != 200:
                        bad.append(m)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                bad.append(m)
        return bad

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _health_problem(
    server: TritonServer,
    models: list[str],
    stubs: dict[int, str],
    strikes: dict[str, int],
    polls: int,
) -> str | None:
    """One health poll: what is wrong, or None.  A python stub that died is fatal at
    once (Triton neither restarts it nor marks its model unready); a model that reports
    not ready is fatal after ``polls`` polls in a row."""
    alive = server.python_stubs()
    dead = sorted(f"{name} (pid {pid})" for pid, name in stubs.items() if pid not in alive)
    if dead:
        return f"python backend stub(s) died: {', '.join(dead)}"
    bad = server.unready_models(models)
    for m in list(strikes):
        if m not in bad:
            del strikes[m]
    for m in bad:
        strikes[m] = strikes.get(m, 0) + 1
        log.warning("model %s is not ready (%d/%d)", m, strikes[m], polls)
    failed = sorted(m for m, n in strikes.items() if n >= polls)
    if failed:
        return f"model(s) {failed} not ready for {polls} polls in a row"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("python -m streamasr.triton.server", __doc__)
    p.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_MODEL_REPOSITORY,
        help=f"default: ${ENV_MODEL_REPOSITORY}, else the checkout's model_repository/, "
        "else the artifact cache's (streamasr-artifacts)",
    )
    p.add_argument(
        "--backends",
        type=Path,
        default=DEFAULT_BACKENDS,
        help=f"the Python-based backends (<name>/model.py); default: ${ENV_BACKENDS}, "
        "else the ones this package ships",
    )
    p.add_argument("--host", default=LOOPBACK, help="address for all endpoints (default loopback)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="folder for the prepared backend directory (default: a temporary one)",
    )
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--grpc-cert", type=Path, default=None)
    p.add_argument("--grpc-key", type=Path, default=None)
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument(
        "--quiet",
        action="store_true",
        help="do not copy Triton's log to stderr (it is still written to a file)",
    )
    p.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        help="seconds between readiness polls of every model; a model that "
        "stays unready for --unready-polls polls stops the server with "
        "exit status 3 (0: no polling)",
    )
    p.add_argument("--unready-polls", type=int, default=2)
    p.add_argument(
        "--malloc-arena-max",
        type=int,
        default=2,
        help="MALLOC_ARENA_MAX for tritonserver and its stubs (0: glibc default)",
    )
    p.add_argument("extra", nargs="*", help="further tritonserver flags, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    a = parse_args(argv)
    cfg = ServerConfig(
        model_repository=a.model_repository,
        backends=a.backends,
        host=a.host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        home=a.home,
        log_verbose=a.log_verbose,
        extra_args=a.extra,
        grpc_cert=a.grpc_cert,
        grpc_key=a.grpc_key,
        malloc_arena_max=a.malloc_arena_max or None,
    )
    server = TritonServer(cfg, log_path=None, forward_logs=not a.quiet)
    stop = {"signal": None}

    def _on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        server.start(a.startup_timeout)
    except ServerError as exc:
        log.error("%s", exc)
        server.stop()
        return 1
    log.info(
        "ready: grpc %s, http %s, model repository %s",
        server.grpc_url,
        server.http_url,
        Path(server.config.model_repository).resolve(),
    )
    watching = a.health_interval > 0
    models = server.ready_models() if watching else []
    stubs = server.python_stubs() if watching else {}
    log.info(
        "watching %d models and %d python stubs every %.1f s",
        len(models),
        len(stubs),
        a.health_interval,
    )
    next_poll = time.monotonic() + a.health_interval
    strikes: dict[str, int] = {}
    proc = server.proc
    assert proc is not None  # started above
    while stop["signal"] is None and proc.poll() is None:
        time.sleep(0.2)
        if not watching or time.monotonic() < next_poll:
            continue
        next_poll = time.monotonic() + a.health_interval
        problem = _health_problem(server, models, stubs, strikes, a.unready_polls)
        if problem:
            log.error(
                "UNHEALTHY: %s; stopping tritonserver (exit status 3) so that a "
                "supervisor restarts it\n%s",
                problem,
                server.log_tail(30),
            )
            server.stop(timeout_s=10)
            return 3
    if proc.poll() is not None:
        log.error(
            "tritonserver exited on its own with code %s\n%s", proc.returncode, server.log_tail()
        )
        server.stop()
        return 1
    log.info("stopping tritonserver")
    return 0 if server.stop() in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
