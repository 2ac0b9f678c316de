"""The README's `transcribe` examples run against a real server (tests/unit/test_docs.py
checks the rest of the docs without one)."""

from __future__ import annotations

import shlex
import subprocess
import sys

from ..helpers import ROOT
from ..unit.test_docs import FENCE, README


def test_the_readme_transcribe_examples_run(server):
    """The README's file examples against the suite's server, as written except for the
    address (the fixture's) and --realtime (wall-clock pacing of 30 s of audio)."""
    lines = [
        line.split("#")[0].strip()
        for block in FENCE.findall(README.read_text())
        for line in block.splitlines()
        if line.startswith(".venv/bin/transcribe assets/")
    ]
    assert len(lines) >= 2, "the README lost its transcribe examples"
    for line in lines:
        args = [a for a in shlex.split(line)[1:] if a != "--realtime"]
        r = subprocess.run(
            [sys.executable, "-m", "streamasr_client.transcribe", *args, "--no-interims"]
            + ["--url", server.grpc_url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, (line, r.stderr[-2000:])
        assert len(r.stdout.split()) >= 10, (line, r.stdout)
