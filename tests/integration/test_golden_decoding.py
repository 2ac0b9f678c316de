"""Golden decoding: the served decoder step, fed a log-prob matrix written out by hand,
answers the transcript and word times worked out by hand below.  No server code computes
the expectation (every other end-to-end test compares against an in-process decode)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

# The served acoustic model's vocabulary and output frame (checked against the contract
# the server announces, so a new model fails here loudly instead of decoding nonsense).
VOCABULARY = ("<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'")
FRAME_S = 0.02
PEAK = 0.9  # posterior of each frame's path token; the rest share 0.1

#       frame: 0         1         2
#              01234567890123456789012
PATH = "__hh_ii__ _tthhee_rre__"
# "hi":    h first at frame 2, i last at frame 6     -> 0.04 s .. 0.14 s (end = frame 7)
# "there": t first at frame 11, e last at frame 20   -> 0.22 s .. 0.42 s (end = frame 21)
# The final spans the whole matrix: 23 frames = 0.46 s.
EXPECTED_WORDS = [("hi", 0.04, 0.14), ("there", 0.22, 0.42)]


def matrix(path: str) -> np.ndarray:
    rest = (1.0 - PEAK) / (len(VOCABULARY) - 1)
    lp = np.full((1, len(path), len(VOCABULARY)), np.log(rest), np.float32)
    for t, ch in enumerate(path):
        lp[0, t, 0 if ch == "_" else VOCABULARY.index(ch)] = np.log(PEAK)
    return lp


def test_the_served_decoder_answers_the_hand_worked_transcript(server, conn):
    served = conn.contract()
    assert (served.vocabulary, served.blank_id, served.output_frame_seconds) == (
        VOCABULARY,
        0,
        FRAME_S,
    )
    lp = matrix(PATH)
    # STEP_INFO as the feature step writes it: one window, every frame real, START and
    # END in one request; greedy decoding, so no LM or beam can move a word.
    step_info = {
        "stream": 987_654_321,
        "seq": 0,
        "start": True,
        "end": True,
        "windows": 1,
        "valid_outputs": [len(PATH)],
        "finalize": False,
        "keepalive": False,
        "options": {"decoding": "greedy"},
    }
    x = grpcclient.InferInput("LOG_PROBS", list(lp.shape), "FP32")
    x.set_data_from_numpy(lp)
    info = grpcclient.InferInput("STEP_INFO", [1], "BYTES")
    info.set_data_from_numpy(np.array([json.dumps(step_info).encode()], dtype=object))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        out = client.infer(
            "ctc_decoder", [x, info], outputs=[grpcclient.InferRequestedOutput("RESULTS")]
        )
    messages = [json.loads(m) for m in out.as_numpy("RESULTS")]
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    assert len(finals) == 1, messages
    (final,) = finals
    alt = final["channel"]["alternatives"][0]
    assert alt["transcript"] == "hi there"
    assert [(w["word"], w["start"], w["end"]) for w in alt["words"]] == [
        (w, pytest.approx(s), pytest.approx(e)) for w, s, e in EXPECTED_WORDS
    ]
    assert final["start"] == 0.0
    assert final["duration"] == pytest.approx(len(PATH) * FRAME_S)
    assert alt["confidence"] == pytest.approx(PEAK, abs=1e-3)
