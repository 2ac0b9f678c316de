"""The gateway's settings: defaults, limits, and the environment variables that set
them (``GatewayConfig.from_env``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from streamasr.core.params import parse_bool
from streamasr.protocol import MAX_PENDING_REQUESTS, STREAM_MODEL, TWO_PASS_MODEL


@dataclass
class GatewayConfig:
    triton_grpc: str = "127.0.0.1:8001"
    grpc_ssl: bool = False
    grpc_root_cert: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    # Requests sent to Triton and not yet answered, per WebSocket session.  Above this the
    # gateway stops reading the socket (TCP backpressure to the client); if the model has
    # not caught up after flood_timeout_s the client gets an error and is closed.
    max_pending_requests: int = MAX_PENDING_REQUESTS
    flood_timeout_s: float = 10.0
    # A session whose chunks wait this much longer than real time permits (its audio runs
    # this many seconds ahead of the wall clock since START) is flooding; one at real time
    # whose chunks still wait is a victim of an overloaded server, told so (not blamed).
    flood_lead_s: float = 2.0
    # Frames a WebSocket session may send: a token bucket per session.  Audio frames over
    # the rate are read later (backpressure); control frames over it close the session
    # ("rate_limited"): a client needs a few per second at most.
    max_frames_per_s: float = 200.0
    frame_burst: int = 400
    max_control_frames_per_s: float = 10.0
    control_frame_burst: int = 40
    # Audio frames are joined until at least this much is there before a request goes to
    # Triton (every request costs the pipeline the same fixed work, however short).
    min_request_s: float = 0.1
    # A KeepAlive becomes a Triton request only when nothing else of the session is
    # pending and none went out for this long (it exists to keep the stream's state alive
    # across the server's 30 s idle timeout).
    keepalive_interval_s: float = 5.0
    # A WebSocket that sends nothing (no audio, no KeepAlive) for this long is ended:
    # its final is delivered and it closes 1008 "idle_timeout" (Deepgram closes after 10 s).
    idle_timeout_s: float = 10.0
    # Largest text frame (a control message) and deepest JSON nesting accepted.
    max_text_frame_bytes: int = 16 * 1024
    max_json_depth: int = 8
    # How long a closing WebSocket waits for the client's close frame before the
    # connection is dropped (aiohttp's default is 10 s).
    ws_close_timeout_s: float = 2.0
    # Whole-file /invocations transcribed at once; more get 503 + Retry-After.
    max_concurrent_invocations: int = 4
    # Result messages waiting to be written to a slow client.
    max_outgoing_messages: int = 1000
    # Largest binary frame accepted (bytes); 10 s of 16 kHz int16 is 320 kB.
    max_frame_bytes: int = 1 << 20
    # Longest audio one frame may hold, checked on what goes to Triton (after resampling):
    # feature_extractor refuses chunks over its max_chunk_seconds (10 s) anyway, and this
    # bounds one request to 640 kB of float32 whatever the client's sample rate.
    max_frame_seconds: float = 10.0
    # Largest /invocations body; refused by Content-Length before it is read, or as soon
    # as a streamed (chunked) body passes it.
    max_body_bytes: int = 100 << 20
    # Threads for blocking work (file decoding, whole-file transcription): its own pool,
    # so that long /invocations never delay /ping or WebSocket sessions.
    blocking_threads: int = 8
    close_timeout_s: float = 30.0
    # Stateful /invocations sessions expire after this idle time.
    session_ttl_s: float = 300.0
    heartbeat_s: float | None = None  # server-initiated pings (SageMaker pings us anyway)
    # Streams get one-pass finals unless they ask for two_pass=true (Whisper re-decodes
    # each final); STREAMASR_TWO_PASS=true makes two-pass the default.
    two_pass: bool = False

    def stream_model(self, two_pass: Any = None) -> str:
        """The streaming model for a session's ``two_pass`` setting (None: the default)."""
        on = self.two_pass if two_pass is None else parse_bool("two_pass", two_pass)
        return TWO_PASS_MODEL if on else STREAM_MODEL

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "GatewayConfig":
        e = os.environ if env is None else env
        c = cls()
        c.port = int(e.get("SAGEMAKER_BIND_TO_PORT", c.port))
        c.triton_grpc = e.get("STREAMASR_TRITON_GRPC", c.triton_grpc)
        c.host = e.get("STREAMASR_GATEWAY_HOST", c.host)
        c.grpc_ssl = parse_bool(
            "STREAMASR_TRITON_GRPC_SSL", e.get("STREAMASR_TRITON_GRPC_SSL", "false")
        )
        c.grpc_root_cert = e.get("STREAMASR_TRITON_GRPC_ROOT_CERT") or None
        c.two_pass = parse_bool("STREAMASR_TWO_PASS", e.get("STREAMASR_TWO_PASS", "false"))
        for name, attr, conv in (
            ("STREAMASR_GATEWAY_MAX_PENDING", "max_pending_requests", int),
            ("STREAMASR_GATEWAY_MAX_OUTGOING", "max_outgoing_messages", int),
            ("STREAMASR_GATEWAY_MAX_FRAME_BYTES", "max_frame_bytes", int),
            ("STREAMASR_GATEWAY_MAX_FRAME_SECONDS", "max_frame_seconds", float),
            ("STREAMASR_GATEWAY_MAX_BODY_BYTES", "max_body_bytes", int),
            ("STREAMASR_GATEWAY_BLOCKING_THREADS", "blocking_threads", int),
            ("STREAMASR_GATEWAY_FLOOD_TIMEOUT", "flood_timeout_s", float),
            ("STREAMASR_GATEWAY_SESSION_TTL", "session_ttl_s", float),
            ("STREAMASR_GATEWAY_FLOOD_LEAD", "flood_lead_s", float),
            ("STREAMASR_GATEWAY_MIN_REQUEST_SECONDS", "min_request_s", float),
            ("STREAMASR_GATEWAY_MAX_FRAMES_PER_S", "max_frames_per_s", float),
            ("STREAMASR_GATEWAY_MAX_CONTROL_FRAMES_PER_S", "max_control_frames_per_s", float),
            ("STREAMASR_GATEWAY_KEEPALIVE_INTERVAL", "keepalive_interval_s", float),
            ("STREAMASR_GATEWAY_IDLE_TIMEOUT", "idle_timeout_s", float),
            ("STREAMASR_GATEWAY_MAX_CONCURRENT_INVOCATIONS", "max_concurrent_invocations", int),
        ):
            if name in e:
                setattr(c, attr, conv(e[name]))
        return c
