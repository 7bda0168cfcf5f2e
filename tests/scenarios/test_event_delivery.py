"""EventBridge as it really delivers (scenarios 4 and 5, and bad input): at least once, in any
order, late, for instances that are not ours, and sometimes malformed. Events are held by the test
and handed to the function the stack's rule targets, in the order the test chooses."""

from __future__ import annotations

import copy
from typing import Any

from scenario_world import AwsCall, ScenarioWorld, assert_invariants, rule_target

from spotforge_controller.model import parse_time

# Calls that would move the service: a launch, the volume, the address, a node's life, a drain.
_MOVES = frozenset(
    {
        "RunInstances",
        "TerminateInstances",
        "StopInstances",
        "AttachVolume",
        "DetachVolume",
        "AssociateAddress",
        "DisassociateAddress",
        "DeleteVolume",
        "SendCommand",
    }
)


def _moves(calls: list[AwsCall]) -> list[str]:
    return [
        f"{c.operation} {c.params.get('InstanceId') or c.params.get('InstanceIds')}"
        for c in calls
        if c.operation in _MOVES
    ]


def _kind(event: dict[str, Any]) -> str:
    detail = event.get("detail") or {}
    state = detail.get("state")
    return f"{event['detail-type']}{f' {state}' if state else ''}"


def _our_instances(world: ScenarioWorld) -> list[str]:
    return [i for i in world.instances() if world.tags(i).get("spotforge:stack") == world.region.stack]


def _wait_all(world: ScenarioWorld, invocations: list[Any], limit: float = 300.0) -> None:
    assert world.run(limit, until=lambda: all(i.done for i in invocations)), world.explain()


