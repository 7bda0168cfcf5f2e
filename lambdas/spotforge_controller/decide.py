"""The pure decision core: from what AWS looks like now to the next steps, each with its reason.

Nothing here calls AWS or reads a clock. `decide` is level-triggered: it looks only at the
observed state (including the `recovery` record, the controller's memory of a replacement in
flight), so a crashed, repeated or late run reaches the same answer. It returns the next steps
only; the loop in reconcile.py acts, observes again and calls it again. A list holding nothing but
`wait` actions means "AWS is moving, look again later"; an empty list means settled.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta

from .model import (
    DATA_DEVICE,
    SPOT_RECLAIM_REASONS,
    Action,
    HealthRecord,
    Node,
    Observed,
    Probe,
    Recovery,
)

POLL_SECONDS = 2.0
# While the service is down (drain, detach, attach, mount, start) look more often: every second
# of polling slack is a second of downtime.
FAST_POLL_SECONDS = 1.0
# After every launch choice failed for lack of capacity, start over this long after.
CAPACITY_RETRY_SECONDS = 120.0
# A volume still attached to a dead instance this long after the loss is stuck: force it off.
STUCK_DETACH_SECONDS = 60.0
CERT_WARN_DAYS = 14.0
# A recovery whose replacement holds the volume but never passes health is reported after this.
STUCK_RECOVERY_SECONDS = 900.0
# Spot terminates two minutes after the warning; a warned node still running well after that
# (a cancelled or stop-type interruption gone wrong) is terminated so its volume can move.
WARNED_OVERDUE_SECONDS = 180.0
# Causes that wait for a standby replacement before draining (the old node still serves fine).
_PATIENT_CAUSES = frozenset({"planned", "rebalance"})


def decide(observed: Observed, now: datetime) -> list[Action]:
    recovery = observed.recovery
    if recovery is not None and recovery.open:
        return _recover(observed, recovery, now)
    return _steady(observed)


def launch_choices(observed: Observed) -> tuple[str, ...]:
    """Launch choices in preference order: spot over every type, then on-demand if allowed."""
    types = observed.config.instance_types
    choices = tuple(f"spot:{t}" for t in types)
    if observed.config.on_demand_fallback:
        choices += tuple(f"on-demand:{t}" for t in types)
    return choices


def client_token(recovery_id: str, attempt: int, choice: str) -> str:
    """Deterministic RunInstances ClientToken: a retried launch of the same choice returns the
    instance the first call made instead of a second one."""
    digest = hashlib.sha256(f"{recovery_id}|{attempt}|{choice}".encode()).hexdigest()[:40]
    return f"sf-{digest}"


def recovery_id(cause: str, old_instance_id: str | None, now: datetime) -> str:
    # Keyed on the lost instance so every event about the same loss opens the same recovery.
    if old_instance_id:
        return f"{cause}:{old_instance_id}"
    return f"{cause}:{now.strftime('%Y%m%dT%H%M%SZ')}"


# ---------------------------------------------------------------- steady state (no recovery open)


def _steady(o: Observed) -> list[Action]:
    holder = o.volume.holder
    holder_node = o.node(holder.instance_id) if holder else None
    if holder is not None and holder_node is None:
        # Attached to an instance that is not ours: touching it could corrupt someone's data.
        return []
    incumbent = holder_node if holder_node is not None and holder_node.alive else None

    if incumbent is None:
        lost = holder_node or _newest(n for n in o.nodes if not n.alive)
        if lost is None:
            return [_open(o, "no-node", None, "no node holds the data volume and none was lost")]
        if lost.interruption is not None:
            cause = "spot-interruption"
        elif lost.state_reason in SPOT_RECLAIM_REASONS:
            cause = "spot-reclaim"
        else:
            cause = "instance-lost"
        return [
            _open(
                o,
                cause,
                lost,
                f"node {lost.instance_id} is {lost.state} ({lost.state_reason or 'no reason'})",
            )
        ]
    if incumbent.interruption is not None:
        return [_open(o, "spot-interruption", incumbent, f"node {incumbent.instance_id} got a spot warning")]
    threshold = o.config.health_failure_threshold
    own_streak = o.health.instance_id == incumbent.instance_id
    if own_streak and o.health.failures >= 2 * threshold:
        reason = f"node {incumbent.instance_id} failed {o.health.failures} health checks in a row"
        return [_open(o, "health", incumbent, reason)]
    if incumbent.lt_version is not None and incumbent.lt_version < o.latest_lt_version:
        reason = (
            f"node {incumbent.instance_id} runs launch template version {incumbent.lt_version},"
            f" latest is {o.latest_lt_version}"
        )
        return [_open(o, "planned", incumbent, reason)]
    if incumbent.phase in ("draining", "drained"):
        return [_open(o, "resume", incumbent, f"node {incumbent.instance_id} is {incumbent.phase}")]

    actions: list[Action] = []
    if incumbent.state == "running" and o.address.instance_id != incumbent.instance_id:
        where = o.address.instance_id or o.address.network_interface_id or "nothing"
        actions.append(_associate(o, incumbent, f"the Elastic IP points at {where}, not the serving node"))
    if own_streak and o.health.failures >= threshold and o.health.restarted_at is None:
        actions.append(
            Action(
                "restart",
                f"node {incumbent.instance_id} failed {o.health.failures} health checks in a row",
                incumbent.instance_id,
            )
        )
    for node in o.nodes:
        if node is not incumbent and (node.alive or node.state == "stopped"):
            actions.append(
                Action(
                    "terminate", f"node {node.instance_id} is {node.state} but not serving", node.instance_id
                )
            )
    return actions


def _open(o: Observed, cause: str, old: Node | None, reason: str) -> Action:
    params: dict[str, object] = {"cause": cause}
    if old is not None:
        params["old"] = old.instance_id
        if old.interruption is not None:
            params["interruption_at"] = old.interruption.isoformat()
    return Action("open-recovery", reason, old.instance_id if old else None, params)


def _associate(o: Observed, node: Node, reason: str) -> Action:
    return Action("associate-address", reason, node.instance_id, {"allocation": o.address.allocation_id})


def _newest(nodes: object) -> Node | None:
    candidates = list(nodes)  # type: ignore[call-overload]
    if not candidates:
        return None
    return max(candidates, key=lambda n: n.launch_time)


def _wait(reason: str, seconds: float = POLL_SECONDS) -> Action:
    return Action("wait", reason, None, {"seconds": round(max(0.1, seconds), 3)})


# ---------------------------------------------------------------- recovery in flight


def _recover(o: Observed, rec: Recovery, now: datetime) -> list[Action]:
    holder = o.volume.holder
    holder_node = o.node(holder.instance_id) if holder else None
    if holder is not None and holder_node is None:
        if rec.stuck_reported:
            return []
        reason = f"the data volume is attached to {holder.instance_id}, which is not ours"
        return [Action("report", reason, holder.instance_id, {"happening": "recovery-stuck"})]

    replacement, track = _replacement_track(o, rec, now)
    actions = list(track)
    actions.extend(_volume_track(o, rec, replacement, now))
    real = [a for a in actions if a.kind != "wait"]
    if real:
        return real
    if not actions:
        return []
    # Look again at the soonest moment anything we wait on may have changed.
    soonest = min(actions, key=lambda a: float(a.params["seconds"]))  # type: ignore[arg-type]
    return [soonest]


def _replacement_track(o: Observed, rec: Recovery, now: datetime) -> tuple[Node | None, list[Action]]:
    """Make sure a healthy-looking replacement exists (or is being sought)."""
    replacement = o.node(rec.replacement_id)
    if replacement is not None:
        holds_volume = o.volume.holder is not None and o.volume.holder.instance_id == replacement.instance_id
        if not replacement.alive and not holds_volume:
            reason = f"replacement {replacement.instance_id} is {replacement.state}; launching another"
            return None, [
                _update(rec, "replacement-lost", reason, replacement_id=None, attempt=rec.attempt + 1)
            ]
        if replacement.interruption is not None and not holds_volume:
            reason = f"replacement {replacement.instance_id} got its own spot warning; launching another"
            return None, [
                _update(rec, "replacement-interrupted", reason, replacement_id=None, attempt=rec.attempt + 1),
                Action("terminate", reason, replacement.instance_id),
            ]
        return replacement, []
    if rec.replacement_id is not None and replacement is None:
        # Not even listed any more (long terminated): same as lost.
        reason = f"replacement {rec.replacement_id} no longer exists; launching another"
        return None, [_update(rec, "replacement-lost", reason, replacement_id=None, attempt=rec.attempt + 1)]

    choices = launch_choices(o)
    tokens = {client_token(rec.id, rec.attempt, c): c for c in choices}
    for node in o.nodes:
        if node.alive and node.launch_token in tokens and node.instance_id != rec.old_instance_id:
            reason = f"node {node.instance_id} was launched for this recovery before a crash"
            return node, [_update(rec, "replacement-adopted", reason, replacement_id=node.instance_id)]

    remaining = [c for c in choices if c not in rec.tried]
    if not remaining:
        if rec.capacity_exhausted_at is None:
            reason = f"no capacity for any of {', '.join(choices)} in {o.volume.az}"
            return None, [Action("report", reason, None, {"happening": "capacity-unavailable"})]
        waited = (now - rec.capacity_exhausted_at).total_seconds()
        if waited >= CAPACITY_RETRY_SECONDS:
            reason = f"capacity was exhausted {waited:.0f} s ago; trying every choice again"
            return None, [
                _update(
                    rec,
                    "capacity-retry",
                    reason,
                    attempt=rec.attempt + 1,
                    tried=(),
                    capacity_exhausted_at=None,
                )
            ]
        return None, [
            _wait("waiting to retry launches after a capacity shortage", CAPACITY_RETRY_SECONDS - waited)
        ]

    subnet = o.config.subnet_for(o.volume.az)
    if subnet is None:
        if rec.stuck_reported:
            return None, []
        reason = f"no subnet is configured for {o.volume.az}, the data volume's zone"
        return None, [Action("report", reason, None, {"happening": "recovery-stuck"})]
    choice = remaining[0]
    market, instance_type = choice.split(":", 1)
    params: dict[str, object] = {
        "choice": choice,
        "market": market,
        "instance_type": instance_type,
        "az": o.volume.az,
        "subnet": subnet,
        "token": client_token(rec.id, rec.attempt, choice),
        "lt_version": o.latest_lt_version,
    }
    return None, [Action("launch", f"recovery {rec.id} needs a replacement node ({choice})", None, params)]


def _handoff_ready(
    o: Observed, rec: Recovery, old: Node, replacement: Node | None, now: datetime
) -> tuple[bool, float]:
    """Whether to drain `old` now, and if not, how long until the deadline forces it."""
    if old.phase in ("draining", "drained"):
        return True, 0.0
    if (
        replacement is not None
        and replacement.state == "running"
        and replacement.phase in ("standby", "serving")
    ):
        return True, 0.0
    warned_at = old.interruption or (rec.interruption_at if rec.old_instance_id == old.instance_id else None)
    if warned_at is not None:
        deadline = warned_at + timedelta(seconds=o.config.handoff_deadline_seconds)
        left = (deadline - now).total_seconds()
        return left <= 0, left
    if rec.cause in _PATIENT_CAUSES:
        return False, POLL_SECONDS
    # A failed, lost or half-finished node: nothing to wait for.
    return True, 0.0


def _volume_track(o: Observed, rec: Recovery, replacement: Node | None, now: datetime) -> list[Action]:
    """Move the data volume (and the EIP) from wherever it is to the replacement."""
    volume = o.volume
    holder = volume.holder
    holder_node = o.node(holder.instance_id) if holder else None

    if holder is None or holder_node is None:
        if volume.state != "available":
            return [_wait(f"the data volume is {volume.state}", FAST_POLL_SECONDS)]
        if replacement is None:
            return [_wait("the data volume is free; waiting for a replacement")]
        if replacement.state != "running":
            return [_wait(f"replacement {replacement.instance_id} is {replacement.state}")]
        actions = [
            Action(
                "attach",
                f"the data volume is free and replacement {replacement.instance_id} is running",
                replacement.instance_id,
                {"volume": volume.volume_id, "device": DATA_DEVICE},
            )
        ]
        if o.address.instance_id != replacement.instance_id:
            # In parallel with the attach: the EIP move is off the downtime's critical path.
            actions.append(_associate(o, replacement, "move the Elastic IP with the data volume"))
        return actions

    if replacement is not None and holder_node.instance_id == replacement.instance_id:
        return _finish(o, rec, replacement, holder.state, now)

    if holder_node.alive:
        return _drain_track(o, rec, holder_node, holder.state, replacement, now)
    return _dead_holder(o, rec, holder_node, holder.state, now)


def _finish(
    o: Observed, rec: Recovery, replacement: Node, attachment_state: str, now: datetime
) -> list[Action]:
    actions: list[Action] = []
    if o.address.instance_id != replacement.instance_id:
        actions.append(_associate(o, replacement, "the Elastic IP must point at the node holding the volume"))
    if attachment_state != "attached":
        actions.append(
            _wait(f"the data volume is {attachment_state} on {replacement.instance_id}", FAST_POLL_SECONDS)
        )
        return actions
    if actions:
        return actions
    probe = o.probe
    if probe is None or probe.instance_id != replacement.instance_id or probe.status != "pass":
        seen = "no probe" if probe is None else f"{probe.status} ({probe.detail or probe.http_status})"
        waited = (now - rec.opened_at).total_seconds()
        if waited >= STUCK_RECOVERY_SECONDS and not rec.stuck_reported:
            reason = f"{replacement.instance_id} holds the volume but has not passed health in {waited:.0f} s: {seen}"
            return [Action("report", reason, replacement.instance_id, {"happening": "recovery-stuck"})]
        return [
            _wait(
                f"waiting for Forgejo on {replacement.instance_id} to report pass: {seen}", FAST_POLL_SECONDS
            )
        ]
    for node in o.nodes:
        if node.instance_id != replacement.instance_id and (node.alive or node.state == "stopped"):
            role = "old node" if node.instance_id == rec.old_instance_id else "stray node"
            actions.append(Action("terminate", f"{role} {node.instance_id} is replaced", node.instance_id))
    started = rec.downtime_started_at or rec.drain_started_at or rec.interruption_at or rec.opened_at
    began = rec.interruption_at or rec.opened_at
    params = {
        "serving": replacement.instance_id,
        "downtime_seconds": round(max(0.0, (now - started).total_seconds()), 3),
        "total_seconds": round(max(0.0, (now - began).total_seconds()), 3),
    }
    actions.append(
        Action("close-recovery", f"{replacement.instance_id} passes its health check", None, params)
    )
    return actions


def _drain_track(
    o: Observed, rec: Recovery, holder: Node, attachment_state: str, replacement: Node | None, now: datetime
) -> list[Action]:
    if attachment_state == "attaching":
        return [_wait(f"the data volume is still attaching to {holder.instance_id}")]
    if attachment_state == "detaching":
        return [_wait(f"the data volume is detaching from {holder.instance_id}", FAST_POLL_SECONDS)]
    drain_sent = rec.drain_command_id is not None and rec.drain_instance_id == holder.instance_id
    if not drain_sent:
        ready, left = _handoff_ready(o, rec, holder, replacement, now)
        if not ready:
            why = "a standby replacement"
            if left != POLL_SECONDS:
                why += f" or the handoff deadline in {left:.0f} s"
            return [_wait(f"node {holder.instance_id} keeps serving until {why}", min(POLL_SECONDS, left))]
        deadline = o.config.drain_timeout_seconds
        reason = f"hand the data volume over from {holder.instance_id}"
        if replacement is None:
            reason += " (handoff deadline reached before a replacement)"
        return [Action("drain", reason, holder.instance_id, {"deadline": deadline})]
    drain = o.drain
    if drain is None or not (drain.done or drain.failed):
        status = drain.status if drain else "unknown"
        return [_wait(f"the drain on {holder.instance_id} is {status}", FAST_POLL_SECONDS)]
    if drain.done:
        actions = []
        if holder.phase != "drained":
            actions.append(Action("tag", "the drain succeeded", holder.instance_id, {"phase": "drained"}))
        actions.append(
            Action(
                "detach",
                f"{holder.instance_id} is drained and the volume is unmounted",
                holder.instance_id,
                {"volume": o.volume.volume_id, "force": False},
            )
        )
        return actions
    # The drain failed on a running node: it may still have the volume mounted, so never force. A
    # plain detach is safe all the same: AWS keeps a mounted volume busy until it is unmounted or
    # the instance goes away, and completes at once when the agent got as far as unmounting.
    actions = []
    if not rec.stuck_reported:
        reason = f"the drain on {holder.instance_id} ended {drain.status}: {drain.detail or 'no detail'}"
        actions.append(Action("report", reason, holder.instance_id, {"happening": "drain-failed"}))
    if rec.detach_at is None:
        reason = f"the drain on {holder.instance_id} failed; a plain detach completes only if it unmounted"
        actions.append(
            Action("detach", reason, holder.instance_id, {"volume": o.volume.volume_id, "force": False})
        )
    warned_at = holder.interruption or (
        rec.interruption_at if rec.old_instance_id == holder.instance_id else None
    )
    if warned_at is not None and (now - warned_at).total_seconds() < WARNED_OVERDUE_SECONDS:
        actions.append(_wait(f"waiting for the spot termination of {holder.instance_id} before detaching"))
    elif warned_at is not None:
        reason = f"{holder.instance_id} is still running long after its spot warning and its drain failed"
        actions.append(Action("terminate", reason, holder.instance_id))
    else:
        reason = f"the drain failed on {holder.instance_id}; stop it so the volume is released safely"
        actions.append(Action("terminate", reason, holder.instance_id))
    return actions


def _dead_holder(
    o: Observed, rec: Recovery, holder: Node, attachment_state: str, now: datetime
) -> list[Action]:
    volume_id = o.volume.volume_id
    if holder.state == "stopped" and attachment_state == "attached":
        return [
            Action(
                "detach",
                f"{holder.instance_id} is stopped",
                holder.instance_id,
                {"volume": volume_id, "force": False},
            )
        ]
    if rec.detach_at is not None and (now - rec.detach_at).total_seconds() < STUCK_DETACH_SECONDS:
        # A detach we asked for gets time to finish; asking again would only restart it.
        return [_wait(f"the data volume is {attachment_state} from {holder.instance_id}", FAST_POLL_SECONDS)]
    since = (now - rec.opened_at).total_seconds()
    if holder.gone and since >= STUCK_DETACH_SECONDS:
        reason = f"{holder.instance_id} is {holder.state} and the volume is still {attachment_state} after {since:.0f} s"
        return [Action("detach", reason, holder.instance_id, {"volume": volume_id, "force": True})]
    return [_wait(f"waiting for {holder.instance_id} ({holder.state}) to release the volume")]


def _update(rec: Recovery, step: str, reason: str, **fields: object) -> Action:
    return Action("update-recovery", reason, None, {"step": step, **fields})


# ---------------------------------------------------------------- health streak (pure)


def next_health(
    health: HealthRecord, probe: Probe, now: datetime, threshold: int
) -> tuple[HealthRecord, list[tuple[str, str]]]:
    """Fold one probe into the streak; returns the new record and (happening kind, message) pairs."""
    notes: list[tuple[str, str]] = []
    same = health.instance_id == probe.instance_id
    if probe.ok:
        if same and health.failures and health.restarted_at is not None:
            notes.append(("remediated", f"Forgejo on {probe.instance_id} is healthy again after a restart"))
        record = HealthRecord(
            failures=0,
            instance_id=probe.instance_id,
            last_status=probe.status,
            last_at=now,
            cert_warned_at=health.cert_warned_at,
        )
    else:
        failures = health.failures + 1 if same else 1
        if failures == threshold:
            notes.append(
                (
                    "health-failed",
                    f"Forgejo on {probe.instance_id} failed {failures} health checks: {probe.detail}",
                )
            )
        record = HealthRecord(
            failures=failures,
            instance_id=probe.instance_id,
            last_status=probe.status,
            last_at=now,
            restarted_at=health.restarted_at if same else None,
            cert_warned_at=health.cert_warned_at,
        )
    days = probe.cert_days_left
    if days is not None and days < CERT_WARN_DAYS:
        last = health.cert_warned_at
        if last is None or now - last >= timedelta(days=1):
            notes.append(("certificate-expiring", f"The TLS certificate expires in {days:.1f} days"))
            record = replace(record, cert_warned_at=now)
    return record, notes
