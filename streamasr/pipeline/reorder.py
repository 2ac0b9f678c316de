"""Requests of many streams, handed on in each stream's own order.

Each request carries its index in its stream (``seq``); inside the ensemble a later one
can overtake an earlier one by an acoustic-model batch.  :class:`Reorderer` parks a
request that comes early until the ones before it have come, bounded in count and in
bytes (per stream and for all streams), and fails a stream whose missing request does
not come within a timeout: every later request of it gets an error instead of an
"OK, empty" answer until its TTL.

A stream's :class:`Lane` (where it stands in its order) lives in the step's per-stream
state, so it goes when the step's stream store sweeps the stream; what it parked still
counts here until its gap expires or a request comes with a new lane for its id.  Not thread-safe: the step
calls it under its stream store's lock.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterator, Protocol, TypeVar

from streamasr.core.state import StreamError

log = logging.getLogger("streamasr.reorder")

MB = 1 << 20


class Parcel(Protocol):
    """What a reorderer parks: anything that says what it costs to hold."""

    @property
    def nbytes(self) -> int: ...


P = TypeVar("P", bound=Parcel)


@dataclass
class Lane(Generic[P]):
    """One stream's place in its order."""

    next_seq: int = 0  # the request it takes next
    parked: dict[int, P] = field(default_factory=dict)  # requests that came early, by seq
    parked_bytes: int = 0  # size of `parked`
    gap_since: float | None = None  # when `parked` began waiting
    failed: str | None = None  # why this stream cannot go on
    last_seq: int | None = None  # its END request, once that has come

    @property
    def ended(self) -> bool:
        """Its END request has been handed on: nothing comes after it."""
        return self.last_seq is not None and self.next_seq > self.last_seq


class Reorderer(Generic[P]):
    """The parked requests of all streams, their limits and their gap deadlines.

    ``where`` names the step in the errors a client reads ("never reached the decoder").
    """

    def __init__(
        self,
        timeout_s: float,
        max_parked: int,
        max_parked_bytes_per_stream: int,
        max_parked_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        where: str = "the decoder",
    ):
        self.timeout_s = timeout_s
        self.max_parked = max_parked
        self.max_parked_bytes_per_stream = max_parked_bytes_per_stream
        self.max_parked_bytes = max_parked_bytes
        self.clock = clock
        self.where = where
        self.parked_bytes = 0  # all streams' parked requests
        # streams waiting for a missing request, oldest gap first
        self._gaps: "OrderedDict[Hashable, Lane[P]]" = OrderedDict()

    def in_order(
        self, stream: Hashable, lane: Lane[P], seq: int, item: P, last: bool = False
    ) -> Iterator[P]:
        """The requests that request ``seq`` makes ready, in order: none while an earlier
        one is missing (it is parked), else itself and the parked ones that follow it.

        The lane moves past a request when the caller asks for the next one (or the
        iteration ends): a request whose handling raises is not passed, so the stream
        waits for it and fails after the timeout, as for a lost request.  Raises
        StreamError for a duplicate, or when parking would pass a limit (the stream then
        fails: its parked requests are dropped).

        ``last``: this is the stream's END request; once it is handed on, whatever was
        parked past it is dropped.  A new ``lane`` for a stream lets go of what the
        stream's old lane parked (the stream was swept by its TTL, or a new START
        replaced it)."""
        stale = self._gaps.get(stream)
        if stale is not None and stale is not lane:  # swept by the TTL or replaced by a START
            self.drop(stream, stale)
        if seq < lane.next_seq or seq in lane.parked:
            raise StreamError(f"internal: request {seq} of stream {stream} arrived twice")
        if last:
            lane.last_seq = seq
        if seq > lane.next_seq:
            self._park(stream, lane, seq, item)
            return iter(())
        return self._release(stream, lane, item)

    def _release(self, stream: Hashable, lane: Lane[P], item: P) -> Iterator[P]:
        yield item
        lane.next_seq += 1
        while lane.next_seq in lane.parked and not lane.ended:
            parked = lane.parked.pop(lane.next_seq)
            lane.parked_bytes -= parked.nbytes
            self.parked_bytes -= parked.nbytes
            yield parked
            lane.next_seq += 1
        if lane.ended:
            if lane.parked:  # only a caller that numbers requests wrongly sends these
                log.warning(
                    "stream %s: %d request(s) after its END dropped", stream, len(lane.parked)
                )
            self.drop(stream, lane)
            return
        if lane.gap_since is None:
            return
        if lane.parked:  # still waiting for another request: that gap starts now
            lane.gap_since = self.clock()
            self._gaps.move_to_end(stream)
        else:
            lane.gap_since = None
            del self._gaps[stream]

    def _park(self, stream: Hashable, lane: Lane[P], seq: int, item: P) -> None:
        size = item.nbytes
        why = None
        if len(lane.parked) >= self.max_parked:
            why = (
                f"{len(lane.parked)} requests already parked waiting for request "
                f"{lane.next_seq} (limit {self.max_parked})"
            )
        elif lane.parked_bytes + size > self.max_parked_bytes_per_stream:
            why = (
                f"{lane.parked_bytes / MB:.1f} MB of this stream's requests are already "
                f"parked waiting for request {lane.next_seq} (limit "
                f"{self.max_parked_bytes_per_stream / MB:g} MB per stream)"
            )
        elif self.parked_bytes + size > self.max_parked_bytes:
            why = (
                f"{self.where}'s reorder buffers hold {self.parked_bytes / MB:.1f} MB parked "
                f"by all streams (limit {self.max_parked_bytes / MB:g} MB)"
            )
        if why is not None:
            raise self.fail(
                stream,
                lane,
                f"request {seq} of stream {stream} refused: {why}; the stream is closed",
            )
        lane.parked[seq] = item
        lane.parked_bytes += size
        self.parked_bytes += size
        if lane.gap_since is None:
            lane.gap_since = self.clock()
            self._gaps[stream] = lane

    def drop(self, stream: Hashable, lane: Lane[P]) -> None:
        """Drop a stream's parked requests (and its gap)."""
        self.parked_bytes -= lane.parked_bytes
        lane.parked_bytes = 0
        lane.parked.clear()
        lane.gap_since = None
        if self._gaps.get(stream) is lane:
            del self._gaps[stream]

    def fail(self, stream: Hashable, lane: Lane[P], why: str) -> StreamError:
        """The stream cannot go on (a request of it is lost): every later request of it,
        END included, gets ``why`` instead of an empty answer."""
        self.drop(stream, lane)
        lane.failed = why
        # ``why`` may quote the client's options (a hotword): the client gets it, not the log
        log.warning("stream %s failed (request %d)", stream, lane.next_seq)
        return StreamError(why)

    def expire(self) -> int:
        """Fail the streams whose missing request is older than the timeout (and free
        what they parked); how many failed."""
        now, n = self.clock(), 0
        while self._gaps:
            stream, lane = next(iter(self._gaps.items()))
            assert lane.gap_since is not None  # a lane is in _gaps while it waits
            if now - lane.gap_since <= self.timeout_s:
                break
            self.fail(
                stream,
                lane,
                (
                    f"request {lane.next_seq} of stream {stream} never reached {self.where} "
                    f"within {self.timeout_s:g} s (lost in flight, e.g. its gRPC "
                    f"stream was cancelled); the {len(lane.parked)} request(s) after it "
                    "were dropped: end this stream and start a new one"
                ),
            )
            n += 1
        return n
