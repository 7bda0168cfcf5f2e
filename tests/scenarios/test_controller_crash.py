"""Scenario 7: the controller crashing after each step of a warned handoff in turn.

The decision loop (spotforge_controller.reconcile) calls `execute` for every action; the wrapper
below lets the Nth executed action happen in AWS and then makes the invocation die, for N = 1, 2,
... until a recovery completes without reaching N. After each crash only the one-minute schedule
(and any events still due) drives the controller, and the invariants must hold when it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from scenario_world import ScenarioWorld, assert_invariants, scheduled_event

from spotforge_controller import act as act_module
from spotforge_controller import reconcile as reconcile_module
from spotforge_controller.lease import Lease

MAX_STEPS = 30  # far more actions than any handoff takes; reaching it means the loop never ends


class SimulatedCrash(RuntimeError):
    """The Lambda dies right after an AWS step succeeded (timeout, OOM, a bug further down)."""


class CrashAfter:
    """Wraps the core's `execute`: after the Nth executed action (once armed), raise."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.armed_at: int | None = None
        self.count = 0
        self.fired: str | None = None  # summary of the action after which the run died
        self.fired_at: Any = None
        self.keep_lease = False  # a kill leaves the lease held until it expires
        self._skip_release = False

    def arm(self, n: int, keep_lease: bool = False) -> None:
        self.armed_at, self.count, self.fired, self.keep_lease = n, 0, None, keep_lease

    def disarm(self) -> None:
        self.armed_at = None

    def __call__(self, runtime: Any, observed: Any, action: Any) -> Any:
        result = self.real(runtime, observed, action)
        if self.armed_at is not None:
            self.count += 1
            if self.count == self.armed_at:
                self.armed_at = None
                self.fired = action.summary()
                self.fired_at = runtime.clock.now()
                self._skip_release = self.keep_lease
                raise SimulatedCrash(f"crash after step {self.count}: {action.summary()}")
        return result

    def release_unless_killed(self, real_release: Callable[[Lease], None]) -> Callable[[Lease], None]:
        def release(lease: Lease) -> None:
            if self._skip_release:
                # Only one Lambda thread runs at a time: this is the crashing run's `finally`.
                self._skip_release = False
                return
            real_release(lease)

        return release


@pytest.fixture
def crash(monkeypatch: pytest.MonkeyPatch) -> CrashAfter:
    wrapper = CrashAfter(reconcile_module.execute)
    # reconcile.py imported `execute` from act.py: the loop calls this name.
    monkeypatch.setattr(reconcile_module, "execute", wrapper)
    monkeypatch.setattr(Lease, "release", wrapper.release_unless_killed(Lease.release))
    return wrapper


def _crashed_or_settled(world: ScenarioWorld, crash: CrashAfter, old: str) -> Callable[[], bool]:
    return lambda: crash.fired is not None or world.fully_settled(not_on=old)


def _only_simulated_crashes(world: ScenarioWorld) -> list[str]:
    return [e for e in world.handler_errors() if "SimulatedCrash" not in e]


def test_a_crash_after_any_step_of_a_warned_handoff_is_finished_by_the_schedule(
    quick_world: ScenarioWorld, crash: CrashAfter
) -> None:
    world = quick_world
    node = world.deploy()
    crashed_after: list[str] = []
    for n in range(1, MAX_STEPS + 1):
        crash.arm(n)
        world.emu.interrupt(node.instance_id)
        world.run(300, until=_crashed_or_settled(world, crash, node.instance_id))
        if crash.fired is not None:
            # The next minute's schedule, without waiting for the minute to come round.
            world.invoke("reconcile", scheduled_event(world, f"after-crash-{n}"))
        new = world.recover(not_on=node.instance_id, limit=900)
        crash.disarm()
        assert _only_simulated_crashes(world) == []
        assert_invariants(world, allow_errors=True)
        rec = world.recovery()
        assert rec is not None and not rec.open and rec.old_instance_id == node.instance_id
        # One replacement per recovery, even when a crash came right after RunInstances.
        ours = [i for i in world.instances() if world.tags(i).get("spotforge:stack") == world.region.stack]
        assert len(ours) == 1 + n  # the first node, then one replacement per interruption
        node = new
        if crash.fired is None:
            break  # this recovery took fewer than n steps: every step has had its crash
        crashed_after.append(crash.fired)
    else:
        pytest.fail(f"the recovery never completed in fewer than {MAX_STEPS} steps")
    kinds = [summary.split()[0] for summary in crashed_after]
    # Every step of the handoff was a crash point at least once.
    steps = ("open-recovery", "launch", "drain", "tag", "detach", "attach", "associate-address")
    for step in (*steps, "terminate", "close-recovery"):
        assert step in kinds, kinds
    assert len(world.handler_errors()) == len(crashed_after)


def test_a_controller_killed_mid_drain_without_releasing_its_lease_is_finished_after_the_lease_expires(
    quick_world: ScenarioWorld, crash: CrashAfter
) -> None:
    world = quick_world
    old = world.deploy()
    # open-recovery, launch, drain: the kill lands with the drain command in flight.
    crash.arm(3, keep_lease=True)
    world.emu.interrupt(old.instance_id)
    world.run(300, until=lambda: crash.fired is not None)
    assert crash.fired is not None and crash.fired.startswith("drain"), crash.fired
    killed_at = crash.fired_at
    new = world.recover(not_on=old.instance_id, limit=900)
    # Nobody acted while the dead run's lease was valid (LEASE_SECONDS = 120).
    waited = [c for c in world.mutating_calls() if c.at > killed_at]
    assert waited and (waited[0].at - killed_at).total_seconds() >= world.config.lease_seconds - 1
    busy = [r for r in world.results("reconcile") if r.get("outcome") == "busy"]
    assert busy, "the schedule ran while the lease was held and must have reported it"
    assert world.serving_node() is new
    assert _only_simulated_crashes(world) == []
    assert_invariants(world, allow_errors=True)


def test_a_crash_between_run_instances_and_the_record_write_adopts_the_launched_node(
    quick_world: ScenarioWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = quick_world
    old = world.deploy()
    real_update = act_module._update_record
    crashed: list[str] = []

    def die_after_launch(runtime: Any, rec: Any, now: Any, step: str, **fields: Any) -> Any:
        if step.startswith("launched") and not crashed:
            # RunInstances has returned; the Lambda dies before the recovery remembers it.
            crashed.append(step)
            raise SimulatedCrash(f"crash before recording: {step}")
        return real_update(runtime, rec, now, step, **fields)

    monkeypatch.setattr(act_module, "_update_record", die_after_launch)
    world.emu.interrupt(old.instance_id)
    new = world.recover(not_on=old.instance_id, limit=900)
    assert crashed and _only_simulated_crashes(world) == []
    ours = [i for i in world.instances() if world.tags(i).get("spotforge:stack") == world.region.stack]
    assert sorted(ours) == sorted([old.instance_id, new.instance_id])  # launched once, then adopted
    rec = world.recovery()
    assert rec is not None and any("replacement-adopted" in step for _, step in rec.timeline), rec.timeline
    assert rec.replacement_id == new.instance_id
    assert_invariants(world, allow_errors=True)
