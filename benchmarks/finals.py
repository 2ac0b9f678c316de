"""How soon a final follows the speaker stopping, through the real server, paced.

    python -m benchmarks.finals --start-server [--streams 1,8] [--chunk-ms 400]
    (make bench runs it as one of its steps, 1 and 8 streams)

Each clip (``demo.wav`` and ``assets/eval``) is streamed at real-time pace in a live
client's requests (``streamasr_client.audio.LIVE_CHUNK_MS``), followed by
``--silence`` seconds of silence (zeros, paced too), and only then END: so a final that
arrives before END was sent by an endpoint, not by END's flush.  Per mode
(``one_pass``: ``streaming_asr``; ``two_pass``: ``streaming_asr_two_pass``, finals
re-decoded by Whisper), default stream options:

* **last word -> final**: for every final with ``speech_final=true``, its arrival (on
  the stream's clock: 0 = its first sample spoken) minus the end of its last word (the
  one-pass word times: the CTC alignment, the same however the stream is cut).  An
  utterance whose final came only with END counts as ``not_endpointed`` (the silence
  was too short for the endpoint rule) and is left out of the percentiles;
* finals WER/CER on ``assets/eval`` (finals joined per clip), and fragmentation: finals
  with words per ``assets/eval`` clip (demo.wav: its 5 sentences).

With ``--streams N`` > 1, N such streams run at once, each through every clip starting at
a different one.  Load average is recorded with every level (2 shared cores).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamasr import protocol
from streamasr.cli import argument_parser
from streamasr.core.evaluation import load_eval_set, wer_cer
from streamasr_client.audio import LIVE_CHUNK_MS, load_audio
from streamasr_client.stream import STREAM_MODEL, TWO_PASS_MODEL, AsrConnection

from .load import rotate_clips
from .metrics import summarize
from .result import Target
from .server_stats import CpuMeter, loadavg

log = logging.getLogger("benchmarks.finals")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo.wav"
MODES = {"one_pass": STREAM_MODEL, "two_pass": TWO_PASS_MODEL}
#: Silence streamed after each clip before END: longer than the slowest endpoint measured
#: (2.2 s before VAD endpointing), so every utterance can end by an endpoint.
DEFAULT_SILENCE_S = 2.5
#: Issue 24's targets: last word -> final p50, per mode, at 1 and at 8 streams.
TARGET_P50_MS = {"one_pass": 500.0, "two_pass": 700.0}


@dataclass
class ClipRun:
    name: str
    finals: list[dict] = field(default_factory=list)  # finals with words, in order
    latencies: list[float] = field(default_factory=list)  # s, endpointed finals
    not_endpointed: int = 0
    audio_s: float = 0.0  # streamed, silence included


def stream_clip(
    conn: AsrConnection,
    name: str,
    audio: np.ndarray,
    chunk: int,
    rate: int,
    model: str,
    silence_s: float,
    options: dict | None = None,
) -> ClipRun:
    arrivals: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    s = conn.open_session(
        model=model,
        options=options,
        on_message=lambda m: arrivals.append((time.perf_counter() - t0, m)),
    )
    padded = np.concatenate([audio, np.zeros(int(silence_s * rate), audio.dtype)])
    for i in range(0, len(padded), chunk):
        piece = padded[i : i + chunk]
        delay = t0 + (i + len(piece)) / rate - time.perf_counter()  # "spoken" by then
        if delay > 0:
            time.sleep(delay)
        s.send(piece)
    end_sent = time.perf_counter() - t0
    s.close()
    s.wait(timeout=300)
    conn.forget(s)
    if s.errors:
        raise RuntimeError(f"{model}: {s.errors[0]}")
    run = ClipRun(name, audio_s=len(padded) / rate)
    for at, m in arrivals:
        if not (protocol.is_results(m) and m.get("is_final") and protocol.words(m)):
            continue
        run.finals.append(m)
        last_end = float(protocol.words(m)[-1]["end"])
        if at < end_sent and m.get("speech_final"):
            run.latencies.append(at - last_end)
        else:
            run.not_endpointed += 1
    return run


def run_level(
    conn: AsrConnection,
    clips: list[tuple[str, np.ndarray, str]],
    chunk: int,
    rate: int,
    mode: str,
    streams: int,
    silence_s: float,
    options: dict,
    server_pid: int | None = None,
) -> dict:
    """``streams`` paced streams, each through every clip (starting at a different one)."""
    load_before = loadavg()
    cpu = CpuMeter(server_pid)
    cpu.start()

    def one(i: int) -> ClipRun:
        name, audio, _ = clips[i]
        return stream_clip(conn, name, audio, chunk, rate, MODES[mode], silence_s, options)

    runs, errors = rotate_clips(streams, len(clips), one)
    used = cpu.stop()
    out: dict = {
        "mode": mode,
        "streams": streams,
        "chunk_ms": round(1000 * chunk / rate),
        "options": options,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "errors": errors,
        "last_word_to_final_ms": summarize([x for r in runs for x in r.latencies]),
        "not_endpointed": sum(r.not_endpointed for r in runs),
    }
    refs = {name: ref for name, _, ref in clips if ref is not None}
    evals = [r for r in runs if r.name in refs]
    if evals:
        score = wer_cer(
            [refs[r.name] for r in evals],
            [" ".join(protocol.transcript(m) for m in r.finals) for r in evals],
        )
        out["finals_wer"] = round(score["wer"], 4)
        out["finals_cer"] = round(score["cer"], 4)
        out["finals_per_eval_clip"] = round(sum(len(r.finals) for r in evals) / len(evals), 3)
    if server_pid:  # the server's CPU per second of audio streamed (silence included)
        audio_s = sum(r.audio_s for r in runs)
        server_cpu = sum(v for k, v in used["cpu_s"].items() if not k.startswith("client"))
        out["server_cpu_s_per_audio_s"] = round(server_cpu / audio_s, 4) if audio_s else None
    demo = [len(r.finals) for r in runs if r.name == "demo"]
    if demo:
        out["finals_per_demo"] = round(sum(demo) / len(demo), 2)
    return out


def run(
    url: str,
    *,
    modes: tuple[str, ...] = tuple(MODES),
    streams: tuple[int, ...] = (1, 8),
    chunk_ms: int | None = None,
    silence_s: float = DEFAULT_SILENCE_S,
    options: dict | None = None,
    limit: int | None = None,
    server_pid: int | None = None,
    progress=log.info,
) -> dict:
    items = load_eval_set()[:limit] if limit else load_eval_set()
    out: dict = {"silence_s": silence_s, "levels": []}
    with AsrConnection(url) as conn:
        contract = conn.contract()
        rate = contract.sample_rate
        chunk = rate * (chunk_ms or LIVE_CHUNK_MS) // 1000
        clips = [("demo", load_audio(DEMO, rate), None)] + [
            (it.name, load_audio(it.audio_path, rate), it.reference) for it in items
        ]
        out["audio_s"] = round(sum(len(a) for _, a, _ in clips) / rate, 1)
        for mode in modes:
            for n in streams:
                level = run_level(
                    conn, clips, chunk, rate, mode, n, silence_s, options or {}, server_pid
                )
                out["levels"].append(level)
                lat = level["last_word_to_final_ms"]
                progress(
                    f"  {mode}, {n} stream(s), {level['chunk_ms']} ms chunks: last word -> "
                    f"final p50 {lat['p50']} ms p99 {lat['p99']} ms (n {lat['n']}, not "
                    f"endpointed {level['not_endpointed']}); finals WER "
                    f"{level.get('finals_wer')}, finals/clip {level.get('finals_per_eval_clip')}; "
                    f"server CPU {level.get('server_cpu_s_per_audio_s')} s/audio s; "
                    f"load {level['loadavg_before'][0]:.1f}->{level['loadavg_after'][0]:.1f}"
                )
    return out


def targets(res: dict) -> list[Target]:
    out = []
    for lv in res.get("levels", []):
        goal = TARGET_P50_MS.get(lv["mode"])
        p50 = lv["last_word_to_final_ms"].get("p50")
        if goal is None:
            continue
        out.append(
            Target(
                f"{lv['mode']} last word -> final p50 ≤ {goal:.0f} ms, {lv['streams']} stream(s)",
                "not measured" if p50 is None else f"{p50:.0f} ms",
                None if p50 is None else bool(p50 <= goal),
            )
        )
    return out


def section(res: dict) -> list[str]:
    """Markdown table of a run (also used by the bench report)."""
    md = [
        f"Clips: demo.wav + assets/eval, each followed by {res.get('silence_s')} s of "
        "silence before END; last word -> final over finals sent by an endpoint.",
        "",
        "| mode | streams | chunk | last word -> final p50 / p99 (n) | not endpointed | "
        "finals WER | finals per eval clip | demo finals | server CPU s / audio s | "
        "load avg (1 min) before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in res.get("levels", []):
        lat = lv["last_word_to_final_ms"]
        wer = lv.get("finals_wer")
        md.append(
            f"| {lv['mode']} | {lv['streams']} | {lv['chunk_ms']} ms | {lat['p50']} / "
            f"{lat['p99']} ms ({lat['n']}) | {lv['not_endpointed']} | "
            f"{'' if wer is None else f'{100 * wer:.1f} %'} | "
            f"{lv.get('finals_per_eval_clip')} | {lv.get('finals_per_demo')} | "
            f"{lv.get('server_cpu_s_per_audio_s', '–')} | "
            f"{lv['loadavg_before'][0]:.2f} -> {lv['loadavg_after'][0]:.2f} |"
        )
    return md


def main(argv=None) -> int:
    p = argument_parser("python -m benchmarks.finals", __doc__)
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--start-server", action="store_true", help="start a tritonserver for the run")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--streams", default="1,8", help="comma list of stream counts")
    p.add_argument(
        "--chunk-ms", type=int, help=f"client chunk (default: a live client's {LIVE_CHUNK_MS} ms)"
    )
    p.add_argument("--silence", type=float, default=DEFAULT_SILENCE_S, help="s after each clip")
    p.add_argument("--options", default="{}", help="stream options as JSON")
    p.add_argument("--limit", type=int, help="only the first N eval clips")
    p.add_argument("--label", default="", help="written into the result (e.g. before/after)")
    p.add_argument("--json", type=Path, help="write the result here (and a .md beside it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if set(modes) - set(MODES):
        p.error(f"unknown mode(s) {sorted(set(modes) - set(MODES))}")
    kw = dict(
        modes=modes,
        streams=tuple(int(x) for x in a.streams.split(",") if x.strip()),
        chunk_ms=a.chunk_ms,
        silence_s=a.silence,
        options=json.loads(a.options),
        limit=a.limit,
    )
    if a.start_server:
        from streamasr.triton.server import ServerConfig, TritonServer, free_ports

        server = TritonServer(ServerConfig(**free_ports()))
        server.start()
        try:
            res = run(server.grpc_url, server_pid=server.proc.pid, **kw)
        finally:
            server.stop()
    else:
        res = run(a.url, **kw)
    res["label"] = a.label
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))
        md = [f"# Last word -> final {a.label}".rstrip(), ""] + section(res)
        md += ["", "| target | measured | met |", "|---|---|---|"]
        md += [
            f"| {t.target} | {t.measured} | "
            f"{'yes' if t.met else ('**no**' if t.met is False else '–')} |"
            for t in targets(res)
        ]
        a.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
