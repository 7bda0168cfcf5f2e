"""Fixtures: a strict emulator with the drill's region and a fleet of simulated nodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from drill_world import START, NodeWorld, make_fleet

from drill.emulator import Emulator, LatencyModel, VirtualClock
from drill.region import build_region


@pytest.fixture
def world(tmp_path: Path) -> Iterator[NodeWorld]:
    with Emulator(region="us-east-1", clock=VirtualClock(START), latency=LatencyModel.default()) as emu:
        region = build_region(emu)
        fleet = make_fleet(emu, region, tmp_path)
        try:
            yield NodeWorld(emu, region, fleet, emu.session.client("ec2"), emu.session.client("ssm"))
        finally:
            fleet.close()
