"""The reorderer on its own: each stream's requests handed on in seq order, parking
bounded in count and bytes, a lost request failing its stream after the timeout
(no server, no decoder)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from streamasr.core.state import StreamError
from streamasr.pipeline.reorder import Lane, Reorderer

SIZE = 10  # bytes each test request costs to park


@dataclass
class Req:
    seq: int
    nbytes: int = SIZE


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def reorderer(clock=None, max_parked=64, per_stream=10 * SIZE, total=100 * SIZE) -> Reorderer:
    return Reorderer(5.0, max_parked, per_stream, total, clock or Clock())


def send(r: Reorderer, lane: Lane, seq: int, stream: int = 1, last: bool = False) -> list[int]:
    return [x.seq for x in r.in_order(stream, lane, seq, Req(seq), last)]


def test_every_arrival_order_comes_out_in_order():
    for order in itertools.permutations(range(4)):
        r, lane = reorderer(), Lane()
        out = [s for seq in order for s in send(r, lane, seq)]
        assert out == [0, 1, 2, 3], order
        assert r.parked_bytes == 0 and lane.gap_since is None


def test_a_duplicate_is_an_error():
    r, lane = reorderer(), Lane()
    send(r, lane, 0)
    send(r, lane, 2)
    for seq in (0, 2):
        with pytest.raises(StreamError, match="arrived twice"):
            send(r, lane, seq)


@pytest.mark.parametrize(
    "limits,match",
    [
        ({"max_parked": 2}, r"limit 2\)"),
        ({"per_stream": 2 * SIZE}, "per stream"),
        ({"total": 2 * SIZE}, "all streams"),
    ],
)
def test_parking_past_a_limit_fails_the_stream_and_frees_what_it_parked(limits, match):
    r, lane = reorderer(**limits), Lane()
    send(r, lane, 0)
    send(r, lane, 2)
    send(r, lane, 3)
    with pytest.raises(StreamError, match=match):
        send(r, lane, 4)
    assert lane.failed and "request 4 of stream 1 refused" in lane.failed
    assert r.parked_bytes == 0 and lane.parked == {}


def test_the_total_limit_counts_every_stream():
    r = reorderer(total=3 * SIZE)
    a, b = Lane(), Lane()
    for lane, stream in ((a, 1), (b, 2)):
        send(r, lane, 0, stream)
        send(r, lane, 2, stream)
    send(r, a, 3, 1)
    with pytest.raises(StreamError, match="the decoder's reorder buffers hold"):
        send(r, b, 3, 2)
    assert a.failed is None and r.parked_bytes == 2 * SIZE  # stream 1 keeps its place
    assert send(r, a, 1, 1) == [1, 2, 3]


def test_a_missing_request_fails_its_stream_after_the_timeout_only():
    clock = Clock()
    r, lane = reorderer(clock), Lane()
    send(r, lane, 0)
    send(r, lane, 2)
    clock.t = 5.0
    assert r.expire() == 0
    clock.t = 5.5
    assert r.expire() == 1
    assert "request 1 of stream 1 never reached the decoder within 5 s" in lane.failed
    assert r.parked_bytes == 0


def test_a_gap_that_is_filled_but_leaves_another_starts_its_clock_again():
    clock = Clock()
    r, lane = reorderer(clock), Lane()
    send(r, lane, 0)
    send(r, lane, 2)
    send(r, lane, 4)
    clock.t = 4.0
    assert send(r, lane, 1) == [1, 2]  # request 3 is now the missing one, since t=4
    clock.t = 8.0
    assert r.expire() == 0
    clock.t = 9.5
    assert r.expire() == 1 and "request 3 " in lane.failed


def test_a_request_whose_handling_raises_is_not_passed():
    r, lane = reorderer(), Lane()
    send(r, lane, 0)
    send(r, lane, 2)
    with pytest.raises(RuntimeError):
        for _ in r.in_order(1, lane, 1, Req(1)):
            raise RuntimeError("the step refused it")
    assert lane.next_seq == 1  # the stream still waits for request 1


def test_a_new_lane_for_a_stream_lets_go_of_the_old_ones_requests():
    r, old = reorderer(), Lane()
    send(r, old, 0)
    send(r, old, 2)
    assert r.parked_bytes == SIZE
    new = Lane()  # the stream was swept by its TTL, or a START replaced it
    assert send(r, new, 0) == [0]
    assert r.parked_bytes == 0 and old.parked == {}


def test_what_is_parked_past_the_end_is_dropped_when_the_end_is_handed_on():
    r, lane = reorderer(), Lane()
    send(r, lane, 0)
    send(r, lane, 3)  # a caller that numbers wrongly: 3 comes after END (2)
    send(r, lane, 2, last=True)
    assert not lane.ended
    assert send(r, lane, 1) == [1, 2]
    assert lane.ended and r.parked_bytes == 0 and lane.gap_since is None
