"""Paced streaming load against a running `streaming_asr` server.

N concurrent *speakers*, each speaking real recordings back to back at real-time pace in
chunks of C ms (C from the model contract unless ``--chunk-ms``), each recording one
session (a Triton sequence), sessions multiplexed over ``--connections`` persistent gRPC
streams (``AsrConnection``).  The sender is open-loop: chunk *i* goes out when its last
sample has been "spoken", whether or not earlier results came back, so an overloaded
server shows up as growing latency instead of a politely slowed client.

Measured per level (N):
* chunk latency: send of a chunk -> arrival of the interim that completes it;
* first text: speech onset (energy detector) spoken -> first non-empty transcript;
  onset interim: onset spoken -> the interim of the chunk holding the onset;
* final: the END request (last chunk) sent -> its final result;
* send lateness (the client fell behind its own schedule) and result lag (a result that
  arrives after the next chunk was spoken; a lag that grows = the server falls behind);
* errors and missing responses.

    .venv/bin/python -m benchmarks.load --url 127.0.0.1:8001 --http-url 127.0.0.1:8000 \\
        --streams 1,2,4,8 --duration 15

Loopback only: ``--url`` must be a 127.x / localhost address.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from streamasr import protocol
from streamasr_client.audio import load_audio
from streamasr_client.stream import AsrConnection, AsrError, Session

from . import metrics
from .server_stats import CpuMeter, StatsSnapshot, loadavg, stats_delta

R = TypeVar("R")

log = logging.getLogger("benchmarks.load")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_WAV = REPO_ROOT / "assets" / "demo.wav"
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox/*.wav"


# -- audio -----------------------------------------------------------------------------
@dataclass
class Clip:
    name: str
    audio: np.ndarray
    onset: int | None  # first speech sample (energy detector), None: silence


def load_clips(sample_rate: int, paths: list[str] | None = None) -> list[Clip]:
    """The recordings the speakers say: ``paths``, else assets/demo.wav (30 s) and the
    LibriVox clips shipped with pocketsphinx (3-7 s each): real speech, and sessions short
    enough that every level sees many speech onsets and ends."""
    if not paths:
        # short clips first: a speaker starts on them, so even a 1-stream level of 20 s
        # holds several sessions (onsets, finals)
        paths = sorted(glob.glob(LIBRIVOX)) + ([str(DEMO_WAV)] if DEMO_WAV.exists() else [])
    if not paths:
        raise FileNotFoundError(f"no speech audio: neither {DEMO_WAV} nor {LIBRIVOX}")
    clips = []
    for p in paths:
        a = load_audio(p, sample_rate)
        clips.append(Clip(Path(p).stem, a, metrics.speech_onset(a, sample_rate)))
    return clips


def rotate_clips(
    streams: int, clips: int, stream_clip: Callable[[int], R]
) -> tuple[list[R], list[str]]:
    """``streams`` threads at once, thread k streaming clip k, k+1, ... (each thread every
    clip, starting at a different one) through ``stream_clip(index)``; (the results, the
    errors: a thread stops at its first, which is recorded, not raised)."""
    runs: list[R] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(clips):
            try:
                run = stream_clip((k + j) % clips)
            except Exception as exc:  # noqa: BLE001 - recorded in the result
                with lock:
                    errors.append(str(exc)[:200])
                return
            with lock:
                runs.append(run)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs, errors


def _check_loopback(url: str) -> None:
    host = url.rsplit(":", 1)[0].strip("[]")
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise SystemExit(f"refusing to load {url}: the benchmark only targets loopback")


# -- a session that timestamps its results ---------------------------------------------
@dataclass(eq=False)
class TimedSession(Session):
    """A Session that records when each result arrives.

    Every request that carries audio is answered by messages ending with exactly one
    interim (docs/results.md), and the Session releases responses in send order, so the
    k-th interim released completes the k-th chunk; times are arrival times (a two-pass
    final's response arrives after later chunks' responses, which wait for it)."""

    clip: Clip | None = None
    t_capture0: float = 0.0  # wall time sample 0 was "spoken"
    due_t: list = field(default_factory=list)
    send_t: list = field(default_factory=list)
    done_t: list = field(default_factory=list)
    first_text_t: float | None = None
    all_answered_t: float | None = None
    final_text: str = ""
    on_done: Callable[["TimedSession"], None] | None = None

    def _release(self, msgs, error, arrived):
        t = arrived
        for m in msgs:
            if not protocol.is_results(m):
                continue
            text = protocol.transcript(m)
            if text and self.first_text_t is None:
                self.first_text_t = t
            if protocol.is_final(m):
                self.final_text = (
                    (self.final_text + " " + text).strip() if text else self.final_text
                )
            else:
                self.done_t.append(t)
        super()._release(msgs, error, arrived)
        if self.closed and self.pending <= 0:
            self.all_answered_t = t
        if self.on_done is not None:
            self.on_done(self)


def open_timed(conn: AsrConnection, cls: type = TimedSession, **kw) -> TimedSession:
    """Like ``conn.open_session()`` but returns a TimedSession (or ``cls``)."""
    return conn.open_session(session_class=cls, **kw)


# -- speakers --------------------------------------------------------------------------
class Speaker:
    """Says clip after clip on one connection; one session per clip."""

    def __init__(
        self,
        idx: int,
        conn: AsrConnection,
        clips: list[Clip],
        chunk: int,
        sample_rate: int,
        on_done=None,
    ):
        self.idx, self.conn, self.clips = idx, conn, clips
        self.chunk, self.rate = chunk, sample_rate
        self.on_done = on_done
        self.sessions: list[TimedSession] = []
        self._n = 0
        self.session: TimedSession | None = None
        self._pieces: list[np.ndarray] = []
        self._dues: list[float] = []
        self._i = 0

    def begin(self, t_capture0: float) -> float:
        clip = self.clips[(self.idx + self._n) % len(self.clips)]
        self._n += 1
        self.session = open_timed(self.conn, clip=clip, t_capture0=t_capture0, on_done=self.on_done)
        self.sessions.append(self.session)
        a = clip.audio
        self._pieces = [a[i : i + self.chunk] for i in range(0, len(a), self.chunk)]
        ends = np.minimum(np.arange(1, len(self._pieces) + 1) * self.chunk, len(a))
        self._dues = [float(t_capture0 + e / self.rate) for e in ends]
        self._i = 0
        return self._dues[0]

    @property
    def last_due(self) -> float:
        return self._dues[-1]

    def send_next(self, due: float | None, end: bool = False) -> bool:
        """Send the next chunk (END with the last one, or with this one when ``end``);
        True when the session is done."""
        s, i = self.session, self._i
        last = end or i == len(self._pieces) - 1
        s.due_t.append(due if due is not None else time.perf_counter())
        s.send_t.append(time.perf_counter())
        if last:
            s.close(self._pieces[i])
            self._dues = self._dues[: i + 1]
        else:
            s.send(self._pieces[i])
        self._i += 1
        return last

    def next_due(self) -> float:
        return self._dues[self._i]


# -- one measured level ----------------------------------------------------------------
class Probe:
    """Server statistics, per-process CPU and load average around a measurement."""

    def __init__(self, http_url: str | None, server_pid: int | None):
        self.http_url = http_url
        self.cpu = CpuMeter(server_pid)
        self._snap = None

    def start(self) -> None:
        self._load0 = loadavg()
        self.cpu.start()
        self._snap = StatsSnapshot.take(self.http_url) if self.http_url else None

    def stop(self) -> dict:
        out = {"loadavg_before": self._load0, "loadavg_after": loadavg(), "cpu": self.cpu.stop()}
        if self._snap is not None:
            out["server"] = stats_delta(self._snap, StatsSnapshot.take(self.http_url))
        return out


def _collect(sessions: list[TimedSession], chunk_s: float, rate: int) -> dict:
    chunk_lat, late, first_text, onset_int, final = [], [], [], [], []
    errors: list[str] = []
    missing = late_chunks = growing = 0
    max_lag = 0.0
    for s in sessions:
        errors += s.errors
        missing += s.pending
        n = len(s.send_t)
        chunk_lat += [d - t for d, t in zip(s.done_t[:n], s.send_t)]
        late += metrics.lateness(s.due_t, s.send_t)
        answered = list(s.done_t[:n]) + [None] * max(0, n - len(s.done_t))
        if s.all_answered_t is not None and answered:
            answered[-1] = answered[-1] or s.all_answered_t
        b = metrics.behind_real_time(s.due_t, answered, chunk_s)
        late_chunks += b["late"]
        growing += int(b["growing"])
        max_lag = max(max_lag, b["max_lag_s"] or 0.0)
        if s.clip is not None and s.clip.onset is not None:
            onset_t = s.t_capture0 + s.clip.onset / rate
            if s.first_text_t is not None:
                first_text.append(s.first_text_t - onset_t)
            j = int(s.clip.onset // int(round(chunk_s * rate)))
            if j < len(s.done_t):
                onset_int.append(s.done_t[j] - onset_t)
        if s.all_answered_t is not None and s.send_t:
            final.append(s.all_answered_t - s.send_t[-1])
    return {
        "sessions": len(sessions),
        "chunks": sum(len(s.send_t) for s in sessions),
        "chunk_latency_ms": metrics.summarize(chunk_lat),
        "send_lateness_ms": metrics.summarize(late),
        "first_text_ms": metrics.summarize(first_text),
        "onset_interim_ms": metrics.summarize(onset_int),
        "final_ms": metrics.summarize(final),
        "late_chunks": late_chunks,
        "streams_falling_behind": growing,
        "max_result_lag_ms": round(max_lag * 1000, 1),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "missing": missing,
    }


def _connections(url: str, n: int) -> list[AsrConnection]:
    conns = [AsrConnection(url) for _ in range(n)]
    for c in conns:
        c.wait_ready(30)
    return conns


def _drain(sessions: list[TimedSession], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for s in sessions:
        try:
            s.wait(max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            pass


def run_level(
    url: str,
    clips: list[Clip],
    streams: int,
    *,
    chunk_samples: int,
    sample_rate: int,
    duration_s: float,
    connections: int = 1,
    probe: Probe | None = None,
    drain_s: float = 30.0,
) -> dict:
    """``streams`` paced speakers for ``duration_s``: at the deadline each speaker's
    next chunk ends its session (END); returns the level's figures."""
    _check_loopback(url)
    conns = _connections(url, max(1, min(connections, streams)))
    chunk_s = chunk_samples / sample_rate
    speakers = [
        Speaker(i, conns[i % len(conns)], clips, chunk_samples, sample_rate) for i in range(streams)
    ]
    t0 = time.perf_counter() + 0.2
    heap = []
    for sp in speakers:  # phases spread evenly over one chunk
        heapq.heappush(heap, (sp.begin(t0 + sp.idx * chunk_s / streams - chunk_s), sp.idx))
    deadline = t0 + duration_s
    if probe:
        probe.start()
    started = time.perf_counter()
    aborted = None
    try:
        while heap:
            due, i = heapq.heappop(heap)
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sp = speakers[i]
            if sp.send_next(due, end=due >= deadline):
                if sp.last_due < deadline:
                    heapq.heappush(heap, (sp.begin(sp.last_due), i))
            else:
                heapq.heappush(heap, (sp.next_due(), i))
        sessions = [s for sp in speakers for s in sp.sessions]
        _drain(sessions, drain_s)
    except AsrError as exc:  # the gRPC stream broke (server gone): say so
        aborted = str(exc)
        log.error("level with %d streams aborted: %s", streams, exc)
    sessions = [s for sp in speakers for s in sp.sessions]
    elapsed = time.perf_counter() - started
    try:
        extra = probe.stop() if probe else {}
    except OSError as exc:  # statistics API unreachable
        extra = {"probe_error": str(exc)}
    for c in conns:
        c.close()
    out = {
        "streams": streams,
        "connections": len(conns),
        "chunk_ms": round(chunk_s * 1000, 1),
        "wall_s": round(elapsed, 2),
        "aborted": aborted,
        "audio_s": round(sum(len(s.send_t) for s in sessions) * chunk_s, 1),
        **_collect(sessions, chunk_s, sample_rate),
        **extra,
    }
    return out


