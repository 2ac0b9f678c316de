"""transcribe — stream audio to a streamasr Triton server and show live captions.

    transcribe recording.flac                      # as fast as the server answers
    transcribe recording.wav --realtime            # paced like a live microphone
    arecord -f S16_LE -r 16000 | transcribe - --rate 16000
    transcribe talk.mp3 --json                     # raw result messages, one per line

Chunk size, sample rate and everything else about the model come from the server's
`model_contract` model; the flags only override them.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, TextIO

import numpy as np

from streamasr import protocol
from streamasr.protocol import TWO_PASS_MODEL
from streamasr_client.audio import LIVE_CHUNK_MS, load_audio, pcm_chunks, stdin_binary
from streamasr_client.stream import AsrConnection, AsrError, Session


def _fmt_final(m: dict, lag_s: float | None = None) -> str:
    alt = protocol.alternative(m)
    start, end = m["start"], m["start"] + m["duration"]
    tag = (
        "final"
        + (", endpoint" if m.get("speech_final") else "")
        + (", finalize" if m.get("from_finalize") else "")
        + (", re-decoded" if m.get("rescored") else "")
        + (f", {1000 * max(lag_s, 0.0):.0f} ms after its audio" if lag_s is not None else "")
    )
    return f"[{start:7.2f} - {end:7.2f}] {alt['transcript']}  ({tag}, conf {alt['confidence']:.2f})"


def _interim_text(m: dict) -> str:
    """The interim's words; with Whisper interims the unstable tail in [brackets]."""
    alt = protocol.alternative(m)
    words = alt["words"]
    if not words or "stable" not in words[0]:
        return alt["transcript"]
    stable = [w["word"] for w in words if w["stable"]]
    tail = [w["word"] for w in words if not w["stable"]]
    return " ".join(stable + ([f"[{' '.join(tail)}]"] if tail else []))


class Display:
    """Interims rewrite one line on a terminal (or print as '…' lines when piped);
    finals and errors get lines of their own."""

    def __init__(self, out: TextIO, as_json: bool, show_interims: bool = True):
        self.out = out
        self.json = as_json
        self.tty = out.isatty()
        self.show_interims = show_interims
        self._last_interim = ""
        self._lock = threading.Lock()
        #: wall-clock time of the stream's first sample when audio is paced in real time:
        #: finals then show how long after their audio they arrived
        self.t0: float | None = None

    def __call__(self, m: dict) -> None:
        with self._lock:
            if self.json:
                self.out.write(json.dumps(m, ensure_ascii=False) + "\n")
            elif m.get("type") == "Error":
                self._clear()
                self.out.write(f"error: {m['message']}\n")
            elif protocol.is_results(m):
                text = protocol.transcript(m)
                if protocol.is_final(m):
                    self._clear()
                    lag = (
                        time.monotonic() - self.t0 - m["start"] - m["duration"]
                        if self.t0 is not None
                        else None
                    )
                    if text:
                        self.out.write(_fmt_final(m, lag) + "\n")
                    self._last_interim = ""
                elif self.show_interims and _interim_text(m) != self._last_interim:
                    text = self._last_interim = _interim_text(m)
                    if self.tty:
                        self.out.write("\r\033[K\033[2m" + text[-200:] + "\033[0m")
                    elif text:
                        self.out.write(f"  … {text}\n")
            elif m.get("type") == "UtteranceEnd":
                self._clear()
                if self.tty:
                    self.out.write(f"  (utterance end at {m.get('last_word_end', 0):.2f} s)\n")
            self.out.flush()

    def _clear(self) -> None:
        if self.tty and self._last_interim:
            self.out.write("\r\033[K")


def chunks_of(audio: np.ndarray, size: int) -> Iterable[np.ndarray]:
    for i in range(0, len(audio), size):
        yield audio[i : i + size]


