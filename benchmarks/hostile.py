"""Hostile clients beside paced bystanders (issue 21's measured targets).

Starts its own ``docker/serve`` (the SageMaker entry point: gateway + tritonserver, the
repository's default limits, admission included; the gateway bound to 127.0.0.1 instead
of 0.0.0.0, the only change), then, ONE attacker class at a time, streams
``bystanders`` paced speakers over the WebSocket route
(``/invocations-bidirectional-stream``, 16-bit PCM frames of ``frame_ms``, real speech
from assets/eval at real time) while the attacker runs in a process of its own.  A
baseline run with no attacker comes first: its finals are what every later run's
bystanders must reproduce.

Attacker classes (``CLASSES``): reserved request fields (Configure options and query),
a KeepAlive flood, a Finalize flood, an audio flood (a whole file as fast as possible in
tiny frames), a huge/deep text frame and an out-of-range integer, trickled chunked
``/invocations`` bodies, abandoned sockets, whole-file ``/invocations`` beyond their
concurrency limit, and raw-gRPC streams holding ``max_lead_seconds`` of lead (the known
limit docs/reliability.md writes down: Triton's port is not reachable on SageMaker).

Measured per class: bystanders' finals equal to the baseline's ("exact"), their chunk
latency (send of a frame -> the interim answering it; budget 250 ms p99) and errors;
what the attacker got (close codes, Error codes, time to close/refusal); RSS of
tritonserver + its Python stubs before, peak, and ``settle_s`` after (target within 5 %
of before); ``GET /ping`` status and latency during the attack; the Triton requests the
attack cost (metrics port, bystanders' own subtracted).

    .venv/bin/python -m benchmarks.hostile --json out.json        # full (~20 min)
    .venv/bin/python -m benchmarks.hostile --quick                # smoke run (~3 min)
    .venv/bin/python -m benchmarks.hostile --classes keepalive_flood,abandoned

Writes benchmarks/results/hostile/<date-time>/{result.json,README.md}.  Loopback only;
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import glob
import json
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from streamasr import protocol
from streamasr.tools.serve_process import ServeProcess, loopback_env

from . import metrics
from .load import load_clips
from .overload import Flooder, RssSampler, speaker_audio, total_rss_kib
from .server_stats import loadavg, metric_total, model_requests
from .soak import _rss_kib

log = logging.getLogger("benchmarks.hostile")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "hostile"
EVAL_CLIPS = REPO_ROOT / "assets" / "eval"
DEMO_WAV = REPO_ROOT / "assets" / "demo.wav"
LOG = REPO_ROOT / "build" / "bench-hostile-serve.log"  # kept after the run (not committed)

LATENCY_BUDGET_MS = 250.0
RSS_TOLERANCE = 0.05
PCM_MAX = 32767
SAMPLE_WIDTH = 2  # int16
# The attacker starts once every bystander's stream is open and answered.
ATTACK_LEAD_IN_S = 2.0
PING_EVERY_S = 0.5
PING_TIMEOUT_S = 5.0
RSS_EVERY_S = 0.5
SETTLE_SAMPLE_S = 5.0
STARTUP_TIMEOUT_S = 600.0
# Upper bounds on waits for answers, so that a wedged server ends the run, not hangs it.
RECEIVE_BOUND_S = 60.0
INVOKE_BOUND_S = 120.0
# The issue's attack sizes.
KEEPALIVE_FLOOD = 30_000
NESTED_BRACKETS = 200_000
HUGE_INT = 2**70
WS_CLOSED = (-1, None)  # close_code when the socket ended without a close frame


@dataclass
class Plan:
    """Sizes of one run; every loop below is bounded by these."""

    bystanders: int = 8
    bystander_s: float = 30.0
    frame_ms: float = 100.0
    settle_s: float = 60.0
    repeats: int = 5  # reserved-field and bad-text attempts, per kind
    keepalives: int = KEEPALIVE_FLOOD
    finalizes: int = KEEPALIVE_FLOOD
    flood_frame_ms: float = 10.0
    flood_audio_s: float | None = None  # None: the whole of assets/demo.wav (30 s)
    brackets: int = NESTED_BRACKETS
    trickle_connections: int = 100
    trickle_every_s: float = 0.5
    trickle_bound_s: float = 75.0  # the gateway's deadline is 55 s
    abandoned: int = 50
    abandoned_bound_s: float = 40.0  # its idle timeout is 10 s
    invocations: int = 8
    invocations_s: float = 25.0
    raw_streams: int = 15
    raw_audio_s: float = 130.0  # past the repository's 120 s max_lead_seconds


FULL = Plan()
QUICK = Plan(
    bystanders=2,
    bystander_s=8.0,
    settle_s=3.0,
    repeats=1,
    keepalives=2_000,
    finalizes=500,
    flood_audio_s=5.0,
    trickle_connections=5,
    trickle_bound_s=6.0,
    abandoned=4,
    abandoned_bound_s=15.0,
    invocations=6,
    invocations_s=4.0,
    raw_streams=2,
    raw_audio_s=10.0,
)


# -- docker/serve on loopback -----------------------------------------------------------


class Serve(ServeProcess):
    """docker/serve on loopback (streamasr.tools.serve_process) with the repository's own
    admission limit, not one left in this shell; plus what the benchmark reads of it."""

    def __init__(self, log_path: Path, repository: Path = REPO_ROOT / "model_repository"):
        env = loopback_env(repository)
        env.pop("STREAMASR_MAX_ACTIVE_STREAMS", None)
        super().__init__(env, log_path)

    def stream_requests(self) -> float | None:
        """Requests Triton has counted for the streaming model (success + failure);
        None when the metrics port does not answer (tritonserver died)."""
        return model_requests(
            f"http://127.0.0.1:{self.metrics_port}/metrics", protocol.STREAM_MODEL
        )

    def metric(self, name: str) -> float | None:
        """One of streamasr's metrics on Triton's metrics port (e.g. the admission limit)."""
        return metric_total(f"http://127.0.0.1:{self.metrics_port}/metrics", name)

    def crash_lines(self) -> list[str]:
        """The log's lines that say how tritonserver or the gateway ended."""
        pat = r"Signal \(|terminate called|what\(\)|exited with code|Stub process|UNHEALTHY"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [ln.strip()[:300] for ln in lines if re.search(pat, ln)][-6:]


