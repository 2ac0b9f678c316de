"""`make demo`: start a real Triton server, stream the bundled recording through it in
real time, print interim and final transcripts, stop the server.

Interims come from the streaming CTC model (--whisper-interims: re-decoded by Whisper
too, stable words shown plain, the tail in [brackets]); finals are re-decoded by Whisper
(two-pass, model streaming_asr_two_pass) unless --one-pass, and show how long after their
audio they arrived."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from streamasr.triton.server import REPO_ROOT, ServerConfig, ServerError, TritonServer, free_ports

DEMO_AUDIO = REPO_ROOT / "assets" / "demo.wav"
# The demo's switches (each maps onto a `transcribe` flag below).
SWITCHES = (
    ("--fast", "do not pace at real time"),
    ("--one-pass", "finals from the streaming CTC model too (model streaming_asr)"),
    ("--whisper-interims", "interims re-decoded by Whisper too (stream option interims=whisper)"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamasr.tools.demo", description=__doc__)
    p.add_argument("--audio", type=Path, default=DEMO_AUDIO)
    for flag, what in SWITCHES:
        p.add_argument(flag, action="store_true", help=what)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from streamasr_client import transcribe

    cfg = ServerConfig(**free_ports())
    server = TritonServer(cfg)
    print(f"Starting tritonserver on {cfg.host} (grpc :{cfg.grpc_port}) ...", flush=True)
    try:
        server.start()
    except ServerError as exc:
        print(exc, file=sys.stderr)
        server.stop()
        return 1
    try:
        reference = DEMO_AUDIO.with_suffix(".txt")
        print(
            f"Streaming {a.audio.name}"
            + ("" if a.fast else " in real time")
            + ": interims as '…', finals with times"
            + ("" if a.one_pass else " (finals re-decoded by Whisper)")
            + "\n",
            flush=True,
        )
        code = transcribe.main(
            [str(a.audio), "--url", server.grpc_url]
            + ([] if a.fast else ["--realtime"])
            + ([] if a.one_pass else ["--two-pass"])
            + (["--whisper-interims"] if a.whisper_interims else [])
        )
        if a.audio == DEMO_AUDIO and reference.exists():
            print("\nReference:\n" + reference.read_text().strip())
        return code
    finally:
        print("\nStopping tritonserver ...", flush=True)
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
