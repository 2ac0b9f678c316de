"""docker/serve (tritonserver + the SageMaker gateway) as a child process on this machine,
with the gateway on loopback: what the tests and the benchmarks that drive the container's
routes start (tests/helpers.Serve, benchmarks/hostile.Serve).  The container itself runs the
same entry point on 0.0.0.0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from streamasr import checkout
from streamasr.triton.server import child_processes, free_port, free_port_range

#: SageMaker's entry point, as the image runs it.
SERVE = checkout.ROOT / "docker" / "serve"
PING_TIMEOUT_S = 5.0
PING_EVERY_S = 0.3


class ServeFailed(RuntimeError):
    """docker/serve exited, or /ping never answered 200."""


def loopback_env(repository: Path, **extra: str) -> dict[str, str]:
    """This process's environment plus what docker/serve reads: free ports (SageMaker's
    bind port and safe range; Triton takes the top two of the range), the repository,
    the gateway on loopback, unbuffered logs; ``extra`` last."""
    lo, hi = free_port_range()
    env = dict(os.environ)
    env.update(
        {
            "SAGEMAKER_BIND_TO_PORT": str(free_port()),
            "SAGEMAKER_SAFE_PORT_RANGE": f"{lo}-{hi}",
            "STREAMASR_MODEL_REPOSITORY": str(repository),
            "STREAMASR_GATEWAY_HOST": "127.0.0.1",  # this machine's rule: loopback only
            "SAGEMAKER_TRITON_LOG_VERBOSE": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class ServeProcess:
    """docker/serve started with ``env`` (see loopback_env), its output in ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = checkout.ROOT):
        self.env, self.log_path = env, Path(log_path)
        self.port = int(env["SAGEMAKER_BIND_TO_PORT"])
        hi = int(env["SAGEMAKER_SAFE_PORT_RANGE"].split("-")[1])
        self.grpc_port, self.metrics_port = hi - 1, hi
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVE)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def timed_ping(self) -> tuple[int, float]:
        """(status, seconds) of GET /ping; status 0: no answer within PING_TIMEOUT_S."""
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=PING_TIMEOUT_S) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        except (urllib.error.URLError, ConnectionError, OSError):
            code = 0
        return code, time.perf_counter() - t

    def ping(self) -> int:
        return self.timed_ping()[0]

    def wait_ready(self, timeout: float = 180.0) -> list[int]:
        """Poll /ping until 200; returns the statuses seen (SageMaker's view of startup).
        ServeFailed, with the log's tail, if the process exits or the time runs out."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeFailed(f"docker/serve exited {self.proc.returncode}\n{self.log()}")
            code = self.ping()
            if not seen or seen[-1] != code:
                seen.append(code)
            if code == 200:
                return seen
            time.sleep(PING_EVERY_S)
        raise ServeFailed(f"/ping never answered 200 in {timeout:g} s (seen {seen})\n{self.log()}")

    def log(self, chars: int = 6000) -> str:
        """The end of the process's output."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def triton_pid(self) -> int:
        for pid, argv in child_processes(self.proc.pid).items():
            if argv and argv[0].endswith("tritonserver"):
                return pid
        raise ServeFailed("docker/serve has no tritonserver child")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (SageMaker's stop), SIGKILL after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
