"""Two-pass finals vs one-pass, through the real server: WER/CER and final latency.

    python -m benchmarks.two_pass [--url 127.0.0.1:8001]   # against a running server
    (make bench runs it as one of its steps)

Each clip of the evaluation set (assets/eval/, real speech never trained on) is streamed
at real-time pace in the model's chunks, once through ``streaming_asr`` (finals from the
streaming CTC model) and once through ``streaming_asr_two_pass`` (finals re-decoded by
Whisper tiny.en), one stream at a time.  "Final latency" is the time from sending END
right after the clip's last chunk to the arrival of the last response: what a caller
waits for the final transcript once the speaker has stopped.  Interims are the same in
both modes (tests/test_two_pass.py asserts it), so their latency is measured by the
paced load sweep, not here.  Then two-pass final latency with several paced streams at
once (``--concurrency``): one ``final_pass`` instance serves their re-decodes in turn.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from streamasr.evaluation import load_eval_set, wer_cer
from streamasr_client.audio import load_audio
from streamasr_client.stream import STREAM_MODEL, TWO_PASS_MODEL, AsrConnection

from .metrics import summarize

log = logging.getLogger("benchmarks.two_pass")

MODES = {"one_pass": STREAM_MODEL, "two_pass": TWO_PASS_MODEL}


def stream_clip(
    conn: AsrConnection, audio: np.ndarray, chunk: int, rate: int, model: str, paced: bool = True
) -> tuple[str, float, int]:
    """(final transcript, END -> last response seconds, re-decoded finals) of one clip."""
    s = conn.open_session(model=model)
    t0 = time.perf_counter()
    for i in range(0, len(audio), chunk):
        if paced:  # a chunk is "spoken" by t0 + its end time
            delay = t0 + (i + len(audio[i : i + chunk])) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        s.send(audio[i : i + chunk])
    t_end = time.perf_counter()
    s.close()
    s.wait(timeout=300)
    latency = time.perf_counter() - t_end
    conn.forget(s)
    if s.errors:
        raise RuntimeError(f"{model}: {s.errors[0]}")
    return s.transcript, latency, sum(1 for m in s.finals if m.get("rescored"))


def concurrent_final_latency(
    conn: AsrConnection, audios: list[np.ndarray], chunk: int, rate: int, model: str, streams: int
) -> dict:
    """``streams`` paced streams at once, each going through every clip (starting at a
    different one): END -> last response of each clip, while the others keep streaming."""
    import threading

    lats: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(len(audios)):
            try:
                _, lat, _ = stream_clip(conn, audios[(k + j) % len(audios)], chunk, rate, model)
            except Exception as exc:  # noqa: BLE001 - recorded in the result
                with lock:
                    errors.append(str(exc)[:200])
                return
            with lock:
                lats.append(lat)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"streams": streams, "finals": len(lats), "errors": errors}
    if lats:
        out["final_latency_ms"] = summarize(lats)
    return out


def run(
    url: str,
    *,
    paced: bool = True,
    progress=log.info,
    limit: int | None = None,
    concurrency: tuple[int, ...] = (),
) -> dict:
    items = load_eval_set()[:limit] if limit else load_eval_set()
    refs = [it.reference for it in items]
    out: dict = {"clips": len(items), "paced": paced}
    with AsrConnection(url) as conn:
        contract = conn.contract()
        rate, chunk = contract.sample_rate, contract.chunk_samples
        audios = [load_audio(it.audio_path, rate) for it in items]
        out["audio_s"] = round(sum(len(a) for a in audios) / rate, 1)
        for mode, model in MODES.items():
            hyps, lats, rescored = [], [], 0
            for it, audio in zip(items, audios):
                text, lat, n = stream_clip(conn, audio, chunk, rate, model, paced)
                hyps.append(text)
                lats.append(lat)
                rescored += n
                log.debug("%s %s: %s", mode, it.name, text)
            score = wer_cer(refs, hyps)
            out[mode] = {
                "model": model,
                "wer": round(score["wer"], 4),
                "cer": round(score["cer"], 4),
                "final_latency_ms": summarize(lats),
                "rescored_finals": rescored,
                "examples": [
                    {"id": items[i].name, "ref": refs[i], "hyp": hyps[i]}
                    for i in range(min(2, len(items)))
                ],
            }
            progress(
                f"  {mode} ({model}): WER {score['wer']:.3f}, CER {score['cer']:.3f}, "
                f"END -> final p50 {out[mode]['final_latency_ms']['p50']} ms, "
                f"max {out[mode]['final_latency_ms']['max']} ms"
            )
        out["two_pass_concurrent"] = []
        for n in concurrency:
            level = concurrent_final_latency(conn, audios, chunk, rate, TWO_PASS_MODEL, n)
            out["two_pass_concurrent"].append(level)
            lat = level.get("final_latency_ms", {})
            progress(
                f"  two_pass, {n} streams at once: END -> final p50 {lat.get('p50')} ms, "
                f"max {lat.get('max')} ms, errors {len(level['errors'])}"
            )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.two_pass",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--fast", action="store_true", help="do not pace at real time")
    p.add_argument("--limit", type=int, help="only the first N clips")
    p.add_argument(
        "--concurrency",
        default="4,8",
        help="also: two-pass final latency with this many paced streams at once "
        "(comma list; empty: skip)",
    )
    p.add_argument("--json", type=str, help="write the result here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(
        a.url,
        paced=not a.fast,
        limit=a.limit,
        concurrency=tuple(int(x) for x in a.concurrency.split(",") if x.strip()),
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
