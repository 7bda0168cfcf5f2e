"""Fixtures for the scenario tests: one fresh emulated world per test (never shared across tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from scenario_world import ScenarioWorld

from drill.emulator import LatencyModel
from drill.node import NodeTimings


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Callable[..., ScenarioWorld]]:
    """Build the test's world with its own latency model, node timings or controller settings."""
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> ScenarioWorld:
            return stack.enter_context(ScenarioWorld(tmp_path / "world", **options))

        yield make


@pytest.fixture
def timed_world(make_world: Callable[..., ScenarioWorld]) -> ScenarioWorld:
    """Documented latencies and node timings: for scenarios that measure downtime."""
    return make_world(latency=LatencyModel.default(), timings=NodeTimings())


@pytest.fixture
def quick_world(make_world: Callable[..., ScenarioWorld]) -> ScenarioWorld:
    """Every transition at the next clock step: for scenarios about logic, not timing."""
    return make_world(latency=LatencyModel.instant(), timings=NodeTimings.instant())