def sweep(
    url: str,
    clips: list[Clip],
    levels: list[int],
    *,
    chunk_samples: int,
    sample_rate: int,
    duration_s: float,
    connections: int,
    budget_ms: float,
    probe: Probe | None = None,
    beyond: int = 1,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Run the levels upward; stop at the ``beyond``-th level that misses the budget, or
    at the first that misses it by more than 4x (the overloaded side of the knee is
    measured, not extrapolated, but a hopeless level is not repeated larger)."""
    results, misses = [], 0
    for n in levels:
        progress(f"  load: {n} stream(s) for {duration_s:.0f} s ...")
        r = run_level(
            url,
            clips,
            n,
            chunk_samples=chunk_samples,
            sample_rate=sample_rate,
            duration_s=duration_s,
            connections=connections,
            probe=probe,
        )
        r["within_budget"] = metrics.level_ok(r, budget_ms)
        results.append(r)
        lat = r["chunk_latency_ms"]
        progress(
            f"    p50 {lat['p50']} ms  p99 {lat['p99']} ms  errors {r['errors']}  "
            f"missing {r['missing']}  late chunks {r['late_chunks']}  "
            f"load {r.get('loadavg_after', ['?'])[0]}  "
            f"{'OK' if r['within_budget'] else 'OVER BUDGET'}"
        )
        if r.get("aborted"):
            progress(f"    level aborted: {r['aborted']}")
            break
        if not r["within_budget"]:
            misses += 1
            p99 = lat["p99"]
            if misses >= beyond or p99 is None or p99 > 4 * budget_ms:
                break
    return results


# -- closed loop: the most the server does ---------------------------------------------
def saturate(
    url: str,
    clips: list[Clip],
    streams: int,
    *,
    chunk_samples: int,
    sample_rate: int,
    duration_s: float,
    connections: int = 1,
    probe: Probe | None = None,
) -> dict:
    """``streams`` sessions sending as fast as the server answers (one request in
    flight each): the server's throughput limit and the batch sizes it forms then."""
    _check_loopback(url)
    conns = _connections(url, max(1, min(connections, streams)))
    ready: "queue.Queue[int]" = queue.Queue()
    speakers = [
        Speaker(
            i,
            conns[i % len(conns)],
            clips,
            chunk_samples,
            sample_rate,
            on_done=lambda s, i=i: ready.put(i),
        )
        for i in range(streams)
    ]
    now = time.perf_counter()
    for sp in speakers:
        sp.begin(now)
    if probe:
        probe.start()
    started = time.perf_counter()
    deadline = started + duration_s
    aborted = None
    try:
        for sp in speakers:
            if sp.send_next(None):
                sp.begin(time.perf_counter())
        active = streams
        while active:
            try:
                i = ready.get(timeout=30)
            except queue.Empty:
                break
            sp = speakers[i]
            if sp.session.pending:
                continue  # an answer for an older session
            if time.perf_counter() >= deadline:
                if sp.session.send_t and not sp.session.closed:
                    sp.session.close()  # END without audio: the server frees it now
                active -= 1
                continue
            if sp.send_next(None):
                sp.begin(time.perf_counter())
    except AsrError as exc:
        aborted = str(exc)
        log.error("closed-loop run aborted: %s", exc)
    elapsed = time.perf_counter() - started
    try:
        extra = probe.stop() if probe else {}
    except OSError as exc:
        extra = {"probe_error": str(exc)}
    sessions = [s for sp in speakers for s in sp.sessions]
    try:
        _drain(sessions, 10)
    except AsrError:
        pass
    for c in conns:
        c.close()
    chunk_s = chunk_samples / sample_rate
    lat = metrics.summarize(d - t for s in sessions for d, t in zip(s.done_t, s.send_t))
    audio_s = sum(len(s.send_t) for s in sessions) * chunk_s
    return {
        "streams": streams,
        "wall_s": round(elapsed, 2),
        "aborted": aborted,
        "audio_s": round(audio_s, 1),
        "realtime_factor": round(audio_s / elapsed, 2),
        "chunk_latency_ms": lat,
        "errors": sum(len(s.errors) for s in sessions),
        **extra,
    }


MAX_STREAMS = 1024  # one level never opens more sessions at once than this


def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1 or levels[-1] > MAX_STREAMS:
        raise argparse.ArgumentTypeError(
            f"levels are integers 1..{MAX_STREAMS}, comma separated, e.g. 1,2,4,8"
        )
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address (loopback)")
    p.add_argument(
        "--http-url",
        default=None,
        help="Triton HTTP address, to read the statistics API (optional)",
    )
    p.add_argument("--streams", type=parse_levels, default=parse_levels("1,2,4,8,16,24,32"))
    p.add_argument(
        "--connections", type=int, default=1, help="gRPC streams the sessions are spread over"
    )
    p.add_argument("--chunk-ms", type=float, default=None, help="default: the model's chunk")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    p.add_argument("--budget-ms", type=float, default=250.0, help="p99 chunk-latency budget")
    p.add_argument("--audio", nargs="*", default=None, help="recordings to say")
    p.add_argument("--json", type=Path, default=None, help="write the levels here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _check_loopback(a.url)
    with AsrConnection(a.url) as c:
        contract = c.contract()
    chunk = (
        int(round(a.chunk_ms * contract.sample_rate / 1000))
        if a.chunk_ms
        else contract.chunk_samples
    )
    clips = load_clips(contract.sample_rate, a.audio)
    probe = Probe(a.http_url, None)
    levels = sweep(
        a.url,
        clips,
        a.streams,
        chunk_samples=chunk,
        sample_rate=contract.sample_rate,
        duration_s=a.duration,
        connections=a.connections,
        budget_ms=a.budget_ms,
        probe=probe,
    )
    held = metrics.held_level(levels, a.budget_ms)
    print(f"largest N within p99 <= {a.budget_ms:g} ms: {held['streams'] if held else 'none'}")
    if a.json:
        a.json.write_text(json.dumps(levels, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