class PingProbe:
    """GET /ping every PING_EVERY_S on a thread while the attack runs."""

    def __init__(self, serve: Serve):
        self.serve = serve
        self.seen: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append(self.serve.timed_ping())
            self._stop.wait(PING_EVERY_S)

    def __enter__(self) -> "PingProbe":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# -- bystanders -------------------------------------------------------------------------


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * PCM_MAX).astype("<i2").tobytes()


def bystander_pcm(n: int, seconds: float, rate: int) -> list[bytes]:
    """Speaker i says assets/eval's clips back to back, rotated by i, for ``seconds``."""
    clips = load_clips(rate, sorted(glob.glob(str(EVAL_CLIPS / "*.wav"))))
    return [to_pcm16(speaker_audio(clips, i, seconds, rate)) for i in range(n)]


async def bystander(url: str, pcm: bytes, frame_bytes: int, frame_s: float, start: float) -> dict:
    """One paced WebSocket stream: frame i leaves when its last sample has been spoken
    (``start`` + (i+1) frames, perf_counter clock); every frame is one Triton request,
    answered by messages ending with exactly one interim, in order."""
    import aiohttp

    sent_t: list[float] = []
    interim_t: list[float] = []
    finals: list[str] = []
    errors: list[str] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url + protocol.WS_PATH) as ws:

            async def reader() -> None:
                async for m in ws:
                    if m.type != aiohttp.WSMsgType.TEXT:
                        continue
                    msg = json.loads(m.data)
                    now = time.perf_counter()
                    if msg.get("type") == "Error":
                        errors.append(str(msg.get("code")))
                    elif protocol.is_results(msg):
                        if protocol.is_final(msg):
                            finals.append(protocol.transcript(msg))
                        else:
                            interim_t.append(now)

            task = asyncio.create_task(reader())
            for i, off in enumerate(range(0, len(pcm), frame_bytes)):
                await asyncio.sleep(max(0.0, start + (i + 1) * frame_s - time.perf_counter()))
                if ws.closed:
                    break
                sent_t.append(time.perf_counter())
                try:
                    await ws.send_bytes(pcm[off : off + frame_bytes])
                except ConnectionError:
                    break
            if not ws.closed:
                try:
                    await ws.send_str(json.dumps({"type": "CloseStream"}))
                except ConnectionError:
                    pass
            try:
                await asyncio.wait_for(task, RECEIVE_BOUND_S)
            except asyncio.TimeoutError:
                errors.append("no close within bound")
                task.cancel()
            code = ws.close_code
    return {
        "final": " ".join(t for t in finals if t),
        "close_code": code,
        "errors": errors,
        "sent": len(sent_t),
        "interims": len(interim_t),
        "latency_s": chunk_latencies(sent_t, interim_t),
    }


def chunk_latencies(sent_t: Sequence[float], interim_t: Sequence[float]) -> list[float]:
    """Frame k's latency: its send -> the k-th interim (answers come in send order)."""
    return [r - s for s, r in zip(sent_t, interim_t)]


async def run_bystanders(url: str, pcms: list[bytes], frame_ms: float, rate: int) -> list[dict]:
    frame_s = frame_ms / 1000
    frame_bytes = int(rate * frame_s) * SAMPLE_WIDTH
    t0 = time.perf_counter() + 0.5
    # spread over one frame period: speakers who arrive over time, not in lockstep
    return list(
        await asyncio.gather(
            *(
                bystander(url, pcm, frame_bytes, frame_s, t0 + i * frame_s / len(pcms))
                for i, pcm in enumerate(pcms)
            )
        )
    )


