"""Scenarios 9-12: a drain that fails or hangs, the EIP taken by someone else's instance, two
controllers racing for the lease, and Forgejo failing its health check after a recovery."""

from __future__ import annotations

from collections.abc import Callable

from scenario_world import ScenarioWorld, assert_invariants, fail_s3_writes, missing_rows, scheduled_event

from drill.emulator import LatencyModel
from drill.node import NodeTimings, SimNode
from spotforge_controller.observe import read_health


def _no_force_detach_from_a_live_node(world: ScenarioWorld) -> None:
    # Forcing is allowed only once the instance is on its way out (ARCHITECTURE.md section 4).
    forced = [c for c in world.calls if c.operation == "DetachVolume" and c.params.get("Force")]
    assert [c for c in forced if c.target_state not in ("shutting-down", "terminated")] == []
    assert [v.kind for v in world.emu.violations] == []


def _happenings(world: ScenarioWorld) -> list[str]:
    return [h for i in world.runner.invocations if i.result for h in i.result.get("happenings", [])]


def _drain_result(world: ScenarioWorld) -> str | None:
    rec = world.recovery()
    return rec.drain_result if rec is not None else None


def _drain_runs(node: SimNode) -> list[int]:
    return [r.exit_code for r in node.runs if r.argv[:1] == ("drain",)]


def test_a_failing_drain_keeps_the_data_safe_and_the_volume_moves_once_the_old_node_is_gone(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    world.writing = True
    world.run(5)
    # S3 refuses the final snapshot: the real agent's drain fails (after unmounting the volume).
    fail_s3_writes(old)
    t0 = world.clock.now()
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id)
    world.writing = False

    assert _drain_runs(old) and all(code != 0 for code in _drain_runs(old))
    rec = world.recovery()
    assert rec is not None and rec.drain_result == "drain-failed"
    # The agent unmounted before its upload failed, so the controller's plain (never forced)
    # detach completed at once: the volume moved without waiting for the spot termination.
    attached = new.first(f"attached {world.region.volume_id}")
    unmounted = old.first(f"unmounted {world.region.volume_id}")
    assert attached is not None and unmounted is not None and unmounted <= attached
    assert (attached - t0).total_seconds() < 120
    _no_force_detach_from_a_live_node(world)
    assert world.committed and missing_rows(world, new) == []
    assert_invariants(world)