def stream_chunks(
    session: Session,
    chunks: Iterable[np.ndarray],
    sample_rate: int,
    *,
    realtime: bool,
    finalize_every: float | None = None,
    keepalive_every: float | None = None,
    max_in_flight: int = 0,
) -> None:
    """Send chunks (paced at wall-clock speed with realtime), then END."""
    t0 = time.monotonic()
    sent_s = 0.0
    next_finalize = finalize_every
    for chunk in chunks:
        if realtime:
            delay = t0 + sent_s - time.monotonic()
            # While waiting for audio, a keep-alive stops the server from expiring us.
            while keepalive_every and delay > keepalive_every:
                time.sleep(keepalive_every)
                session.keepalive()
                delay = t0 + sent_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elif max_in_flight:
            while session.pending >= max_in_flight:
                time.sleep(0.001)
        session.send(chunk, sample_rate=None if session.started else sample_rate)
        sent_s += len(chunk) / sample_rate
        if next_finalize is not None and sent_s >= next_finalize:
            session.finalize()
            next_finalize += finalize_every or 0.0  # both set, or neither
    session.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transcribe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "audio", help="audio file (anything libsndfile reads) or - for raw 16-bit PCM on stdin"
    )
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    p.add_argument("--ssl", action="store_true", help="TLS to the gRPC endpoint")
    p.add_argument("--root-cert", type=Path, help="CA certificate (PEM) for --ssl")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="pace chunks at wall-clock speed, like a live microphone",
    )
    p.add_argument(
        "--chunk-ms",
        type=float,
        default=None,
        help=f"audio per request (default: {LIVE_CHUNK_MS} ms with --realtime or stdin, "
        "else the model's chunk)",
    )
    p.add_argument(
        "--rate",
        type=int,
        default=16000,
        help="sample rate of raw PCM on stdin (files carry their own)",
    )
    p.add_argument("--channels", type=int, default=1, help="channels of raw PCM on stdin")
    p.add_argument("--json", action="store_true", help="print raw result messages (JSONL)")
    p.add_argument("--no-interims", action="store_true", help="print finals only")
    p.add_argument(
        "--finalize-every",
        type=float,
        default=None,
        metavar="S",
        help="send a Finalize every S seconds of audio",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=None,
        metavar="S",
        help="with --realtime or stdin: send keep-alives when no audio for S s",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="per-stream decoder/endpoint option (repeatable), e.g. "
        "--option rule2_min_trailing_silence=0.8 --option decoding=beam",
    )
    p.add_argument(
        "--hotwords",
        default=None,
        help="comma-separated words to boost, each optionally word:boost",
    )
    p.add_argument(
        "--two-pass",
        action="store_true",
        help=f"finals re-decoded by Whisper (model {TWO_PASS_MODEL}); interims stay streaming CTC",
    )
    p.add_argument(
        "--whisper-interims",
        action="store_true",
        help="two-pass, and interims re-decoded by Whisper too (stream option "
        "interims=whisper): words two re-decodes agree on are shown stable, "
        "the tail in [brackets]",
    )
    return p


def parse_options(pairs: list[str], hotwords: str | None) -> dict[str, str]:
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"transcribe: --option needs KEY=VALUE, got {pair!r}")
        opts[key.strip()] = value.strip()
    if hotwords:
        opts["hotwords"] = hotwords
    try:
        protocol.check_stream_options(opts)
    except ValueError as exc:
        raise SystemExit(f"transcribe: --option {exc}") from None
    return opts


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    display = Display(sys.stdout, a.json, show_interims=not a.no_interims)
    root = a.root_cert.read_bytes() if a.root_cert else None
    try:
        with AsrConnection(a.url, ssl=a.ssl, root_certificates=root) as conn:
            contract = conn.contract()
            rate = contract.sample_rate
            live = a.realtime or a.audio == "-"
            chunk_ms = a.chunk_ms or (LIVE_CHUNK_MS if live else None)
            chunk = int(rate * chunk_ms / 1000) if chunk_ms else contract.chunk_samples
            if chunk <= 0:
                raise SystemExit("transcribe: --chunk-ms must be positive")
            if a.audio == "-":
                chunks = pcm_chunks(stdin_binary(), a.rate, rate, chunk, a.channels)
                realtime = False  # stdin arrives at its own pace
            else:
                chunks = chunks_of(load_audio(a.audio, rate), chunk)
                realtime = a.realtime
            options = parse_options(a.option, a.hotwords)
            if a.whisper_interims:
                options.setdefault("interims", "whisper")
            session = conn.open_session(
                options,
                on_message=display,
                model=TWO_PASS_MODEL if a.two_pass or a.whisper_interims else None,
            )
            if realtime:
                display.t0 = time.monotonic()
            stream_chunks(
                session,
                chunks,
                rate,
                realtime=realtime,
                finalize_every=a.finalize_every,
                keepalive_every=a.keepalive,
                max_in_flight=0 if realtime else 8,
            )
            session.wait(timeout=120)
            return 1 if session.errors else 0
    except (AsrError, ValueError, OSError) as exc:
        print(f"transcribe: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
