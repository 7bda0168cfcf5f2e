"""Virtual clock: time moves only when someone sleeps or advances it, and every callback that falls
due on the way runs in time order, so a two-minute spot warning costs no wall time in a test."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(order=True)
class _Scheduled:
    due: datetime
    seq: int
    callback: Callable[[], None] = field(compare=False)
    label: str = field(compare=False, default="")
    cancelled: bool = field(compare=False, default=False)


class ScheduledCall:
    """Handle for a scheduled callback; `cancel()` keeps it from running."""

    def __init__(self, entry: _Scheduled) -> None:
        self._entry = entry

    @property
    def due(self) -> datetime:
        return self._entry.due

    @property
    def label(self) -> str:
        return self._entry.label

    def cancel(self) -> None:
        self._entry.cancelled = True


class VirtualClock:
    """Implements the clock protocol the controller expects: `now()` (tz-aware UTC) and `sleep()`.

    Callbacks scheduled for the same instant run in the order they were scheduled; a callback may
    schedule further callbacks, including ones due at once, and they run in the same advance.
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
        if start.tzinfo is None:
            raise ValueError("VirtualClock needs a tz-aware start time")
        self._now = start.astimezone(UTC)
        self._heap: list[_Scheduled] = []
        self._seq = itertools.count()
        # RLock: a callback that runs inside advance_to may itself schedule or read the time.
        self._lock = threading.RLock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("cannot sleep a negative time")
        with self._lock:
            target = self._now + timedelta(seconds=seconds)
        self.advance_to(target)

    def advance_to(self, when: datetime) -> None:
        """Run every callback due up to `when`, in time order, then stand at `when`.
        Moving backwards is refused: transitions already applied cannot be undone."""
        if when.tzinfo is None:
            raise ValueError("advance_to needs a tz-aware time")
        with self._lock:
            if when < self._now:
                raise ValueError(f"clock cannot go back from {self._now} to {when}")
            while self._heap and self._heap[0].due <= when:
                entry = heapq.heappop(self._heap)
                if entry.cancelled:
                    continue
                self._now = max(self._now, entry.due)
                entry.callback()
            self._now = when

    def run_due(self) -> None:
        """Run callbacks due at the current instant (zero-latency transitions)."""
        self.advance_to(self.now())

    def call_at(self, when: datetime, callback: Callable[[], None], label: str = "") -> ScheduledCall:
        with self._lock:
            entry = _Scheduled(max(when, self._now), next(self._seq), callback, label)
            heapq.heappush(self._heap, entry)
            return ScheduledCall(entry)

    def call_later(self, delay: float, callback: Callable[[], None], label: str = "") -> ScheduledCall:
        if delay < 0:
            raise ValueError("delay must not be negative")
        with self._lock:
            return self.call_at(self._now + timedelta(seconds=delay), callback, label)

    def pending(self) -> list[tuple[datetime, str]]:
        """Scheduled (due, label) pairs still to run, earliest first; for debugging tests."""
        with self._lock:
            return [(e.due, e.label) for e in sorted(self._heap) if not e.cancelled]
