"""The gateway's view of Triton and its health: one connection (one gRPC stream shared
by every session) and the readiness check ``/ping`` answers from."""

from __future__ import annotations

import threading

import grpc

from streamasr.protocol import CONTRACT_MODEL, OFFLINE_MODEL, STREAM_MODEL, ModelContract
from streamasr_client.stream import AsrConnection

from .config import GatewayConfig

# /ping answers from the state of a background health check: how often it asks Triton
# (three cheap RPCs), and how old a state may be before /ping stops trusting it.
HEALTH_INTERVAL_S = 1.0


HEALTH_STALE_S = 15.0


# How long a /ping waits for the very first health check after startup.
FIRST_HEALTH_WAIT_S = 1.5


class Backend:
    """The gateway's view of Triton: one AsrConnection (one gRPC stream, many sessions),
    which re-opens its stream itself should it break (e.g. Triton restarted)."""

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._conn: AsrConnection | None = None
        self._contract: ModelContract | None = None

    def connection(self) -> AsrConnection:
        with self._lock:
            if self._conn is None:
                root = None
                if self.cfg.grpc_root_cert:
                    with open(self.cfg.grpc_root_cert, "rb") as f:
                        root = f.read()
                # The gateway waits for room itself (never blocking its event loop):
                # the connection's window is the gateway's.
                self._conn = AsrConnection(
                    self.cfg.triton_grpc,
                    ssl=self.cfg.grpc_ssl,
                    root_certificates=root,
                    max_pending=self.cfg.max_pending_requests,
                )
            return self._conn

    def contract(self) -> ModelContract:
        if self._contract is None:
            self._contract = self.connection().contract()
        return self._contract

    @property
    def known_contract(self) -> ModelContract | None:
        """The contract when it has been fetched already (no I/O)."""
        return self._contract

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) from Triton's own health RPCs."""
        conn = self.connection()
        try:
            if not conn.server_ready():
                return False, "triton server not ready"
            for m in (STREAM_MODEL, OFFLINE_MODEL, CONTRACT_MODEL):
                if not conn.model_ready(m):
                    return False, f"model {m} not ready"
        except grpc.RpcError as exc:
            return False, f"triton unreachable: {exc.code().name}"
        return True, "ready"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
