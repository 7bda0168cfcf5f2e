"""Carry out one decided Action against AWS, and report what it did (and what is worth telling).

Writes to the `recovery` record are conditional on its id, so a controller that lost the lease
mid-step cannot scribble over a newer recovery.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from .decide import recovery_id
from .errors import CapacityError, ConflictError, aws_call, error_code
from .model import (
    AGENT,
    TAG_INTERRUPTION,
    TAG_LAUNCH_TOKEN,
    TAG_LT_VERSION,
    TAG_PHASE,
    TAG_ROLE,
    TAG_STACK,
    Action,
    ExecutedAction,
    Happening,
    HealthRecord,
    Observed,
    Recovery,
    health_to_doc,
    parse_time,
    recovery_to_doc,
)
from .runtime import Runtime

TAG_REBALANCE_OF = "spotforge:rebalance-of"
REBALANCE_SNAPSHOTS_KEPT = 3
_OPEN_HAPPENING = {
    "spot-interruption": "interruption-started",
    "spot-reclaim": "node-lost",
    "instance-lost": "node-lost",
    "no-node": "node-missing",
    "resume": "node-lost",
    "health": "health-failed",
    "planned": "replacement-planned",
    "rebalance": "replacement-planned",
}
_CAUSE_TEXT = {
    "spot-interruption": "a spot interruption warning",
    "spot-reclaim": "a spot reclaim without warning",
    "instance-lost": "the node stopping or terminating (not a spot reclaim: a user or AWS action)",
    "no-node": "no node serving",
    "resume": "an unfinished handoff",
    "health": "repeated failed health checks",
    "planned": "a new launch template version",
    "rebalance": "a rebalance recommendation",
}


def execute(runtime: Runtime, observed: Observed, action: Action) -> tuple[ExecutedAction, list[Happening]]:
    """Run one action. Capacity shortfalls and state conflicts are outcomes, not exceptions."""
    now = runtime.clock.now()
    handler = _HANDLERS[action.kind]
    try:
        detail, happenings = handler(runtime, observed, action, now)
    except CapacityError as exc:
        _record_capacity_failure(runtime, observed, action, now, exc)
        return ExecutedAction(action, "capacity", str(exc), now), []
    except ConflictError as exc:
        return ExecutedAction(action, "conflict", str(exc), now), []
    return ExecutedAction(action, "done", detail, now), happenings


# ---------------------------------------------------------------- recovery record


def _put_doc(runtime: Runtime, key: str, doc: dict[str, object], **condition: Any) -> None:
    item = {"pk": {"S": key}, "doc": {"S": json.dumps(doc, sort_keys=True)}}
    if key == "recovery":
        item["id"] = {"S": str(doc["id"])}
        item["status"] = {"S": str(doc["status"])}
    aws_call(
        runtime.clock,
        "dynamodb:PutItem",
        runtime.dynamodb.put_item,
        TableName=runtime.config.state_table,
        Item=item,
        **condition,
    )


def save_recovery(runtime: Runtime, rec: Recovery, *, expect_id: str | None) -> None:
    """Write the record; when expect_id is None only over nothing or a closed record."""
    if expect_id is None:
        condition = {
            "ConditionExpression": "attribute_not_exists(pk) OR #s = :closed",
            "ExpressionAttributeNames": {"#s": "status"},
            "ExpressionAttributeValues": {":closed": {"S": "closed"}},
        }
    else:
        condition = {
            "ConditionExpression": "#i = :id",
            "ExpressionAttributeNames": {"#i": "id"},
            "ExpressionAttributeValues": {":id": {"S": expect_id}},
        }
    _put_doc(runtime, "recovery", recovery_to_doc(rec), **condition)


def write_health(runtime: Runtime, health: HealthRecord) -> None:
    _put_doc(runtime, "health", health_to_doc(health))


def _step(rec: Recovery, now: datetime, step: str) -> tuple[tuple[str, str], ...]:
    return (*rec.timeline, (now.isoformat(), step))


def _open_record(observed: Observed) -> Recovery:
    rec = observed.recovery
    if rec is None or not rec.open:
        raise ConflictError("NoOpenRecovery", "the recovery record is not open any more")
    return rec


def _update_record(runtime: Runtime, rec: Recovery, now: datetime, step: str, **fields: Any) -> Recovery:
    updated = replace(rec, timeline=_step(rec, now, step), **fields)
    save_recovery(runtime, updated, expect_id=rec.id)
    return updated


def _open_recovery(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    cause = str(action.params["cause"])
    old = action.params.get("old")
    old_id = str(old) if old else None
    rid = recovery_id(cause, old_id, now)
    previous = observed.recovery
    # Reusing an id would reuse its client tokens, and EC2 would hand back the old launch.
    attempt = previous.attempt + 1 if previous is not None and previous.id == rid else 1
    interruption_at = parse_time(action.params.get("interruption_at"))
    warned = cause == "spot-interruption" and interruption_at is not None
    rec = Recovery(
        id=rid,
        status="open",
        cause=cause,
        opened_at=now,
        old_instance_id=old_id,
        interruption_at=interruption_at,
        attempt=attempt,
        # Unwarned losses are already down; warned and planned ones go down when the drain starts.
        downtime_started_at=None if warned or cause in ("planned", "rebalance", "health") else now,
        timeline=((now.isoformat(), f"recovery opened: {action.reason}"),),
    )
    if interruption_at is not None:
        rec = replace(
            rec, timeline=((interruption_at.isoformat(), "spot interruption warning"), *rec.timeline)
        )
    try:
        save_recovery(runtime, rec, expect_id=None)
    except ClientError as exc:  # pragma: no cover - aws_call maps the condition failure to ConflictError
        raise ConflictError(error_code(exc), str(exc)) from exc
    kind = _OPEN_HAPPENING.get(cause, "node-lost")
    what = f"node {old_id}" if old_id else "the service"
    message = f"Replacing {what} because of {_CAUSE_TEXT.get(cause, cause)}."
    data = {"cause": cause, "instance_id": old_id, "recovery_id": rid, "reason": action.reason}
    return rid, [Happening(kind, now, message, data)]


def _update_recovery(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    rec = _open_record(observed)
    fields = {k: v for k, v in action.params.items() if k != "step"}
    if "tried" in fields:
        fields["tried"] = tuple(fields["tried"])  # type: ignore[arg-type]
    _update_record(runtime, rec, now, str(action.params.get("step", "update")), **fields)
    return action.reason, []


def _report(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    kind = str(action.params.get("happening", "recovery-stuck"))
    rec = observed.recovery
    if rec is not None and rec.open:
        if kind == "capacity-unavailable":
            _update_record(runtime, rec, now, "capacity unavailable", capacity_exhausted_at=now)
        else:
            _update_record(runtime, rec, now, kind, stuck_reported=True, drain_result=kind)
    data: dict[str, object] = {"instance_id": action.instance_id}
    if rec is not None:
        data.update(cause=rec.cause, recovery_id=rec.id, tried=list(rec.tried))
    return action.reason, [Happening(kind, now, _sentence(action.reason), data)]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# ---------------------------------------------------------------- EC2 and SSM steps


def _launch(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    rec = _open_record(observed)
    config = runtime.config
    p = action.params
    token = str(p["token"])
    tags = [
        {"Key": TAG_STACK, "Value": config.stack_name},
        {"Key": TAG_ROLE, "Value": "node"},
        {"Key": TAG_PHASE, "Value": "booting"},
        {"Key": TAG_LT_VERSION, "Value": str(p["lt_version"])},
        {"Key": TAG_LAUNCH_TOKEN, "Value": token},
    ]
    request: dict[str, Any] = {
        # Spot comes from the spot template's own market options (the emulator checks they are honoured).
        "LaunchTemplate": {
            "LaunchTemplateId": config.template_for(str(p["market"])),
            "Version": str(p["lt_version"]),
        },
        "MinCount": 1,
        "MaxCount": 1,
        "ClientToken": token,
        "InstanceType": str(p["instance_type"]),
        "SubnetId": str(p["subnet"]),
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": [{"Key": TAG_STACK, "Value": config.stack_name}]},
        ],
    }
    reply = aws_call(runtime.clock, "ec2:RunInstances", runtime.ec2.run_instances, **request)
    instance_id = reply["Instances"][0]["InstanceId"]
    _update_record(runtime, rec, now, f"launched {instance_id} ({p['choice']})", replacement_id=instance_id)
    data = {"instance_id": instance_id, "choice": p["choice"], "cause": rec.cause, "recovery_id": rec.id}
    message = f"Launched replacement node {instance_id} ({p['market']} {p['instance_type']} in {p['az']})."
    return instance_id, [Happening("replacement-launched", now, message, data)]


def _record_capacity_failure(
    runtime: Runtime, observed: Observed, action: Action, now: datetime, exc: CapacityError
) -> None:
    rec = observed.recovery
    if action.kind != "launch" or rec is None:
        return
    choice = str(action.params["choice"])
    tried = rec.tried if choice in rec.tried else (*rec.tried, choice)
    _update_record(runtime, rec, now, f"no capacity for {choice} ({exc.code})", tried=tried)


def _tag(runtime: Runtime, observed: Observed, action: Action, now: datetime) -> tuple[str, list[Happening]]:
    assert action.instance_id is not None
    tags = [{"Key": TAG_PHASE, "Value": str(action.params["phase"])}]
    aws_call(
        runtime.clock, "ec2:CreateTags", runtime.ec2.create_tags, Resources=[action.instance_id], Tags=tags
    )
    return f"phase={action.params['phase']}", []


def run_agent(runtime: Runtime, instance_id: str, arguments: str, execution_timeout: int) -> str:
    """Send `spotforge-agent <arguments>` through SSM Run Command; returns the command id."""
    reply = aws_call(
        runtime.clock,
        "ssm:SendCommand",
        runtime.ssm.send_command,
        InstanceIds=[instance_id],
        DocumentName="AWS-RunShellScript",
        Comment=f"spotforge {arguments.split()[0]}",
        # SSM's minimum delivery timeout is 30 s; a drain that has not started by then is moot.
        TimeoutSeconds=max(30, execution_timeout),
        Parameters={"commands": [f"{AGENT} {arguments}"], "executionTimeout": [str(execution_timeout)]},
    )
    return str(reply["Command"]["CommandId"])


def _drain(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    rec = _open_record(observed)
    assert action.instance_id is not None
    deadline = int(action.params["deadline"])  # type: ignore[call-overload]
    aws_call(
        runtime.clock,
        "ec2:CreateTags",
        runtime.ec2.create_tags,
        Resources=[action.instance_id],
        Tags=[{"Key": TAG_PHASE, "Value": "draining"}],
    )
    command_id = run_agent(runtime, action.instance_id, f"drain --deadline {deadline}", deadline + 15)
    _update_record(
        runtime,
        rec,
        now,
        f"drain started on {action.instance_id}",
        drain_instance_id=action.instance_id,
        drain_command_id=command_id,
        drain_started_at=now,
        downtime_started_at=rec.downtime_started_at or now,
    )
    message = f"Draining node {action.instance_id} to hand the data volume over."
    return command_id, [Happening("drain-started", now, message, {"instance_id": action.instance_id})]


def _detach(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    force = bool(action.params.get("force", False))
    assert action.instance_id is not None
    # Invariant 1 enforced at the last moment too: never force the volume off a live instance.
    if force and any(n.instance_id == action.instance_id and n.alive for n in observed.nodes):
        raise ConflictError("RefusedForceDetach", f"{action.instance_id} is alive; refusing to force-detach")
    aws_call(
        runtime.clock,
        "ec2:DetachVolume",
        runtime.ec2.detach_volume,
        VolumeId=str(action.params["volume"]),
        InstanceId=action.instance_id,
        Force=force,
    )
    rec = observed.recovery
    if rec is not None and rec.open:
        step = f"detach from {action.instance_id}{' (forced)' if force else ''}"
        _update_record(runtime, rec, now, step, detach_at=now)
    return "force" if force else "clean", []


def _attach(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    assert action.instance_id is not None
    aws_call(
        runtime.clock,
        "ec2:AttachVolume",
        runtime.ec2.attach_volume,
        VolumeId=str(action.params["volume"]),
        InstanceId=action.instance_id,
        Device=str(action.params["device"]),
    )
    _timeline(runtime, observed, now, f"attach to {action.instance_id}")
    message = f"Moved the data volume to node {action.instance_id}."
    return action.instance_id, [Happening("handoff-done", now, message, {"instance_id": action.instance_id})]


def _associate(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    assert action.instance_id is not None
    reply = aws_call(
        runtime.clock,
        "ec2:AssociateAddress",
        runtime.ec2.associate_address,
        AllocationId=str(action.params["allocation"]),
        InstanceId=action.instance_id,
        AllowReassociation=True,
    )
    recovering = observed.recovery is not None and observed.recovery.open
    _timeline(runtime, observed, now, f"Elastic IP to {action.instance_id}")
    if recovering:
        return str(reply.get("AssociationId", "")), []
    message = f"The Elastic IP was not on the serving node; moved it to {action.instance_id}."
    data = {"instance_id": action.instance_id, "previous": observed.address.instance_id}
    return str(reply.get("AssociationId", "")), [Happening("eip-reassociated", now, message, data)]


def _terminate(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    assert action.instance_id is not None
    aws_call(
        runtime.clock,
        "ec2:TerminateInstances",
        runtime.ec2.terminate_instances,
        InstanceIds=[action.instance_id],
    )
    _timeline(runtime, observed, now, f"terminate {action.instance_id}")
    return action.instance_id, []


def _restart(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    assert action.instance_id is not None
    command_id = run_agent(runtime, action.instance_id, "restart", 120)
    write_health(runtime, replace(observed.health, restarted_at=now))
    message = f"Restarting Forgejo on node {action.instance_id} after failed health checks."
    return command_id, [Happening("restart-sent", now, message, {"instance_id": action.instance_id})]


def _close(
    runtime: Runtime, observed: Observed, action: Action, now: datetime
) -> tuple[str, list[Happening]]:
    rec = _open_record(observed)
    p = action.params
    serving = str(p["serving"])
    downtime = float(p["downtime_seconds"])  # type: ignore[arg-type]
    total = float(p["total_seconds"])  # type: ignore[arg-type]
    closed = _update_record(
        runtime,
        rec,
        now,
        f"{serving} healthy; recovery complete",
        status="closed",
        closed_at=now,
        downtime_seconds=downtime,
    )
    write_health(runtime, HealthRecord(failures=0, instance_id=serving, last_status="pass", last_at=now))
    data = {
        "cause": rec.cause,
        "cause_text": _CAUSE_TEXT.get(rec.cause, rec.cause),
        "recovery_id": rec.id,
        "instance_id": serving,
        "old_instance_id": rec.old_instance_id,
        "downtime_seconds": downtime,
        "total_seconds": total,
        "attempt": rec.attempt,
        "tried": list(rec.tried),
        "timeline": [list(step) for step in closed.timeline],
    }
    message = (
        f"Recovered from {_CAUSE_TEXT.get(rec.cause, rec.cause)}: node {serving} serves,"
        f" downtime {downtime:.1f} s."
    )
    return rec.id, [Happening("recovery-complete", now, message, data)]


def _timeline(runtime: Runtime, observed: Observed, now: datetime, step: str) -> None:
    rec = observed.recovery
    if rec is not None and rec.open:
        _update_record(runtime, rec, now, step)


_HANDLERS = {
    "open-recovery": _open_recovery,
    "update-recovery": _update_recovery,
    "report": _report,
    "launch": _launch,
    "tag": _tag,
    "drain": _drain,
    "detach": _detach,
    "attach": _attach,
    "associate-address": _associate,
    "terminate": _terminate,
    "restart": _restart,
    "close-recovery": _close,
}


# ---------------------------------------------------------------- entry points outside decide


def _describe_one(runtime: Runtime, instance_id: str) -> dict[str, Any] | None:
    try:
        reply = aws_call(
            runtime.clock, "ec2:DescribeInstances", runtime.ec2.describe_instances, InstanceIds=[instance_id]
        )
    except ConflictError:
        return None  # InvalidInstanceID.NotFound: not in this account/region, so not ours
    except ClientError as exc:
        if error_code(exc).startswith("InvalidInstanceID"):
            return None
        raise
    for reservation in reply.get("Reservations", []):
        for instance in reservation.get("Instances", []):
            return dict(instance)
    return None


def is_ours(runtime: Runtime, instance: dict[str, Any]) -> bool:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    return tags.get(TAG_STACK) == runtime.config.stack_name and tags.get(TAG_ROLE) == "node"


def mark_interruption(runtime: Runtime, instance_id: str, at: datetime) -> bool:
    """Record a spot warning on our node (first writer wins). Returns False for foreign instances."""
    instance = _describe_one(runtime, instance_id)
    if instance is None or not is_ours(runtime, instance):
        return False
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    if TAG_INTERRUPTION not in tags:
        aws_call(
            runtime.clock,
            "ec2:CreateTags",
            runtime.ec2.create_tags,
            Resources=[instance_id],
            Tags=[{"Key": TAG_INTERRUPTION, "Value": at.isoformat().replace("+00:00", "Z")}],
        )
    return True


def snapshot_for_rebalance(runtime: Runtime, instance_id: str) -> Happening | None:
    """Snapshot the data volume once per rebalance recommendation on the node that holds it."""
    instance = _describe_one(runtime, instance_id)
    if instance is None or not is_ours(runtime, instance):
        return None
    config = runtime.config
    existing = aws_call(
        runtime.clock,
        "ec2:DescribeSnapshots",
        runtime.ec2.describe_snapshots,
        OwnerIds=["self"],
        Filters=[
            {"Name": "volume-id", "Values": [config.data_volume_id]},
            {"Name": f"tag:{TAG_REBALANCE_OF}", "Values": [instance_id]},
        ],
    ).get("Snapshots", [])
    if existing:
        return None
    snapshot = aws_call(
        runtime.clock,
        "ec2:CreateSnapshot",
        runtime.ec2.create_snapshot,
        VolumeId=config.data_volume_id,
        Description=f"spotforge rebalance recommendation for {instance_id}",
        TagSpecifications=[
            {
                "ResourceType": "snapshot",
                "Tags": [
                    {"Key": TAG_STACK, "Value": config.stack_name},
                    {"Key": TAG_ROLE, "Value": "data"},
                    {"Key": TAG_REBALANCE_OF, "Value": instance_id},
                ],
            }
        ],
    )
    _prune_rebalance_snapshots(runtime, keep=snapshot["SnapshotId"])
    now = runtime.clock.now()
    message = (
        f"Node {instance_id} may be interrupted soon; took snapshot {snapshot['SnapshotId']} of the data."
    )
    return Happening(
        "rebalance-snapshot",
        now,
        message,
        {"instance_id": instance_id, "snapshot_id": snapshot["SnapshotId"]},
    )


def _prune_rebalance_snapshots(runtime: Runtime, keep: str) -> None:
    """Rebalance snapshots are outside the daily DLM policy: keep only the newest few, so frequent
    recommendations do not pile up snapshot storage."""
    found = aws_call(
        runtime.clock,
        "ec2:DescribeSnapshots",
        runtime.ec2.describe_snapshots,
        OwnerIds=["self"],
        Filters=[
            {"Name": "volume-id", "Values": [runtime.config.data_volume_id]},
            {"Name": "tag-key", "Values": [TAG_REBALANCE_OF]},
            {"Name": f"tag:{TAG_STACK}", "Values": [runtime.config.stack_name]},
        ],
    ).get("Snapshots", [])
    newest_first = sorted(found, key=lambda snap: snap["StartTime"], reverse=True)
    kept = [keep] + [snap["SnapshotId"] for snap in newest_first if snap["SnapshotId"] != keep]
    for snapshot_id in kept[REBALANCE_SNAPSHOTS_KEPT:]:
        aws_call(runtime.clock, "ec2:DeleteSnapshot", runtime.ec2.delete_snapshot, SnapshotId=snapshot_id)


def teardown(runtime: Runtime, observed: Observed) -> list[ExecutedAction]:
    """For `cdk destroy`: terminate every node of the stack and close any open recovery."""
    now = runtime.clock.now()
    done: list[ExecutedAction] = []
    for node in observed.nodes:
        if node.state in ("pending", "running", "stopping", "stopped"):
            action = Action("terminate", "the stack is being destroyed", node.instance_id)
            result, _ = execute(runtime, observed, action)
            done.append(result)
    rec = observed.recovery
    if rec is not None and rec.open:
        _update_record(runtime, rec, now, "stack destroyed", status="closed", closed_at=now)
    return done
