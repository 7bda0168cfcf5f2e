"""Scenario 8: spot capacity shortages during a warned interruption. The next instance type, then
the on-demand template, and without on-demand a patient retry that tells the user and launches as
soon as capacity returns."""

from __future__ import annotations

from collections.abc import Callable

from scenario_world import ScenarioWorld, assert_invariants

from drill.emulator import LatencyModel
from drill.node import NodeTimings


def _launches(world: ScenarioWorld) -> list[tuple[str, str]]:
    """(launch template id, instance type) of every RunInstances the controller sent."""
    return [
        (c.params["LaunchTemplate"]["LaunchTemplateId"], c.params["InstanceType"])
        for c in world.calls
        if c.operation == "RunInstances"
    ]


def _happenings(world: ScenarioWorld) -> list[str]:
    return [h for i in world.runner.invocations if i.result for h in i.result.get("happenings", [])]


def test_without_t4g_small_spot_capacity_the_next_type_is_launched_on_spot(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    world.emu.faults.capacity(instance_type="t4g.small", market="spot")
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id)
    instance = world.instance(new.instance_id)
    assert instance["InstanceType"] == "t4g.medium"
    assert world.emu.market_of(new.instance_id) == "spot"
    spot = world.region.spot_template_id
    assert _launches(world)[1:] == [(spot, "t4g.small"), (spot, "t4g.medium")]
    assert world.recovery() is not None and world.recovery().tried == ("spot:t4g.small",)
    assert_invariants(world)


def test_with_all_spot_capacity_gone_the_on_demand_template_is_used(quick_world: ScenarioWorld) -> None:
    world = quick_world
    old = world.deploy()
    world.emu.faults.capacity(market="spot")
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id)
    assert world.emu.market_of(new.instance_id) == "on-demand"
    assert "InstanceLifecycle" not in world.instance(new.instance_id)
    spot, on_demand = world.region.spot_template_id, world.region.on_demand_template_id
    types = ("t4g.small", "t4g.medium", "m6g.medium", "m7g.medium")
    assert _launches(world)[1:] == [*((spot, t) for t in types), (on_demand, "t4g.small")]
    assert_invariants(world)


def test_without_on_demand_fallback_the_controller_retries_tells_the_user_and_launches_when_capacity_returns(
    make_world: Callable[..., ScenarioWorld],
) -> None:
    world = make_world(
        latency=LatencyModel.instant(), timings=NodeTimings.instant(), env={"ON_DEMAND_FALLBACK": "false"}
    )
    old = world.deploy()
    world.inbox()
    shortage = world.emu.faults.capacity(market="spot")
    world.emu.interrupt(old.instance_id)
    # Until the handler that met the shortage has ended and published it: past the spot
    # termination and into the first retry round (CAPACITY_RETRY_SECONDS = 120).
    assert world.run(300, until=lambda: "capacity-unavailable" in _happenings(world)), world.explain()
    spot = world.region.spot_template_id
    launches = _launches(world)[1:]
    assert len(launches) >= 8 and {template for template, _ in launches} == {spot}
    ours = [i for i in world.instances() if world.tags(i).get("spotforge:stack") == world.region.stack]
    assert ours == [old.instance_id]  # nothing launched, nothing on-demand
    rec = world.recovery()
    assert rec is not None and rec.open and rec.attempt >= 2
    subjects = [str(m.get("Subject", "")) for m in world.inbox()]
    assert any("capacity" in s.lower() for s in subjects), subjects
    # Data safe meanwhile: the old node drained at the deadline and never lost the volume by force.
    assert all(not c.params.get("Force") for c in world.calls if c.operation == "DetachVolume")
    assert world.emu.violations == []

    world.emu.faults.restore_capacity(shortage)
    new = world.recover(not_on=old.instance_id)
    assert world.emu.market_of(new.instance_id) == "spot"
    assert_invariants(world)
