"""Scenario 3: a node lost without warning heals within the unwarned budget, and the volume (which
outlives the instance) keeps every committed row."""

from __future__ import annotations

from scenario_world import ScenarioWorld, assert_invariants, missing_rows

UNWARNED_BUDGET_S = 180.0  # ARCHITECTURE.md section 7


def test_an_unwarned_termination_is_replaced_within_the_unwarned_budget(timed_world: ScenarioWorld) -> None:
    world = timed_world
    old = world.deploy()
    world.writing = True
    world.run(10)
    world.writing = False
    t0 = world.clock.now()
    world.emu.lose(old.instance_id)
    new = world.recover(not_on=old.instance_id)

    downtime = world.downtime_since(t0)
    assert downtime is not None and 0 < downtime <= UNWARNED_BUDGET_S
    rec = world.recovery()
    assert rec is not None and rec.cause == "spot-reclaim" and rec.old_instance_id == old.instance_id
    # No drain on a dead node; the volume moved only after the old instance had released it.
    assert not any(r.argv[:1] == ("drain",) for r in old.runs)
    detached = old.first(f"detached {world.region.volume_id}")
    attached = new.first(f"attached {world.region.volume_id}")
    assert detached is not None and attached is not None and detached <= attached
    assert all(not c.params.get("Force") for c in world.calls if c.operation == "DetachVolume")
    # The volume survived the instance: the rows committed before the loss are all there.
    assert world.committed and missing_rows(world, new) == []
    subjects = " | ".join(str(m.get("Subject", "")) for m in world.inbox()).lower()
    assert "recovered" in subjects
    assert_invariants(world)
