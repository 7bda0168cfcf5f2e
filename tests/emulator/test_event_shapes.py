"""The emulator's events and IMDS documents must have exactly the keys of the samples the EC2 User
Guide documents (copied from /work/shared/aws-events into fixtures/)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .conftest import World

FIXTURES = Path(__file__).parent / "fixtures"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _sample(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _keys(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: _keys(v) if isinstance(v, dict) else type(v).__name__ for k, v in doc.items()}


def _by_type(events: list[dict[str, Any]], detail_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["detail-type"] == detail_type]


def test_state_change_events_match_the_documented_sample(world: World) -> None:
    instance = world.launch()
    world.emu.clock.sleep(60)
    event = _by_type(world.emu.drain_events(), "EC2 Instance State-change Notification")[0]
    assert _keys(event) == _keys(_sample("instance-state-change.json"))
    assert "version" not in event
    assert event["resources"] == [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance}"]
    assert ISO_Z.match(event["time"])


def test_interruption_and_rebalance_events_match_the_documented_samples(world: World) -> None:
    instance = world.launch_ready()
    warning = world.emu.interrupt(instance)
    world.emu.clock.sleep(world.emu.latency.event_delivery)
    events = world.emu.drain_events()
    delivered = _by_type(events, "EC2 Spot Instance Interruption Warning")
    rebalance = _by_type(events, "EC2 Instance Rebalance Recommendation")
    assert delivered == [warning]
    assert _keys(warning) == _keys(_sample("spot-interruption-warning.json"))
    assert _keys(rebalance[0]) == _keys(_sample("rebalance-recommendation.json"))
    assert warning["source"] == "aws.ec2" and warning["region"] == "us-east-1"


def test_imds_documents_match_the_documented_samples_and_are_absent_before_a_notice(world: World) -> None:
    instance = world.launch_ready()
    assert world.emu.imds_instance_action(instance) is None
    assert world.emu.imds_rebalance(instance) is None
    world.emu.interrupt(instance)
    action = world.emu.imds_instance_action(instance)
    notice = world.emu.imds_rebalance(instance)
    assert action is not None and notice is not None
    assert _keys(action) == _keys(_sample("imds-spot-instance-action.json"))
    assert _keys(notice) == _keys(_sample("imds-rebalance-recommendation.json"))
    assert ISO_Z.match(action["time"]) and ISO_Z.match(notice["noticeTime"])
