"""Warned spot interruptions through the real handlers on the strict emulator (scenarios 1, 2, 6):
the standby handoff before the deadline, the handoff at the deadline when the replacement is slow,
and a stop-type interruption."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from scenario_world import ScenarioWorld, assert_invariants, missing_rows

from drill.emulator import LatencyModel
from drill.node import NodeTimings, SimNode

HANDOFF_DEADLINE_S = 85.0  # HANDOFF_DEADLINE_SECONDS as the drill region sets it (the default)
WARNED_BUDGET_S = 60.0  # ARCHITECTURE.md section 7


def _seconds(t0: datetime, moment: datetime | None) -> float:
    assert moment is not None
    return (moment - t0).total_seconds()


def _drain_started(node: SimNode) -> datetime | None:
    return next((r.started for r in node.runs if r.argv[:1] == ("drain",)), None)


def _subjects(world: ScenarioWorld) -> list[str]:
    return [str(m.get("Subject", "")) for m in world.inbox()]


def test_a_warned_interruption_hands_off_to_a_standby_replacement_within_budget_losing_no_row(
    timed_world: ScenarioWorld,
) -> None:
    world = timed_world
    old = world.deploy()
    world.writing = True
    world.run(20)
    t0 = world.clock.now()
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id)
    world.run(5)
    world.writing = False

    drain = _drain_started(old)
    standby = new.first("phase standby")
    assert drain is not None and standby is not None
    # The handoff waited for the standby replacement, not for the deadline.
    assert _seconds(t0, standby) <= _seconds(t0, drain) < HANDOFF_DEADLINE_S
    downtime = world.downtime_since(t0)
    assert downtime is not None and 0 < downtime <= WARNED_BUDGET_S
    # RPO 0: every row acknowledged before the drain began (and after) is in the new database.
    before_drain = [row for row, at in world.committed if at < drain]
    assert len(before_drain) > 20
    assert missing_rows(world, new) == []
    rec = world.recovery()
    assert rec is not None and rec.cause == "spot-interruption" and rec.downtime_seconds is not None
    subjects = " | ".join(_subjects(world)).lower()
    assert "interruption" in subjects and "recovered" in subjects
    assert world.instance(old.instance_id)["State"]["Name"] in ("shutting-down", "terminated")
    assert_invariants(world)


def test_a_slow_replacement_still_gets_the_volume_at_the_deadline_and_finishes_booting_after_it(
    make_world: Callable[..., ScenarioWorld],
) -> None:
    # k3s takes a minute longer than usual: standby would come well after the 85 s deadline.
    world = make_world(latency=LatencyModel.default(), timings=NodeTimings(cluster_ready=80))
    old = world.deploy()
    world.writing = True
    world.run(10)
    t0 = world.clock.now()
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id)
    world.writing = False

    drain = _drain_started(old)
    standby = new.first("phase standby")
    assert drain is not None and standby is not None
    assert HANDOFF_DEADLINE_S <= _seconds(t0, drain) < HANDOFF_DEADLINE_S + 5
    # The replacement reached standby only after the handoff had started...
    assert _seconds(t0, standby) > _seconds(t0, drain)
    # ...and the old node had released the volume before the two-minute action.
    detached = old.first(f"detached {world.region.volume_id}")
    assert detached is not None and _seconds(t0, detached) < 120
    downtime = world.downtime_since(t0)
    assert downtime is not None and downtime <= WARNED_BUDGET_S
    assert missing_rows(world, new) == []
    assert_invariants(world)


def test_a_stop_type_warning_hands_off_like_a_termination_and_leaves_no_stopped_node(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    world.emu.interrupt(old.instance_id, action="stop")
    new = world.recover(not_on=old.instance_id)
    # Past the two-minute action time: the old node was terminated, not left stopped with a claim.
    world.run(150)
    assert world.instance(old.instance_id)["State"]["Name"] == "terminated"
    warnings = [r for r in world.results("interruption") if r.get("instance_id") == old.instance_id]
    assert warnings and warnings[0]["outcome"] == "reconciled"
    rec = world.recovery()
    assert rec is not None and rec.cause == "spot-interruption" and not rec.open
    assert world.serving_node() is new
    assert_invariants(world)


def test_a_stop_type_interruption_the_controller_missed_heals_from_the_stopped_node(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    # The controller hears nothing (events lost, schedule paused) until the node is stopped.
    world.hold_events = True
    world.schedule = False
    world.emu.interrupt(old.instance_id, action="stop")
    world.run_until_state(old.instance_id, "stopped")
    world.hold_events = False
    world.schedule = True
    new = world.recover(not_on=old.instance_id)
    rec = world.recovery()
    # The node agent's own IMDS watch may have tagged the warning on its instance (first writer
    # wins); without that tag the stopped node reads as a spot reclaim. Both heal the same way.
    tagged = "spotforge:interruption" in world.tags(old.instance_id)
    assert rec is not None and rec.cause == ("spot-interruption" if tagged else "spot-reclaim")
    # The stopped node let go of the volume by a plain detach, then was terminated.
    detaches = [c for c in world.calls if c.operation == "DetachVolume"]
    assert detaches and all(not c.params.get("Force") for c in detaches)
    assert world.instance(old.instance_id)["State"]["Name"] in ("shutting-down", "terminated")
    assert world.serving_node() is new
    assert_invariants(world)


def test_a_replacement_warned_during_the_handoff_is_replaced_before_it_gets_the_volume(
    make_world: Callable[..., ScenarioWorld],
) -> None:
    # Launches take a few seconds and boots 20 s, so the replacement is warned while still booting.
    world = make_world(
        latency=LatencyModel.instant().replace(run_to_running=5.0),
        timings=NodeTimings.instant().replace(cluster_ready=20.0),
    )
    old = world.deploy()
    world.emu.interrupt(old.instance_id)
    assert world.run(60, until=lambda: len(world.fleet.nodes) == 2), world.explain()
    doomed = next(n for n in world.fleet.nodes.values() if n is not old)
    world.emu.interrupt(doomed.instance_id)
    new = world.recover(not_on=old.instance_id)
    assert new is not doomed and new is not old
    # The warned replacement never held the volume, and was let go.
    assert doomed.first(f"attached {world.region.volume_id}") is None
    assert world.state(doomed.instance_id) in ("shutting-down", "terminated")
    rec = world.recovery()
    assert rec is not None and rec.old_instance_id == old.instance_id and rec.attempt == 2
    assert_invariants(world)
