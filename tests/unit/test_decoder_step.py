"""The decoder step applies a stream's requests in order, whatever order Triton's
ensemble delivers them in (no server needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamasr.core.state import StreamError
from streamasr.pipeline.ctc_decoder import CtcDecoderStep, DecoderDefaults, DecoderRequest
from streamasr.pipeline.step_info import StepInfo
from streamasr.tools.tiny_model import tiny_contract

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
        info = StepInfo(
            stream=stream,
            seq=i,
            start=i == 0,
            end=i == len(pieces) - 1,
            windows=1,
            valid_outputs=[len(p)],
        )
        out.append(DecoderRequest(one_hot(p), info))
    return out


def transcript(msgs) -> str:
    return " ".join(
        m["channel"]["alternatives"][0]["transcript"]
        for m in msgs
        if m.get("type") == "Results" and m["is_final"]
    )


PIECES = ["_h_e_l", "_l_o__", "_ _w_o", "_r_l_d", "______"]


def run(order) -> str:
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    reqs = requests(7, PIECES)
    msgs = []
    for i in order:
        msgs += step.process(reqs[i])
    assert len(step.store) == 0, "a closed stream must leave no state"
    return transcript(msgs)


def test_in_order_gives_the_text():
    assert run(range(len(PIECES))) == "hello world"


@pytest.mark.parametrize(
    "order", [(1, 0, 2, 3, 4), (0, 1, 2, 4, 3), (4, 3, 2, 1, 0), (2, 0, 4, 1, 3)]
)
def test_any_arrival_order_gives_the_same_text(order):
    assert run(order) == "hello world"


def test_all_permutations_of_a_short_stream():
    for order in itertools.permutations(range(4)):
        step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
        msgs = []
        for i in order:
            msgs += step.process(requests(3, ["_a_", "_b_", "_ _", "_c_"])[i])
        assert transcript(msgs) == "ab c"


def test_a_duplicate_request_is_an_error():
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    reqs = requests(1, PIECES)
    step.process(reqs[0])
    step.process(reqs[1])
    with pytest.raises(StreamError, match="twice"):
        step.process(reqs[1])


def test_server_only_options_are_refused_per_stream():
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    req = requests(1, PIECES)[0]
    req.info.options = {"lm_path": "/etc/passwd"}
    with pytest.raises(ValueError, match="config.pbtxt"):
        step.process(req)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_request_that_never_comes_fails_its_stream_after_the_reorder_timeout():
    clock = Clock()
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30, reorder_timeout_s=5, clock=clock)
    reqs = requests(9, PIECES)
    step.process(reqs[0])
    assert step.process(reqs[2]) == []  # request 1 is late: 2 waits
    clock.t = 4.0
    assert step.process(reqs[3]) == []  # still within the timeout
    clock.t = 5.5
    with pytest.raises(StreamError, match="request 1 of stream 9 never reached"):
        step.process(reqs[4])  # END: an error, never "OK, empty"
    assert step.parked_bytes == 0 and len(step.store) == 0


def test_the_timer_frees_a_stalled_streams_parked_requests():
    clock = Clock()
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30, reorder_timeout_s=5, clock=clock)
    reqs = requests(9, PIECES)
    step.process(reqs[0])
    step.process(reqs[2])
    assert step.parked_bytes > 0
    clock.t = 6.0
    assert step.expire_gaps() == 1 and step.parked_bytes == 0
    with pytest.raises(StreamError, match="request 1 "):
        step.process(reqs[3])


def test_parking_is_bounded_in_bytes_per_stream_and_in_total():
    size = requests(1, PIECES)[0].log_probs.nbytes
    step = CtcDecoderStep(
        C,
        DecoderDefaults(),
        idle_timeout_s=30,
        max_parked_bytes_per_stream=2 * size,
        max_parked_bytes=3 * size,
    )
    a = requests(1, PIECES)
    step.process(a[0])
    step.process(a[2])
    step.process(a[3])
    with pytest.raises(StreamError, match="per stream"):
        step.process(a[4])
    assert step.parked_bytes == 0  # the failed stream let go of its requests
    b, c = requests(2, PIECES), requests(3, PIECES)
    for r in (b[0], b[2], b[3], c[0], c[2]):
        step.process(r)
    with pytest.raises(StreamError, match="all streams"):
        step.process(c[3])
    step.process(b[1])  # the gap fills: b's parked ones are applied
    assert step.parked_bytes == 0


def test_in_order_streams_are_unaffected_by_the_limits():
    step = CtcDecoderStep(
        C, DecoderDefaults(), idle_timeout_s=30, max_parked_bytes=1, max_parked_bytes_per_stream=1
    )
    msgs = []
    for r in requests(5, PIECES):
        msgs += step.process(r)
    assert transcript(msgs) == "hello world"


def test_a_stream_swept_with_requests_parked_frees_them_and_its_id_can_start_again():
    clock = Clock()
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=2, reorder_timeout_s=5, clock=clock)
    old = requests(4, PIECES)
    step.process(old[0])
    step.process(old[2])  # parked behind request 1
    clock.t = 3.0
    step.store.sweep()  # the TTL goes first
    new = requests(4, PIECES)
    step.process(new[0])  # the id starts again
    step.process(new[2])
    assert step.parked_bytes == new[2].log_probs.nbytes  # the swept stream's bytes freed
    step.process(new[1])
    assert step.parked_bytes == 0


def test_a_request_parked_past_its_streams_end_is_dropped_and_the_stream_closes():
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    reqs = requests(3, ["_a_", "_b_"])
    reqs[0].info.end = True  # a caller that numbers wrongly: request 1 comes after END
    assert step.process(reqs[1]) == []  # parked, waiting for request 0
    assert transcript(step.process(reqs[0])) == "a"  # never applied to a closed decoder
    assert len(step.store) == 0 and step.parked_bytes == 0


def test_a_streams_first_request_without_start_is_refused_clearly():
    step = CtcDecoderStep(C, DecoderDefaults(), idle_timeout_s=30)
    req = requests(6, PIECES)[1]
    req.info.seq = 0  # nothing can overtake a stream's first request
    with pytest.raises(StreamError, match="must carry the START flag"):
        step.process(req)
    assert len(step.store) == 0
    start = requests(6, PIECES)[0]
    start.info.options = {"beam_size": "many"}
    with pytest.raises(ValueError, match="beam_size"):
        step.process(start)  # the START is refused: the stream has no decoder
    with pytest.raises(StreamError, match="no accepted START"):
        step.process(req)
