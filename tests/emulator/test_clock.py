from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from drill.emulator import VirtualClock

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


def test_callbacks_run_in_time_order_whatever_order_they_were_scheduled() -> None:
    clock = VirtualClock(T0)
    seen: list[tuple[str, datetime]] = []
    for name, delay in (("c", 30), ("a", 10), ("b", 20)):
        clock.call_later(delay, lambda n=name: seen.append((n, clock.now())))
    clock.sleep(60)
    assert seen == [
        ("a", T0 + timedelta(seconds=10)),
        ("b", T0 + timedelta(seconds=20)),
        ("c", T0 + timedelta(seconds=30)),
    ]
    assert clock.now() == T0 + timedelta(seconds=60)


def test_callbacks_due_at_the_same_instant_run_in_scheduling_order() -> None:
    clock = VirtualClock(T0)
    seen: list[int] = []
    for i in range(5):
        clock.call_later(5, lambda i=i: seen.append(i))
    clock.sleep(5)
    assert seen == [0, 1, 2, 3, 4]


def test_a_callback_may_schedule_another_that_runs_in_the_same_advance() -> None:
    clock = VirtualClock(T0)
    seen: list[datetime] = []
    clock.call_later(1, lambda: clock.call_later(2, lambda: seen.append(clock.now())))
    clock.sleep(10)
    assert seen == [T0 + timedelta(seconds=3)]


def test_callbacks_not_yet_due_stay_pending_and_cancelled_ones_never_run() -> None:
    clock = VirtualClock(T0)
    seen: list[str] = []
    handle = clock.call_later(5, lambda: seen.append("cancelled"))
    clock.call_later(50, lambda: seen.append("later"), label="later")
    handle.cancel()
    clock.sleep(10)
    assert seen == []
    assert clock.pending() == [(T0 + timedelta(seconds=50), "later")]


def test_sleep_takes_no_wall_time() -> None:
    clock = VirtualClock(T0)
    started = time.monotonic()
    clock.sleep(24 * 3600)
    assert time.monotonic() - started < 0.5
    assert clock.now() == T0 + timedelta(days=1)


def test_the_clock_refuses_to_go_back_or_to_use_naive_times() -> None:
    clock = VirtualClock(T0)
    with pytest.raises(ValueError):
        clock.advance_to(T0 - timedelta(seconds=1))
    with pytest.raises(ValueError):
        clock.advance_to(datetime(2026, 11, 20, 9, 0))
    with pytest.raises(ValueError):
        VirtualClock(datetime(2026, 11, 20, 8, 0))
    with pytest.raises(ValueError):
        clock.sleep(-1)
