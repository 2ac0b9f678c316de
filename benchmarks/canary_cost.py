"""What the gateway's health canary costs (streamasr/sagemaker/gateway/health.py): CPU per
canary on the server (tritonserver + each python stub) and in the gateway, and its
latency on an idle server.

    .venv/bin/python -m benchmarks.canary_cost              # 300 canaries
    .venv/bin/python -m benchmarks.canary_cost --canaries 1000 --json out.json

Starts its own tritonserver on a copy of the model repository (without the two-pass
models), runs the real ``Canary`` one after another over one ``AsrConnection`` (as the
gateway does, minus the interval), and reads CPU time from /proc before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.server_stats import CpuMeter
from streamasr.sagemaker.gateway.health import CANARY_INTERVAL_S, Canary, HealthConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20  # canaries before measuring (first calls load lazily)
ANSWER_POLL_S = 0.001


def run(canaries: int, workdir: Path) -> dict:
    from streamasr.triton.repository import TWO_PASS_MODELS, copy_repository
    from streamasr.triton.server import ServerConfig, TritonServer, free_ports
    from streamasr_client.stream import AsrConnection

    repo = copy_repository(
        REPO_ROOT / "model_repository", workdir / "repo", leave_out=TWO_PASS_MODELS
    )
    cfg = ServerConfig(model_repository=repo, **free_ports(), exit_timeout_s=3)
    with TritonServer(cfg, log_path=workdir / "tritonserver.log") as server:
        with AsrConnection(server.grpc_url) as conn:
            contract = conn.contract()
            canary = Canary(HealthConfig())

            def one() -> float:
                n = canary.answered
                canary.start(conn, contract)
                while canary.answered == n:
                    time.sleep(ANSWER_POLL_S)
                assert canary.last is not None
                latency, problem = canary.last
                if problem:
                    raise RuntimeError(problem)
                return latency

            for _ in range(WARMUP):
                one()
            meter = CpuMeter(server.proc.pid)
            meter.start()
            latencies = [one() for _ in range(canaries)]
            cpu = meter.stop()
    server_cpu = {k: v for k, v in cpu["cpu_s"].items() if not k.startswith("client")}
    per_canary_ms = {k: round(v / canaries * 1e3, 3) for k, v in cpu["cpu_s"].items()}
    server_ms = sum(server_cpu.values()) / canaries * 1e3
    gateway_ms = sum(v for k, v in cpu["cpu_s"].items() if k.startswith("client")) / canaries * 1e3
    lat = np.array(latencies) * 1e3
    return {
        "canaries": canaries,
        "cpu_ms_per_canary": per_canary_ms,
        "server_cpu_ms_per_canary": round(server_ms, 2),
        "gateway_cpu_ms_per_canary": round(gateway_ms, 2),
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1),
            "p99": round(float(np.percentile(lat, 99)), 1),
            "max": round(float(lat.max()), 1),
        },
        # at the default interval: share of one core
        "core_share_at_default_interval": round(
            (server_ms + gateway_ms) / 1e3 / CANARY_INTERVAL_S, 4
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--canaries", type=int, default=300)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="canary-cost-") as tmp:
        fig = run(a.canaries, Path(tmp))
    text = json.dumps(fig, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
