"""The decoder step applies a stream's requests in order, whatever order Triton's
ensemble delivers them in (no server needed)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamasr.state import StreamError
from streamasr.tiny_model import tiny_contract
from streamasr.triton_models.common import StepInfo
from streamasr.triton_models.ctc_decoder import DecoderDefaults, DecoderRequest, DecoderStep

C = tiny_contract()
V = len(C.vocabulary)


def one_hot(tokens: str) -> np.ndarray:
    """[1, T, V] log-probs spelling `tokens` ('_' = blank), one window."""
    lp = np.full((1, len(tokens), V), -20.0, np.float32)
    for t, ch in enumerate(tokens):
        lp[0, t, C.blank_id if ch == "_" else C.vocabulary.index(ch)] = 0.0
    return lp


def requests(stream: int, pieces: list[str]) -> list[DecoderRequest]:
    out = []
    for i, p in enumerate(pieces):
        info = StepInfo(stream=stream, seq=i, start=i == 0, end=i == len(pieces) - 1,
                        windows=1, valid_outputs=[len(p)])
        out.append(DecoderRequest(one_hot(p), info))
    return out


def transcript(msgs) -> str:
    return " ".join(m["channel"]["alternatives"][0]["transcript"] for m in msgs
                    if m.get("type") == "Results" and m["is_final"])


PIECES = ["_h_e_l", "_l_o__", "_ _w_o", "_r_l_d", "______"]


def run(order) -> str:
    step = DecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    reqs = requests(7, PIECES)
    msgs = []
    for i in order:
        msgs += step.process(reqs[i])
    assert len(step.store) == 0, "a closed stream must leave no state"
    return transcript(msgs)


def test_in_order_gives_the_text():
    assert run(range(len(PIECES))) == "hello world"


@pytest.mark.parametrize("order", [(1, 0, 2, 3, 4), (0, 1, 2, 4, 3), (4, 3, 2, 1, 0),
                                   (2, 0, 4, 1, 3)])
def test_any_arrival_order_gives_the_same_text(order):
    assert run(order) == "hello world"


def test_all_permutations_of_a_short_stream():
    for order in itertools.permutations(range(4)):
        step = DecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
        msgs = []
        for i in order:
            msgs += step.process(requests(3, ["_a_", "_b_", "_ _", "_c_"])[i])
        assert transcript(msgs) == "ab c"


def test_a_duplicate_request_is_an_error():
    step = DecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    reqs = requests(1, PIECES)
    step.process(reqs[0])
    step.process(reqs[1])
    with pytest.raises(StreamError, match="twice"):
        step.process(reqs[1])


def test_server_only_options_are_refused_per_stream():
    step = DecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    req = requests(1, PIECES)[0]
    req.info.options = {"lm_path": "/etc/passwd"}
    with pytest.raises(ValueError, match="config.pbtxt"):
        step.process(req)