# -- attackers (each in a process of its own: its CPU is not the bystanders' client's) --


@dataclass
class AttackCtx:
    url: str
    grpc_url: str
    rate: int
    plan: Plan


async def _ws_attack(
    url: str,
    query: str = "",
    texts: Sequence[str] = (),
    frames: Sequence[bytes] = (),
    *,
    close_msg: bool = False,
    stop_on_close: bool = True,
) -> dict:
    """Send ``texts`` then ``frames`` as fast as the socket takes them, then read until
    the server closes (bounded); what came back, and when."""
    import aiohttp

    got: dict[str, Any] = {"errors": [], "results": 0, "sent": 0}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url + protocol.WS_PATH + query, max_msg_size=0) as ws:
            closed = asyncio.Event()

            async def reader() -> None:
                async for m in ws:
                    if m.type == aiohttp.WSMsgType.TEXT:
                        msg = json.loads(m.data)
                        if msg.get("type") == "Error":
                            got["errors"].append(str(msg.get("code")))
                            got.setdefault("first_error_s", time.perf_counter() - t0)
                        elif protocol.is_results(msg):
                            got["results"] += 1
                closed.set()

            task = asyncio.create_task(reader())
            try:
                for t in texts:
                    if stop_on_close and closed.is_set():
                        break
                    await ws.send_str(t)
                    got["sent"] += 1
                for f in frames:
                    if stop_on_close and closed.is_set():
                        break
                    await ws.send_bytes(f)
                    got["sent"] += 1
                if close_msg and not closed.is_set():
                    await ws.send_str(json.dumps({"type": "CloseStream"}))
            except (ConnectionError, RuntimeError):
                pass  # the server closed while we were sending
            try:
                await asyncio.wait_for(task, RECEIVE_BOUND_S)
            except asyncio.TimeoutError:
                task.cancel()
                got["still_open"] = True
            got["close_code"] = ws.close_code
    got["closed_after_s"] = round(time.perf_counter() - t0, 3)
    return got


def _summarise_ws(runs: list[dict]) -> dict:
    """Close codes, Error codes, time to close over several attacker sockets."""
    closes: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in runs:
        closes[str(r.get("close_code"))] = closes.get(str(r.get("close_code")), 0) + 1
        for e in r["errors"][:1]:  # the code it was closed with
            errors[e] = errors.get(e, 0) + 1
    return {
        "sockets": len(runs),
        "close_codes": closes,
        "error_codes": errors,
        "closed_after_ms": metrics.summarize([r["closed_after_s"] for r in runs]),
        "results_received": sum(r["results"] for r in runs),
        "frames_sent": sum(r["sent"] for r in runs),
        "still_open": sum(1 for r in runs if r.get("still_open")),
    }


