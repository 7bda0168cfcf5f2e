"""The control loop: take the lease, observe, decide, act, repeat until settled or out of time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from types import MappingProxyType

from .act import execute, mark_interruption, snapshot_for_rebalance, teardown, write_health
from .decide import POLL_SECONDS, decide, next_health
from .errors import PermissionDeniedError, ThrottledError
from .lease import Lease
from .model import Action, ExecutedAction, Happening, Observed, parse_time
from .observe import observe, read_recovery
from .runtime import Runtime

__all__ = ["ExecutedAction", "Happening", "ReconcileResult", "Trigger", "reconcile"]

# Without a time budget a run does what it can right away and stops at the first wait.
MAX_STEPS_UNBUDGETED = 25
MAX_STEPS = 400
MAX_CONFLICTS = 5


@dataclass(frozen=True)
class Trigger:
    """Why we are running: a hint only, observed AWS state decides what happens."""

    kind: str  # interruption | rebalance | state-change | schedule | health | deploy | destroy | manual
    instance_id: str | None = None
    detail: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ReconcileResult:
    actions: tuple[ExecutedAction, ...]
    happenings: tuple[Happening, ...]
    settled: bool  # nothing left to do right now
    lease_held: bool  # False: another controller is acting; we did nothing


def reconcile(runtime: Runtime, trigger: Trigger, *, until: datetime | None = None) -> ReconcileResult:
    """Drive AWS toward one healthy serving node holding the volume and the EIP.

    `until` is the time budget on runtime.clock: the loop waits (on the clock) for AWS to move
    and stops when settled or when the next wait would cross it. A missing IAM permission ends the
    run with a `recovery-failed` happening, lasting throttling ends it unsettled; unknown errors
    propagate.
    """
    lease = Lease(runtime)
    if not lease.acquire():
        return ReconcileResult((), (), settled=False, lease_held=False)
    executed: list[ExecutedAction] = []
    happenings: list[Happening] = []
    settled = False
    try:
        settled = _run(runtime, trigger, until, lease, executed, happenings)
    except PermissionDeniedError as exc:
        message = f"The controller could not act: {exc}. Grant it in the controller's IAM role."
        data = {"permission": exc.permission, "error": str(exc), "trigger": trigger.kind}
        happenings.append(Happening("recovery-failed", runtime.clock.now(), message, data))
    except ThrottledError:
        # Still throttled after every backoff: stop quietly, the next scheduled run carries on.
        settled = False
    finally:
        lease.release()
    return ReconcileResult(tuple(executed), tuple(happenings), settled=settled, lease_held=True)


def _run(
    runtime: Runtime,
    trigger: Trigger,
    until: datetime | None,
    lease: Lease,
    executed: list[ExecutedAction],
    happenings: list[Happening],
) -> bool:
    clock = runtime.clock
    if trigger.kind == "interruption" and trigger.instance_id:
        at = parse_time(trigger.detail.get("time")) or clock.now()
        mark_interruption(runtime, trigger.instance_id, at)
    if trigger.kind == "rebalance" and trigger.instance_id:
        snapshot = snapshot_for_rebalance(runtime, trigger.instance_id)
        if snapshot is not None:
            happenings.append(snapshot)

    observed = observe(runtime)
    if trigger.kind == "destroy":
        executed.extend(teardown(runtime, observed))
        return True
    observed = _fold_health(runtime, observed, happenings)
    if trigger.kind == "rebalance" and runtime.config.proactive_rebalance and trigger.instance_id:
        observed = _proactive_rebalance(runtime, observed, trigger.instance_id, executed, happenings)

    conflicts = 0
    previous: list[str] = []
    limit = MAX_STEPS if until is not None else MAX_STEPS_UNBUDGETED
    for _ in range(limit):
        now = clock.now()
        actions = decide(observed, now)
        if not actions:
            return True
        real = [a for a in actions if a.kind != "wait"]
        if not real:
            wait = min(float(a.params["seconds"]) for a in actions)  # type: ignore[arg-type]
            if until is None or (until - now).total_seconds() < wait:
                return False
            clock.sleep(wait)
        else:
            for action in real:
                result, found = execute(runtime, observed, action)
                executed.append(result)
                happenings.extend(found)
                if result.outcome == "conflict":
                    conflicts += 1
                # The next action in this batch must see the record this one wrote.
                observed = replace(observed, recovery=read_recovery(runtime))
            if conflicts >= MAX_CONFLICTS:
                return False
            summaries = [a.summary() for a in real]
            stalled = summaries == previous or executed[-1].outcome == "conflict"
            previous = summaries
            if stalled:
                # The same step again, or AWS refused it mid-transition: give AWS a moment
                # instead of hammering the same call.
                if until is None or (until - clock.now()).total_seconds() < POLL_SECONDS:
                    return False
                clock.sleep(POLL_SECONDS)
        if until is not None and clock.now() >= until:
            return False
        if not lease.renew():
            return False
        observed = observe(runtime)
    return False


def _fold_health(runtime: Runtime, observed: Observed, happenings: list[Happening]) -> Observed:
    """Count this run's probe into the streak once, only for the settled serving node."""
    probe = observed.probe
    holder = observed.volume.holder
    if probe is None or holder is None or probe.instance_id != holder.instance_id:
        return observed
    if observed.recovery is not None and observed.recovery.open:
        return observed
    now = runtime.clock.now()
    record, notes = next_health(observed.health, probe, now, runtime.config.health_failure_threshold)
    if record != observed.health:
        write_health(runtime, record)
    for kind, message in notes:
        data = {"instance_id": probe.instance_id, "failures": record.failures, "status": probe.status}
        if probe.cert_days_left is not None:
            data["cert_days_left"] = probe.cert_days_left
        happenings.append(Happening(kind, now, message, data))
    return replace(observed, health=record)


def _proactive_rebalance(
    runtime: Runtime,
    observed: Observed,
    instance_id: str,
    executed: list[ExecutedAction],
    happenings: list[Happening],
) -> Observed:
    holder = observed.volume.holder
    node = observed.node(instance_id)
    if holder is None or holder.instance_id != instance_id or node is None or not node.alive:
        return observed
    if observed.recovery is not None and observed.recovery.open:
        return observed
    action = Action(
        "open-recovery",
        f"node {instance_id} got a rebalance recommendation and proactive handoff is on",
        instance_id,
        {"cause": "rebalance", "old": instance_id},
    )
    result, found = execute(runtime, observed, action)
    executed.append(result)
    happenings.extend(found)
    return replace(observed, recovery=read_recovery(runtime))