def test_a_warning_delivered_twice_and_again_late_launches_exactly_one_replacement(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    world.inbox()
    world.hold_events = True
    world.emu.interrupt(old.instance_id)
    warning = world.held_event("EC2 Spot Instance Interruption Warning")
    rebalance = world.held_event("EC2 Instance Rebalance Recommendation")
    world.held.clear()
    world.hold_events = False
    first = [world.deliver(warning), world.deliver(copy.deepcopy(warning)), world.deliver(rebalance)]
    new = world.recover(not_on=old.instance_id)
    _wait_all(world, first)
    assert [i.error for i in first] == [None, None, None]
    assert len(_our_instances(world)) == 2  # the first node and one replacement
    assert len([c for c in world.calls if c.operation == "RunInstances"]) == 2

    # The same warning once more, well after the recovery closed: nothing moves.
    mark = world.clock.now()
    late = world.deliver(copy.deepcopy(warning))
    assert late is not None
    _wait_all(world, [late])
    assert late.error is None and late.result is not None and late.result["actions"] == []
    assert _moves(world.mutating_calls(since=mark)) == []
    assert world.serving_node() is new
    # One recovery, told once: duplicates do not send a second email.
    subjects = [str(m.get("Subject", "")) for m in world.inbox()]
    assert len([s for s in subjects if "interruption warning" in s.lower()]) == 1, subjects
    assert len([s for s in subjects if "recovered" in s.lower()]) == 1, subjects
    assert_invariants(world)


def test_a_state_change_before_its_warning_heals_and_the_late_warning_changes_nothing(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    # EventBridge holds everything back (and the schedule is quiet) until the node is gone.
    world.hold_events = True
    world.schedule = False
    world.emu.interrupt(old.instance_id)
    world.run_until_state(old.instance_id, "terminated")
    world.held_event("Spot Interruption Signal")
    world.run(5)  # the last state change's delivery
    held = list(world.held)
    world.held.clear()
    world.hold_events = False
    state_changes = [e for e in held if rule_target(e) == "reconcile"]
    warnings = [e for e in held if rule_target(e) in ("interruption", "rebalance")]
    assert [_kind(e) for e in state_changes] == [
        "EC2 Instance State-change Notification shutting-down",
        "EC2 Instance State-change Notification terminated",
    ]
    # The state changes arrive first, newest first; then the recovery runs its course.
    for event in reversed(state_changes):
        world.deliver(event)
    world.schedule = True
    new = world.recover(not_on=old.instance_id)
    rec = world.recovery()
    assert rec is not None and rec.old_instance_id == old.instance_id and not rec.open

    # Only now do the warning, the node agent's own signal and the rebalance recommendation arrive.
    world.inbox()
    mark = world.clock.now()
    late = [world.deliver(e) for e in warnings]
    _wait_all(world, [i for i in late if i is not None])
    assert sorted(_kind(e) for e in warnings) == [
        "EC2 Instance Rebalance Recommendation",
        "EC2 Spot Instance Interruption Warning",
        "Spot Interruption Signal",
    ]
    assert [i.error for i in late if i is not None] == [None, None, None]
    # At most the first-writer-wins warning tag on the dead node; no backup, snapshot or email.
    changes = [
        c.operation
        for c in world.mutating_calls(since=mark)
        if not (c.operation == "CreateTags" and c.params.get("Resources") == [old.instance_id])
    ]
    assert changes == []
    assert [m["Subject"] for m in world.inbox() if "rebalance" in str(m.get("Subject")).lower()] == []
    assert len(_our_instances(world)) == 2
    assert world.serving_node() is new
    assert world.recovery() == rec  # the closed recovery was not reopened or rewritten
    assert_invariants(world)


def test_a_warning_for_an_instance_that_is_not_ours_changes_nothing(quick_world: ScenarioWorld) -> None:
    world = quick_world
    ours = world.deploy()
    foreign = world.launch_foreign()
    before_tags = world.tags(foreign)
    mark = world.clock.now()
    world.emu.interrupt(foreign)
    # Past the foreign instance's termination: its warning, rebalance and state changes all arrive.
    world.run_until_state(foreign, "terminated")
    world.run(10)
    assert [c for c in world.calls if c.at >= mark and c.mutating] == []
    outcomes = {
        (i.function, (i.result or {}).get("outcome"))
        for i in world.runner.invocations
        if (i.started >= mark and i.function in ("interruption", "rebalance"))
        or (i.function == "reconcile" and (i.event.get("detail") or {}).get("instance-id") == foreign)
    }
    assert outcomes == {("interruption", "ignored"), ("rebalance", "ignored"), ("reconcile", "ignored")}
    assert world.tags(foreign) == before_tags  # no interruption tag on someone else's instance
    assert world.serving_node() is not None and world.serving_node().instance_id == ours.instance_id
    assert world.recovery() is not None and not world.recovery().open
    assert_invariants(world)


def _malformed(world: ScenarioWorld, foreign: str) -> list[tuple[str, object]]:
    base = {
        "version": "0",
        "id": "bad-1",
        "account": world.emu.account_id,
        "time": world.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": world.emu.region,
        "resources": [],
    }

    def ec2(detail_type: str, detail: object) -> dict[str, Any]:
        return dict(base, source="aws.ec2", **{"detail-type": detail_type, "detail": detail})

    warning = "EC2 Spot Instance Interruption Warning"
    rebalance = "EC2 Instance Rebalance Recommendation"
    state = "EC2 Instance State-change Notification"
    unknown_id = "i-0123456789abcdef0"
    cases: list[tuple[str, object]] = []
    for function in ("interruption", "rebalance", "reconcile", "health"):
        cases += [
            (function, "not an event"),
            (function, None),
            (function, [1, 2]),
            (function, dict(base, source="aws.ec2", **{"detail-type": "EC2 Something New", "detail": {}})),
            (function, dict(base, source="aws.ec2")),
        ]
    cases += [
        ("interruption", ec2(warning, None)),
        ("interruption", ec2(warning, {"instance-action": "terminate"})),
        ("interruption", ec2(warning, {"instance-id": "not-an-id", "instance-action": "terminate"})),
        ("interruption", ec2(warning, {"instance-id": foreign, "instance-action": "reboot"})),
        ("interruption", ec2(warning, {"instance-id": foreign, "instance-action": "terminate"})),
        ("interruption", ec2(warning, {"instance-id": unknown_id, "instance-action": "terminate"})),
        ("rebalance", ec2(rebalance, {})),
        ("rebalance", ec2(rebalance, {"instance-id": foreign})),
        ("rebalance", ec2(rebalance, {"instance-id": unknown_id})),
        ("reconcile", ec2(state, {"instance-id": foreign, "state": "terminated"})),
        ("reconcile", ec2(state, {"instance-id": unknown_id, "state": "stopped"})),
        ("reconcile", ec2(state, {"state": "terminated"})),
        ("reconcile", ec2(state, {"instance-id": foreign, "state": "exploded"})),
        ("health", ec2(state, {"instance-id": foreign, "state": "terminated"})),
        ("lifecycle", {"RequestType": "Bogus", "RequestId": "r-bad"}),
        ("lifecycle", "not a request"),
    ]
    return cases


def test_malformed_foreign_and_unknown_events_through_each_handler_do_nothing_and_raise_nothing(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    ours = world.deploy()
    foreign = world.launch_foreign()
    world.schedule = False
    mark = world.clock.now()
    cases = _malformed(world, foreign)
    invocations = [world.invoke(function, event) for function, event in cases]
    _wait_all(world, invocations)
    for (function, event), inv in zip(cases, invocations, strict=True):
        assert inv.error is None, (function, event, inv.error)
        result = inv.result or {}
        ignored = result.get("outcome") == "ignored" or "Ignored" in result.get("Data", {})
        assert ignored, (function, event, result)
    assert [c for c in world.calls if c.at >= mark and c.mutating] == []
    assert world.tags(foreign).get("spotforge:interruption") is None
    world.schedule = True
    assert world.serving_node() is not None and world.serving_node().instance_id == ours.instance_id
    assert_invariants(world)


def test_the_node_agents_own_signal_drives_the_handoff_at_the_deadline_when_the_aws_warning_is_lost(
    quick_world: ScenarioWorld,
) -> None:
    world = quick_world
    old = world.deploy()
    # The replacement will be slow (standby 150 s after running): the deadline decides the handoff.
    world.fleet.timings = world.fleet.timings.replace(cluster_ready=150.0)
    world.hold_events = True
    world.schedule = False  # nothing but the agent's signal may start the work
    t0 = world.clock.now()
    world.emu.interrupt(old.instance_id)
    signal = world.held_event("Spot Interruption Signal")
    world.held.clear()
    world.hold_events = False
    assert signal["source"] == "spotforge.node" and signal["detail"]["instance-id"] == old.instance_id
    # The agent tagged the warning time (the deadline counts from it), not IMDS's action time.
    tagged = parse_time(world.tags(old.instance_id)["spotforge:interruption"])
    assert tagged is not None and abs((tagged - t0).total_seconds()) <= 1, tagged
    # EC2 tags are eventually consistent: the controller may not see the tag the agent wrote yet,
    # so the warning time must come from the signal itself.
    world.ec2.delete_tags(Resources=[old.instance_id], Tags=[{"Key": "spotforge:interruption"}])
    inv = world.deliver(signal)
    assert inv is not None
    world.schedule = True
    new = world.recover(not_on=old.instance_id)
    assert inv.done and inv.error is None and inv.result is not None
    assert inv.result["origin"] == "node" and inv.result["lease_held"]
    rec = world.recovery()
    assert rec is not None and rec.cause == "spot-interruption" and rec.interruption_at is not None
    # The warning was issued at t0 (IMDS gives the action time, two minutes later).
    assert abs((rec.interruption_at - t0).total_seconds()) <= 1, rec.interruption_at
    # So the controller drained at the 85 s deadline, before the agent's own fallback (25 s before
    # the action) and well before the two-minute action.
    drain = next(r for r in old.runs if r.argv[:1] == ("drain",))
    assert drain.via == "ssm", [(r.argv, r.via) for r in old.runs if r.argv[:1] == ("drain",)]
    assert 85 <= (drain.started - t0).total_seconds() < 90
    assert world.serving_node() is new
    assert_invariants(world)
