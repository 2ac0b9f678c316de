"""End to end against a REAL tritonserver: the streamed transcript equals a whole-file
decode by the same ONNX model, for any chunking and any interleaving of streams."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from ..helpers import finals_with_words, reference_messages, stream

MODELS = (
    "streaming_asr",
    "feature_extractor",
    "acoustic_model",
    "ctc_decoder",
    "model_contract",
    "offline_asr",
    "streaming_asr_two_pass",
    "final_pass",
)


@pytest.fixture(scope="module")
def reference(contract, onnx_session, demo_audio):
    return reference_messages(contract, onnx_session, demo_audio)


def test_every_model_in_the_repository_is_ready(server):
    index = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}"),
            timeout=10,
        ).read()
    )
    states = {m["name"]: m.get("state") for m in index}
    assert states == {m: "READY" for m in MODELS}


def test_client_reads_the_contract_from_the_server(conn, contract):
    assert conn.contract() == contract


def test_streamed_final_equals_whole_file_decode(conn, contract, demo_audio, reference):
    s = stream(conn, demo_audio, contract.chunk_samples)
    s.wait()
    assert s.errors == []
    assert finals_with_words(reference), "the reference decode produced no final"
    assert finals_with_words(s.messages) == finals_with_words(reference)


def test_offline_model_equals_whole_file_decode(conn, demo_audio, reference):
    msgs = conn.transcribe_file(demo_audio)
    assert finals_with_words(msgs) == finals_with_words(reference)


@pytest.mark.parametrize("chunk_ms", [10, 100, 370, 1000, 2000])
def test_chunk_size_does_not_change_the_transcript(conn, contract, demo_audio, reference, chunk_ms):
    s = stream(conn, demo_audio, contract.sample_rate * chunk_ms // 1000)
    s.wait(timeout=300)
    assert s.errors == []
    assert finals_with_words(s.messages) == finals_with_words(reference)


def test_interleaved_streams_on_one_grpc_stream_get_their_own_transcripts(
    conn, contract, onnx_session, demo_audio
):
    n = 8
    rng = np.random.default_rng(7)
    # Different audio per stream: the recording cut at different places, some reversed
    # in level, so a mix-up between streams shows.
    clips = []
    for i in range(n):
        start = int(rng.integers(0, len(demo_audio) // 2))
        clips.append((demo_audio[start:] * (0.5 + 0.1 * i)).astype(np.float32))
    expected = [finals_with_words(reference_messages(contract, onnx_session, c)) for c in clips]
    sessions = [conn.open_session() for _ in range(n)]
    chunk = contract.chunk_samples
    longest = max(len(c) for c in clips)
    for offset in range(0, longest, chunk):  # round-robin: truly interleaved
        for s, c in zip(sessions, clips):
            if offset < len(c):
                s.send(c[offset : offset + chunk])
    for s in sessions:
        s.close()
    for s, want in zip(sessions, expected):
        s.wait(timeout=300)
        assert s.errors == []
        assert finals_with_words(s.messages) == want
    assert len({tuple(map(str, e)) for e in expected}) > 1, "clips should differ"