def test_a_hanging_drain_times_out_without_a_force_detach_from_the_running_node(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    world.writing = True
    world.run(5)
    real = old.run_command

    def hang_on_drain(argv: list[str]) -> tuple[int, str, str, float | None]:
        if argv[1:2] == ["drain"]:
            return 0, "", "", None  # the agent never returns: SSM times the command out
        return real(argv)

    old.run_command = hang_on_drain  # type: ignore[method-assign]
    t0 = world.clock.now()
    world.emu.interrupt(old.instance_id)
    # The drain times out (executionTimeout = deadline + 15 s) while the node still serves.
    assert world.run(200, until=lambda: _drain_result(world) == "drain-failed"), world.explain()
    # (Whether the node is still mounted here depends on timing: the agent's own watch drains 25 s
    # before the action when no drain has completed.)
    assert world.state(old.instance_id) == "running"
    new = world.recover(not_on=old.instance_id)
    world.writing = False

    # The plain detach stayed busy while the volume was mounted: it moved only after the old node
    # let go of it (its own watch drains 25 s before the action, or the termination does).
    attached = new.first(f"attached {world.region.volume_id}")
    released = old.first(f"unmounted {world.region.volume_id}") or old.first(
        f"lost mount of {world.region.volume_id}"
    )
    assert attached is not None and released is not None and released <= attached
    assert (attached - t0).total_seconds() >= 90
    _no_force_detach_from_a_live_node(world)
    assert world.committed and missing_rows(world, new) == []
    assert_invariants(world)


def test_the_elastic_ip_taken_by_an_instance_not_ours_is_moved_back_to_the_serving_node(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    ours = world.deploy()
    ec2 = world.ec2
    foreign = world.launch_foreign(spot=False)
    ec2.associate_address(
        AllocationId=world.region.allocation_id, InstanceId=foreign, AllowReassociation=True
    )
    world.run(30, until=lambda: world.emu.address_target(world.region.public_ip) == foreign)
    assert world.emu.address_target(world.region.public_ip) == foreign
    world.inbox()
    world.run(65, until=lambda: world.emu.address_target(world.region.public_ip) == ours.instance_id)
    moves = [c for c in world.calls if c.operation == "AssociateAddress"]
    assert moves[-1].params["InstanceId"] == ours.instance_id and moves[-1].params["AllowReassociation"]
    # The foreign instance itself is left alone.
    assert world.instance(foreign)["State"]["Name"] == "running"
    assert not [c for c in world.calls if c.operation == "TerminateInstances"]
    happenings = [h for i in world.runner.invocations if i.result for h in i.result.get("happenings", [])]
    assert "eip-reassociated" in happenings
    assert_invariants(world)


def test_two_controllers_racing_for_the_lease_only_one_acts_and_the_other_reports_it(
    make_world: Callable[..., ScenarioWorld],
) -> None:
    # Launch and attach take a moment, so the acting run sleeps mid-handoff and the others get turns.
    latency = LatencyModel.instant().replace(run_to_running=5.0, attach=2.0, detach=2.0)
    world = make_world(latency=latency, timings=NodeTimings.instant())
    old = world.deploy()
    world.hold_events = True
    world.schedule = False
    world.emu.interrupt(old.instance_id)
    warning = world.held_event("EC2 Spot Instance Interruption Warning")
    mark = world.clock.now()
    # The warning and two scheduled reconciles start at the same instant and interleave.
    acting = world.deliver(warning)
    rivals = [world.invoke("reconcile", scheduled_event(world, f"race-{n}")) for n in (1, 2)]
    assert acting is not None
    assert world.run(300, until=lambda: acting.done and all(r.done for r in rivals)), world.explain()
    for rival in rivals:
        assert rival.error is None and rival.result is not None
        assert rival.result["outcome"] == "busy" and rival.result["lease_held"] is False
        assert rival.result["actions"] == []
    assert acting.error is None and acting.result is not None and acting.result["lease_held"]
    # Every change to AWS came from the run holding the lease.
    movers = {c.who for c in world.mutating_calls(since=mark)}
    assert movers == {acting.thread.name if acting.thread else ""}
    world.held.clear()
    world.hold_events = False
    world.schedule = True
    world.recover(not_on=old.instance_id)
    assert_invariants(world)


def _keep_failing(node: SimNode) -> None:
    """Forgejo's cache check fails on this node, also after a restart (a broken image, say)."""
    real_start = node.start_forgejo

    def start_failing() -> None:
        real_start()
        if node.standin is not None:
            node.standin.fail_cache = True

    node.start_forgejo = start_failing  # type: ignore[method-assign]
    assert node.standin is not None
    node.standin.fail_cache = True


def test_health_failing_after_a_recovery_restarts_forgejo_then_replaces_the_node(
    make_world: Callable[..., ScenarioWorld],
) -> None:
    world = make_world(latency=LatencyModel.instant(), timings=NodeTimings.instant())
    first = world.deploy()
    world.emu.interrupt(first.instance_id)
    sick = world.recover(not_on=first.instance_id)
    world.inbox()
    _keep_failing(sick)
    threshold = world.config.health_failure_threshold

    # Failed checks pile up; at the threshold the controller restarts Forgejo through SSM.
    world.run(600, until=lambda: any(r.argv[:1] == ("restart",) for r in sick.runs))
    restarts = [c for c in world.calls if c.operation == "SendCommand" and "restart" in str(c.params)]
    assert len(restarts) == 1 and restarts[0].params["InstanceIds"] == [sick.instance_id]
    streak = read_health(world.runtime)
    assert streak.instance_id == sick.instance_id and streak.restarted_at is not None
    assert threshold <= streak.failures < 2 * threshold
    assert world.recovery() is not None and not world.recovery().open

    # The restart did not help: at twice the threshold the node is replaced.
    healthy = world.recover(not_on=sick.instance_id, limit=900)
    rec = world.recovery()
    assert rec is not None and rec.cause == "health" and rec.old_instance_id == sick.instance_id
    opened = next(step for _, step in rec.timeline if step.startswith("recovery opened"))
    assert f"failed {2 * threshold} health checks" in opened, opened
    assert len([c for c in world.calls if c.operation == "SendCommand" and "restart" in str(c.params)]) == 1
    subjects = " | ".join(str(m.get("Subject", "")) for m in world.inbox()).lower()
    assert "health" in subjects
    assert healthy.instance_id not in (first.instance_id, sick.instance_id)
    assert_invariants(world)


def test_a_health_failure_that_a_restart_fixes_is_reported_remediated_without_a_replacement(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    node = world.deploy()
    assert node.standin is not None
    node.standin.fail_cache = True  # a restart makes a fresh stand-in, which passes
    world.run(600, until=lambda: "remediated" in _happenings(world))
    happenings = _happenings(world)
    assert "health-failed" in happenings and "restart-sent" in happenings and "remediated" in happenings
    assert world.serving_node() is node
    assert [c for c in world.calls if c.operation == "RunInstances"][1:] == []
    assert_invariants(world)
