"""Per-stream state with a TTL sweep.

Triton frees a sequence slot after ``max_sequence_idle_microseconds`` without telling the
model, so state freed only on END leaks for every abandoned stream.  ``StreamStore``
sweeps entries idle longer than its TTL on every call that touches it (amortised O(1):
entries are kept in last-use order), and ``Sweeper`` sweeps on a timer so that an idle
server also lets go.  All methods are thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


#: Ids of swept or closed streams remembered at most (each for 10 TTLs) so that their
#: late requests are told what happened instead of "unknown stream".
MEMORY_MAX = 100_000


class StreamError(Exception):
    """A request that cannot be served for this stream; the message is for the client."""


class StreamStore(Generic[T]):
    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_streams: int | None = None,
    ):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_streams = max_streams
        self._items: "OrderedDict[Hashable, tuple[float, T]]" = OrderedDict()
        self.reclaimed = 0  # streams swept after going idle (never saw END)
        self.expired: "OrderedDict[Hashable, float]" = OrderedDict()  # recently swept ids
        # streams the server closed (close()): id -> (when, why), so later requests say why
        self.closed: "OrderedDict[Hashable, tuple[float, str]]" = OrderedDict()
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._items))

    def values(self) -> list[T]:
        """The live streams' states, without refreshing them (a look, not a use)."""
        with self.lock:
            return [value for _, value in self._items.values()]

    def sweep(self) -> list[tuple[Hashable, T]]:
        """Drop and return entries idle for longer than the TTL."""
        with self.lock:
            return self._sweep()

    def _sweep(self) -> list[tuple[Hashable, T]]:
        now = self.clock()
        gone = []
        while self._items:
            key, (last, value) = next(iter(self._items.items()))
            if now - last <= self.ttl_s:
                break
            del self._items[key]
            gone.append((key, value))
            self.expired[key] = now
        self.reclaimed += len(gone)
        # Remember expired ids for a while so their next request can say "expired".
        while self.expired and now - next(iter(self.expired.values())) > 10 * self.ttl_s:
            self.expired.popitem(last=False)
        while len(self.expired) > MEMORY_MAX:
            self.expired.popitem(last=False)
        while self.closed and (
            len(self.closed) > MEMORY_MAX
            or now - next(iter(self.closed.values()))[0] > 10 * self.ttl_s
        ):
            self.closed.popitem(last=False)
        return gone

    def create(self, key: Hashable, value: T) -> T:
        """Start a stream; a live stream with the same id is replaced (a new START)."""
        with self.lock:
            return self._create(key, value)

    def _create(self, key: Hashable, value: T) -> T:
        self._sweep()
        if (
            key not in self._items
            and self.max_streams is not None
            and len(self._items) >= self.max_streams
        ):
            raise StreamError(f"too many open streams (limit {self.max_streams})")
        self._items.pop(key, None)
        self.expired.pop(key, None)
        self.closed.pop(key, None)
        self._items[key] = (self.clock(), value)
        return value

    def get(self, key: Hashable) -> T:
        """The live state of a stream, refreshed; a clear error when there is none."""
        with self.lock:
            return self._get(key)

    def _get(self, key: Hashable) -> T:
        self._sweep()
        try:
            _, value = self._items.pop(key)
        except KeyError:
            if key in self.closed:
                raise StreamError(self.closed[key][1]) from None
            if key in self.expired:
                raise StreamError(
                    f"stream {key} expired: idle longer than {self.ttl_s:g} s; "
                    "start a new stream with the START flag"
                ) from None
            raise StreamError(
                f"unknown stream {key}: the first request of a stream must carry the START flag"
            ) from None
        self._items[key] = (self.clock(), value)
        return value

    def close(self, key: Hashable, why: str) -> T | None:
        """End a stream on the server's side: its state goes now, and its later requests
        (until a new START) are refused with ``why``."""
        with self.lock:
            item = self._items.pop(key, None)
            self.closed.pop(key, None)
            self.closed[key] = (self.clock(), why)
        return None if item is None else item[1]

    def pop(self, key: Hashable) -> T | None:
        with self.lock:
            item = self._items.pop(key, None)
        return None if item is None else item[1]


class Sweeper:
    """Sweeps stores every ``interval_s`` on a daemon thread until stopped."""

    def __init__(
        self,
        stores: list[StreamStore],
        interval_s: float,
        on_sweep: Callable[[int], None] | None = None,
    ):
        self.stores = stores
        self.interval_s = interval_s
        self.on_sweep = on_sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamasr-sweeper", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for store in self.stores:
                gone = store.sweep()
                if self.on_sweep:
                    self.on_sweep(len(gone))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