async def attack_reserved(ctx: AttackCtx) -> dict:
    """Issue 21's exploit: options naming the victim's sequence fields, in a Configure
    and in the query (an integer and a string id)."""
    frame = to_pcm16(np.zeros(ctx.rate // 10, np.float32))
    cfg = {"sequence_id": 2, "sequence_start": False, "sequence_end": True}
    kinds = {
        "configure": dict(texts=[json.dumps({"type": "Configure", "options": cfg})]),
        "query": dict(query="?sequence_id=2&sequence_start=false"),
        "string_query": dict(query="?sequence_id=victim&sequence_end=true"),
    }
    out = {}
    for name, kw in kinds.items():
        runs = [
            await _ws_attack(ctx.url, frames=[frame], **kw)  # type: ignore[arg-type]
            for _ in range(ctx.plan.repeats)
        ]
        out[name] = _summarise_ws(runs)
    return out


async def attack_keepalive_flood(ctx: AttackCtx) -> dict:
    text = json.dumps({"type": "KeepAlive"})
    return _summarise_ws([await _ws_attack(ctx.url, texts=[text] * ctx.plan.keepalives)])


async def attack_finalize_flood(ctx: AttackCtx) -> dict:
    frame = to_pcm16(np.zeros(ctx.rate // 10, np.float32))
    text = json.dumps({"type": "Finalize"})
    r = await _ws_attack(ctx.url, texts=[text] * ctx.plan.finalizes, frames=[frame])
    return _summarise_ws([r])


async def attack_audio_flood(ctx: AttackCtx) -> dict:
    """assets/demo.wav (30 s, or its first ``flood_audio_s``) as fast as the socket takes
    it, in frames of ``flood_frame_ms``; then CloseStream.  Not refused: the gateway reads audio frames
    over its frame rate later and paces audio to max_lead_seconds."""
    from streamasr_client.audio import load_audio

    audio = load_audio(str(DEMO_WAV), ctx.rate)
    if ctx.plan.flood_audio_s is not None:
        audio = audio[: int(ctx.plan.flood_audio_s * ctx.rate)]
    pcm = to_pcm16(audio)
    n = int(ctx.rate * ctx.plan.flood_frame_ms / 1000) * SAMPLE_WIDTH
    frames = [pcm[i : i + n] for i in range(0, len(pcm), n)]
    r = await _ws_attack(ctx.url, frames=frames, close_msg=True)
    s = _summarise_ws([r])
    s["audio_s"] = round(len(pcm) / SAMPLE_WIDTH / ctx.rate, 1)
    s["frame_ms"] = ctx.plan.flood_frame_ms
    s["answered_frames"] = r["results"]
    return s


async def attack_bad_text(ctx: AttackCtx) -> dict:
    kinds = {
        "nested_brackets": "[" * ctx.plan.brackets,
        "beam_size_2**70": json.dumps({"type": "Configure", "options": {"beam_size": HUGE_INT}}),
    }
    out = {}
    for name, text in kinds.items():
        runs = [await _ws_attack(ctx.url, texts=[text]) for _ in range(ctx.plan.repeats)]
        out[name] = _summarise_ws(runs)
    return out


async def attack_trickle(ctx: AttackCtx) -> dict:
    """Connections trickling a chunked /invocations body, one byte per
    ``trickle_every_s``, until answered or ``trickle_bound_s``."""
    host, port = ctx.url.split("//")[1].split(":")
    plan = ctx.plan

    async def one() -> dict:
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        head, sent = b"", 0
        try:
            while time.perf_counter() - t0 < plan.trickle_bound_s:
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                sent += 1
                try:
                    head = await asyncio.wait_for(reader.read(256), plan.trickle_every_s)
                except asyncio.TimeoutError:
                    continue
                break
        except ConnectionError:
            pass
        took = time.perf_counter() - t0
        writer.close()
        status = head.split(b" ")[1].decode() if head.startswith(b"HTTP/") else None
        return {"status": status, "answered_s": took if status else None, "bytes": sent}

    runs = await asyncio.gather(*(one() for _ in range(plan.trickle_connections)))
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    answered = [r["answered_s"] for r in runs if r["answered_s"] is not None]
    return {
        "connections": len(runs),
        "statuses": statuses,
        "answered_after_ms": metrics.summarize(answered),
        "still_open_at_bound": sum(1 for r in runs if r["status"] is None),
        "bound_s": plan.trickle_bound_s,
    }


async def attack_abandoned(ctx: AttackCtx) -> dict:
    """Sockets that send one audio frame, then nothing (and never close)."""
    frame = to_pcm16(np.zeros(ctx.rate // 10, np.float32))

    async def one() -> dict:
        r = await asyncio.wait_for(
            _ws_attack(ctx.url, frames=[frame]), ctx.plan.abandoned_bound_s + RECEIVE_BOUND_S
        )
        return r

    return _summarise_ws(list(await asyncio.gather(*(one() for _ in range(ctx.plan.abandoned)))))


async def attack_invocations(ctx: AttackCtx) -> dict:
    """``invocations`` clients each POSTing assets/demo.wav back to back for
    ``invocations_s`` (the gateway transcribes at most 4 at once)."""
    import aiohttp

    body = DEMO_WAV.read_bytes()
    deadline = time.perf_counter() + ctx.plan.invocations_s
    seen: list[tuple[int, float, bool]] = []

    async def client(http) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with http.post(
                ctx.url + "/invocations",
                data=body,
                headers={"Content-Type": "audio/wav"},
                timeout=aiohttp.ClientTimeout(total=INVOKE_BOUND_S),
            ) as r:
                await r.read()
                seen.append((r.status, time.perf_counter() - t0, "Retry-After" in r.headers))
            if r.status != 200:
                await asyncio.sleep(0.5)  # a client that honours "busy" a little

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(ctx.plan.invocations)))
    statuses: dict[str, int] = {}
    for st, _, _ in seen:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {
        "clients": ctx.plan.invocations,
        "requests": len(seen),
        "statuses": statuses,
        "ok_ms": metrics.summarize([t for st, t, _ in seen if st == 200]),
        "refused_ms": metrics.summarize([t for st, t, _ in seen if st != 200]),
        "refused_with_retry_after": sum(1 for st, _, ra in seen if st != 200 and ra),
    }


async def attack_raw_grpc_lead(ctx: AttackCtx) -> dict:
    """``raw_streams`` streams straight to Triton's gRPC port, unpaced: each runs up to
    the repository's max_lead_seconds ahead of real time before Triton closes it."""
    clips = load_clips(ctx.rate, sorted(glob.glob(str(EVAL_CLIPS / "*.wav"))))
    from streamasr_client.stream import AsrConnection

    with AsrConnection(ctx.grpc_url) as c:
        chunk = c.contract().chunk_samples
    floods = [
        Flooder(speaker_audio(clips, i, ctx.plan.raw_audio_s, ctx.rate), chunk, ctx.rate)
        for i in range(ctx.plan.raw_streams)
    ]
    threads = [threading.Thread(target=f.run, args=(ctx.grpc_url,), daemon=True) for f in floods]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(ctx.plan.raw_audio_s + 2 * INVOKE_BOUND_S)
    return {
        "streams": len(floods),
        "audio_s_each": ctx.plan.raw_audio_s,
        "took_s": round(time.perf_counter() - t0, 1),
        "closed_at_lead": sum(1 for f in floods if f.closed_after_s is not None),
        "flooders": [f.summary() for f in floods],
    }


#: name -> (what it is, the attack)
CLASSES: dict[str, tuple[str, Callable[[AttackCtx], Any]]] = {
    "reserved_fields": (
        "Configure options / query naming sequence_id, sequence_start, sequence_end",
        attack_reserved,
    ),
    "keepalive_flood": ("KeepAlive frames as fast as possible", attack_keepalive_flood),
    "finalize_flood": ("Finalize frames as fast as possible", attack_finalize_flood),
    "audio_flood": ("a whole file as fast as possible in tiny frames", attack_audio_flood),
    "bad_text": ("200,000 nested brackets; Configure beam_size 2**70", attack_bad_text),
    "trickle": ("chunked /invocations bodies, 1 byte / 0.5 s", attack_trickle),
    "abandoned": ("sockets: one audio frame, then silence", attack_abandoned),
    "invocations": ("whole-file /invocations beyond their limit", attack_invocations),
    "raw_grpc_lead": (
        "raw-gRPC streams each allowed max_lead_seconds of lead (Triton's port; "
        "not reachable on SageMaker)",
        attack_raw_grpc_lead,
    ),
}


def run_attack(name: str, ctx: AttackCtx) -> dict:
    """In the attacker's process: one class, timed."""
    t0 = time.perf_counter()
    try:
        out = asyncio.run(CLASSES[name][1](ctx))
    except Exception as exc:  # noqa: BLE001 - recorded: the bench goes on
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["attack_s"] = round(time.perf_counter() - t0, 2)
    return out


# -- the report's arithmetic (unit-tested: tests/unit/test_bench_hostile.py) ------------------


def exact_count(expected: Sequence[str], got: Sequence[dict]) -> dict:
    """Bystanders whose finals equal the baseline's, and those that did not."""
    diff = [
        {"bystander": i, "expected": e, "got": g["final"], "close_code": g["close_code"]}
        for i, (e, g) in enumerate(zip(expected, got))
        if g["final"] != e or g["close_code"] != 1000
    ]
    return {"exact": len(got) - len(diff), "of": len(got), "changed": diff[:3]}


def bystander_summary(runs: Sequence[dict]) -> dict:
    lat = [x for r in runs for x in r["latency_s"]]
    errors: dict[str, int] = {}
    for r in runs:
        for e in r["errors"]:
            errors[e] = errors.get(e, 0) + 1
    return {
        "chunk_latency_ms": metrics.summarize(lat),
        "errors": errors,
        "close_codes": sorted({str(r["close_code"]) for r in runs}),
        "unanswered_frames": sum(max(0, r["sent"] - r["interims"]) for r in runs),
    }


def ping_summary(seen: Sequence[tuple[int, float]]) -> dict:
    codes: dict[str, int] = {}
    for c, _ in seen:
        codes[str(c)] = codes.get(str(c), 0) + 1
    return {
        "n": len(seen),
        "statuses": codes,
        "not_200": sum(1 for c, _ in seen if c != 200),
        "latency_ms": metrics.summarize([t for _, t in seen]),
    }


def rss_verdict(before_kib: int, peak_kib: int, after_kib: int, baseline_kib: int) -> dict:
    """RSS after the settle against before the attack (the target) and the run's
    first baseline; None when a figure is missing."""

    def rel(a: int, b: int) -> float | None:
        return round(100 * (a / b - 1), 1) if a and b else None

    after_vs_before = rel(after_kib, before_kib)
    return {
        "before_mib": round(before_kib / 1024, 1),
        "peak_mib": round(peak_kib / 1024, 1),
        "after_mib": round(after_kib / 1024, 1),
        "after_vs_before_pct": after_vs_before,
        "after_vs_baseline_pct": rel(after_kib, baseline_kib),
        "within_tolerance": None
        if after_vs_before is None
        else abs(after_vs_before) <= 100 * RSS_TOLERANCE,
    }


def class_targets(c: dict, budget_ms: float = LATENCY_BUDGET_MS) -> list[dict]:
    """Issue 21's targets for one class's result: met True / False, None if unmeasured."""
    ex, by, rss, ping = c["exact"], c["bystanders"], c["rss"], c["ping"]
    p99 = by["chunk_latency_ms"]["p99"]
    alive = c.get("server_alive", True)
    return [
        {
            "target": "the server survives (docker/serve and tritonserver up)",
            "measured": "up"
            if alive
            else f"exited {(c.get('server_exit') or {}).get('code')}: "
            + " | ".join((c.get("server_exit") or {}).get("log", [])[:2]),
            "met": alive,
        },
        {
            "target": "bystanders' finals exact",
            "measured": f"{ex['exact']} of {ex['of']}",
            "met": ex["of"] > 0 and ex["exact"] == ex["of"],
        },
        {
            "target": f"bystanders' p99 chunk latency ≤ {budget_ms:g} ms",
            "measured": f"p99 {p99} ms (p50 {by['chunk_latency_ms']['p50']})",
            "met": None if p99 is None else p99 <= budget_ms,
        },
        {
            "target": f"RSS within {100 * RSS_TOLERANCE:g} % of before, after the settle",
            "measured": f"{rss['after_mib']} vs {rss['before_mib']} MiB "
            f"({rss['after_vs_before_pct']} %), peak {rss['peak_mib']} MiB",
            "met": rss["within_tolerance"],
        },
        {
            "target": "/ping 200 throughout the attack",
            "measured": f"{ping['n'] - ping['not_200']} of {ping['n']} 200, "
            f"p99 {ping['latency_ms']['p99']} ms",
            "met": None if not ping["n"] else ping["not_200"] == 0,
        },
    ]


def attacker_outcome(name: str, a: dict) -> str:
    """One line: what the attacker got."""
    if "error" in a:
        return f"attack failed: {a['error']}"

    def ws(s: dict) -> str:
        after = s["closed_after_ms"]
        return (
            f"close {s['close_codes']}, Error {s['error_codes'] or '-'}, closed after "
            f"p50 {after['p50']} / max {after['max']} ms, {s['results_received']} results"
        )

    if name in ("reserved_fields", "bad_text"):
        return "; ".join(f"{k}: {ws(v)}" for k, v in a.items() if isinstance(v, dict))
    if name in ("keepalive_flood", "finalize_flood", "abandoned"):
        return f"{a['sockets']} socket(s), {a['frames_sent']} frames sent: {ws(a)}"
    if name == "audio_flood":
        return f"{a['audio_s']} s in {a['frame_ms']:g} ms frames: {ws(a)}"
    if name == "trickle":
        after = a["answered_after_ms"]
        return (
            f"{a['connections']} connections: {a['statuses']}, answered after p50 "
            f"{after['p50']} / max {after['max']} ms, {a['still_open_at_bound']} open "
            f"at {a['bound_s']:g} s"
        )
    if name == "invocations":
        return (
            f"{a['clients']} clients, {a['requests']} requests: {a['statuses']}; 200 p50 "
            f"{a['ok_ms']['p50']} ms, refused p50 {a['refused_ms']['p50']} ms "
            f"({a['refused_with_retry_after']} with Retry-After)"
        )
    if name == "raw_grpc_lead":
        closed = [f["closed_after_s"] for f in a["flooders"] if f["closed_after_s"] is not None]
        return (
            f"{a['streams']} streams x {a['audio_s_each']:g} s: {a['closed_at_lead']} closed "
            f"at max lead (after {min(closed, default=0):.0f}-{max(closed, default=0):.0f} s), "
            f"took {a['took_s']} s"
        )
    return json.dumps(a)[:200]


def markdown(result: dict) -> str:
    """The README.md table of one run."""
    run = result["run"]
    lines = [
        f"# Hostile clients beside {run['plan']['bystanders']} paced bystanders ({run['started']})",
        "",
        f"`python -m benchmarks.hostile{' --quick' if run['quick'] else ''}` on "
        f"{run['host']} ({run['cpu_count']} cores); load average at start "
        f"{run['loadavg_start']}, at end {run.get('loadavg_end')}. {run['note']} "
        f"Admission limit (calibrated at start-up): {run.get('admission_limit')} streams.",
        "",
        f"Bystanders: {run['plan']['bystanders']} WebSocket streams of "
        f"{run['plan']['bystander_s']:g} s of assets/eval speech at real time, "
        f"{run['plan']['frame_ms']:g} ms frames; chunk latency = send of a frame -> the "
        f"interim answering it. RSS = tritonserver + its Python stubs, "
        f"{run['plan']['settle_s']:g} s after the attack. Baseline (no attacker): "
        f"p50/p99 {result['baseline']['bystanders']['chunk_latency_ms']['p50']} / "
        f"{result['baseline']['bystanders']['chunk_latency_ms']['p99']} ms, RSS "
        f"{result['baseline']['rss_mib']} MiB"
        + (
            f"; again after every class: p50/p99 "
            f"{result['baseline_end']['bystanders']['chunk_latency_ms']['p50']} / "
            f"{result['baseline_end']['bystanders']['chunk_latency_ms']['p99']} ms, exact "
            f"{result['baseline_end']['exact']['exact']} / "
            f"{result['baseline_end']['exact']['of']}, RSS "
            f"{result['baseline_end']['rss_mib']} MiB."
            if "baseline_end" in result
            else "."
        ),
        "",
        "| attacker | what it got | bystanders exact | p50 / p99 ms | RSS before → peak → "
        "after MiB (Δ) | /ping during (200s, p99 ms) | Triton requests by attacker |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in result["classes"].items():
        lat = c["bystanders"]["chunk_latency_ms"]
        rss, ping = c["rss"], c["ping"]
        lines.append(
            f"| {name}: {c['what']} | {attacker_outcome(name, c['attacker'])} | "
            f"{c['exact']['exact']} / {c['exact']['of']} | {lat['p50']} / {lat['p99']} | "
            f"{rss['before_mib']} → {rss['peak_mib']} → {rss['after_mib']} "
            f"({rss['after_vs_before_pct']:+} %) | {ping['n'] - ping['not_200']}/{ping['n']}, "
            f"{ping['latency_ms']['p99']} | {c.get('attacker_triton_requests')} |"
        )
    for crash in result.get("server_crashes", []):
        lines += [
            "",
            f"**docker/serve exited during {crash['class']}** (exit {crash['code']}; restarted "
            f"for the remaining classes): " + " | ".join(f"`{x}`" for x in crash["log"][:3]),
        ]
    lines += ["", "Targets:", "", "| attacker | target | measured | met |", "|---|---|---|---|"]
    for name, c in result["classes"].items():
        for t in c["targets"]:
            met = "n/a" if t["met"] is None else "yes" if t["met"] else "**no**"
            lines.append(f"| {name} | {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


# -- the run ----------------------------------------------------------------------------


def baseline_summary(base: dict) -> dict:
    return {
        "bystanders": base["bystanders"],
        "finals": base["finals"],
        "rss_mib": base["rss"]["after_mib"],
        "ping": base["ping"],
        "triton_stream_requests": base["triton_stream_requests"],
        "loadavg": base["loadavg"],
    }


def run_class(
    name: str,
    serve: Serve,
    pool: ProcessPoolExecutor | None,
    rate: int,
    pcms: list[bytes],
    expected: list[str] | None,
    plan: Plan,
    baseline_kib: int,
    baseline_requests: float | None,
    progress: Callable[[str], None],
) -> dict:
    """Bystanders beside one attacker class (None: the baseline, no attacker)."""
    pid = serve.triton_pid()
    before = total_rss_kib(pid)
    requests_before = serve.stream_requests()
    ctx = AttackCtx(serve.url, serve.grpc_url, rate, plan)
    load_start = loadavg()

    async def both() -> tuple[list[dict], dict | None]:
        by = asyncio.create_task(run_bystanders(serve.url, pcms, plan.frame_ms, rate))
        attack = None
        if pool is not None:
            await asyncio.sleep(ATTACK_LEAD_IN_S)
            attack = asyncio.wrap_future(pool.submit(run_attack, name, ctx))
        runs = await by
        return runs, (await attack) if attack is not None else None

    with RssSampler(pid, RSS_EVERY_S) as rss, PingProbe(serve) as ping:
        runs, attacker = asyncio.run(both())
    ended = time.monotonic()
    requests_after = serve.stream_requests()
    requests = (
        None
        if requests_after is None or requests_before is None
        else requests_after - requests_before
    )
    alive = serve.proc.poll() is None
    series = []
    while alive:  # bounded: settle_s; nothing to settle when the server died
        since = time.monotonic() - ended
        series.append((round(since, 1), total_rss_kib(pid)))
        if since >= plan.settle_s:
            break
        time.sleep(min(SETTLE_SAMPLE_S, plan.settle_s - since))
    out: dict[str, Any] = {
        "what": CLASSES[name][0] if name in CLASSES else "no attacker",
        "loadavg": [load_start, loadavg()],
        "bystanders": bystander_summary(runs),
        "finals": [r["final"] for r in runs],
        "ping": ping_summary(ping.seen),
        "rss": rss_verdict(
            before, rss.peak, series[-1][1] if series else 0, baseline_kib or before
        ),
        "rss_series_kib": series,
        "gateway_rss_mib": round(_rss_kib(serve.proc.pid) / 1024, 1),
        "triton_stream_requests": requests,
        "server_alive": alive,
        "lead_closed_total": serve.metric("streamasr_lead_closed_streams_total") if alive else None,
    }
    if attacker is not None:
        out["attacker"] = attacker
        if baseline_requests is not None and requests is not None:
            out["attacker_triton_requests"] = round(requests - baseline_requests)
    out["exact"] = exact_count(expected or out["finals"], runs)
    if not alive:
        out["server_exit"] = {"code": serve.proc.returncode, "log": serve.crash_lines()}
    if name != "baseline":
        out["targets"] = class_targets(out)
    lat = out["bystanders"]["chunk_latency_ms"]
    progress(
        f"  {name}: exact {out['exact']['exact']}/{out['exact']['of']}, p50/p99 "
        f"{lat['p50']}/{lat['p99']} ms, RSS {out['rss']['before_mib']} -> "
        f"{out['rss']['peak_mib']} -> {out['rss']['after_mib']} MiB, /ping "
        f"{out['ping']['statuses']}"
        + (f"; attacker: {attacker_outcome(name, attacker)}" if attacker else "")
    )
    return out


def run(
    plan: Plan,
    classes: Sequence[str],
    *,
    quick: bool = False,
    log_path: Path = LOG,
    progress: Callable[[str], None] = print,
) -> dict:
    from streamasr.protocol.contract import ModelContract

    contract = ModelContract.from_onnx(
        REPO_ROOT / "model_repository" / "acoustic_model" / "1" / "model.onnx"
    )
    rate = contract.sample_rate
    result: dict[str, Any] = {
        "run": {
            "host": socket.gethostname(),
            "quick": quick,
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu_count": os.cpu_count(),
            "loadavg_start": loadavg(),
            "plan": dataclasses.asdict(plan),
            "note": "docker/serve with the repository's limits, gateway "
            "bound to 127.0.0.1; other sessions share these cores (load average above).",
        },
        "classes": {},
    }
    pcms = bystander_pcm(plan.bystanders, plan.bystander_s, rate)
    serve = Serve(log_path)
    restarts = 0
    t_start = time.monotonic()
    try:
        progress(f"hostile: starting docker/serve (log {log_path}) ...")
        serve.wait_ready(STARTUP_TIMEOUT_S)
        result["run"]["admission_limit"] = serve.metric("streamasr_stream_capacity")

        # warm-up: every bystander for half its audio (onnxruntime and the allocators
        # meet the batch sizes 8 streams make: a cold first run measured p99 2.2 s and
        # +225 MiB), then the baseline with no attacker
        def warm_up(serve: Serve) -> None:
            asyncio.run(
                run_bystanders(serve.url, [p[: len(p) // 2] for p in pcms], plan.frame_ms, rate)
            )

        warm_up(serve)
        progress(f"  baseline: {plan.bystanders} bystanders, no attacker")
        base = run_class("baseline", serve, None, rate, pcms, None, plan, 0, None, progress)
        result["baseline"] = baseline_summary(base)
        baseline_kib = int(base["rss"]["after_mib"] * 1024)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            for name in classes:
                progress(f"  {name}: {CLASSES[name][0]}")
                result["classes"][name] = run_class(
                    name,
                    serve,
                    pool,
                    rate,
                    pcms,
                    base["finals"],
                    plan,
                    baseline_kib,
                    base["triton_stream_requests"],
                    progress,
                )
                if serve.proc.poll() is not None:
                    # it may have exited after run_class looked (then it has no server_exit)
                    exit_ = result["classes"][name].get("server_exit") or {
                        "code": serve.proc.returncode,
                        "log": serve.crash_lines(),
                    }
                    crash = {"class": name, **exit_}
                    result.setdefault("server_crashes", []).append(crash)
                    progress(f"  !! docker/serve exited during {name}: {crash}")
                    serve.stop()
                    restarts += 1
                    serve = Serve(log_path.with_name(f"{log_path.stem}-{restarts}.log"))
                    progress("  restarting docker/serve for the remaining classes ...")
                    serve.wait_ready(STARTUP_TIMEOUT_S)
                    warm_up(serve)
        if serve.proc.poll() is None:
            # the same bystanders again with no attacker: how far the run drifted
            progress("  baseline again, after every class")
            again = run_class(
                "baseline",
                serve,
                None,
                rate,
                pcms,
                base["finals"],
                plan,
                baseline_kib,
                None,
                progress,
            )
            result["baseline_end"] = {**baseline_summary(again), "exact": again["exact"]}
    finally:
        result["run"]["exit_code"] = serve.stop()
    result["run"]["loadavg_end"] = loadavg()
    result["run"]["wall_s"] = round(time.monotonic() - t_start, 1)
    result["targets"] = [
        {"class": name, **t} for name, c in result["classes"].items() for t in c["targets"]
    ]
    return result


def write_results(result: dict, root: Path = RESULTS) -> Path:
    stamp = result["run"]["started"].replace("-", "").replace(":", "")[:13]
    folder = root / (stamp + ("-quick" if result["run"]["quick"] else ""))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "README.md").write_text(markdown(result))
    return folder


def parse_classes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] or list(CLASSES)
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown class(es) {unknown}; classes: {list(CLASSES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes (~3 min)")
    p.add_argument("--classes", type=parse_classes, default=list(CLASSES))
    p.add_argument("--settle", type=float, default=None, help="seconds before RSS 'after'")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--out", type=Path, default=RESULTS, help="results root")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if a.quick else FULL
    if a.settle is not None:
        plan = dataclasses.replace(plan, settle_s=a.settle)
    result = run(plan, a.classes, quick=a.quick)
    folder = write_results(result, a.out)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {folder}")
    missed = [t for t in result["targets"] if t["met"] is False]
    for t in missed:
        print(f"  MISSED {t['class']}: {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
