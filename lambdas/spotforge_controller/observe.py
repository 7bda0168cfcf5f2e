"""Read the world fresh: instances, volume, EIP, launch template, DynamoDB records, drain, health.

Only reads happen here. Every call goes through errors.aws_call so throttling waits on the
injected clock and a missing permission names itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from .errors import aws_call, error_code
from .model import (
    TAG_INTERRUPTION,
    TAG_LAUNCH_TOKEN,
    TAG_LT_VERSION,
    TAG_PHASE,
    TAG_ROLE,
    TAG_STACK,
    Address,
    Attachment,
    DrainStatus,
    HealthRecord,
    Node,
    Observed,
    Probe,
    Recovery,
    Volume,
    health_from_doc,
    parse_time,
    recovery_from_doc,
)
from .runtime import Runtime

PROBE_TIMEOUT_SECONDS = 5.0
_PROBE_STATUSES = frozenset({"pass", "warn", "fail"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def observe(runtime: Runtime, *, probe: bool = True) -> Observed:
    config = runtime.config
    nodes = read_nodes(runtime)
    volume = read_volume(runtime)
    address = read_address(runtime)
    latest = read_latest_lt_version(runtime)
    recovery = read_recovery(runtime)
    health = read_health(runtime)
    drain = None
    if recovery is not None and recovery.open and recovery.drain_command_id and recovery.drain_instance_id:
        drain = read_drain(runtime, recovery.drain_command_id, recovery.drain_instance_id)
    result = None
    if probe:
        target = next(
            (n for n in nodes if n.instance_id == address.instance_id and n.state == "running"), None
        )
        if target is not None:
            result = probe_health(runtime, address, target.instance_id)
    return Observed(
        config=config,
        nodes=nodes,
        volume=volume,
        address=address,
        latest_lt_version=latest,
        recovery=recovery,
        health=health,
        probe=result,
        drain=drain,
    )


def _tags(raw: list[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in raw or ()}


def node_from_instance(instance: Mapping[str, Any]) -> Node:
    tags = _tags(instance.get("Tags"))
    version = tags.get(TAG_LT_VERSION, "")
    launch_time = instance.get("LaunchTime")
    if isinstance(launch_time, str):
        launch_time = parse_time(launch_time)
    return Node(
        instance_id=instance["InstanceId"],
        state=instance.get("State", {}).get("Name", "unknown"),
        az=instance.get("Placement", {}).get("AvailabilityZone", ""),
        launch_time=launch_time if isinstance(launch_time, datetime) else _EPOCH,
        state_reason=(instance.get("StateReason") or {}).get("Code"),
        instance_type=instance.get("InstanceType", ""),
        lifecycle="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        phase=tags.get(TAG_PHASE) or None,
        interruption=_safe_time(tags.get(TAG_INTERRUPTION)),
        lt_version=int(version) if version.isdigit() else None,
        launch_token=tags.get(TAG_LAUNCH_TOKEN) or None,
    )


def _safe_time(value: str | None) -> datetime | None:
    try:
        return parse_time(value)
    except ValueError:
        # A malformed tag (someone typed it by hand) still means "warned"; the exact time is lost.
        return _EPOCH if value else None


def read_nodes(runtime: Runtime) -> tuple[Node, ...]:
    stack = runtime.config.stack_name
    filters = [
        {"Name": f"tag:{TAG_STACK}", "Values": [stack]},
        {"Name": f"tag:{TAG_ROLE}", "Values": ["node"]},
    ]
    nodes: list[Node] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Filters": filters}
        if token:
            kwargs["NextToken"] = token
        page = aws_call(runtime.clock, "ec2:DescribeInstances", runtime.ec2.describe_instances, **kwargs)
        for reservation in page.get("Reservations", []):
            nodes.extend(node_from_instance(i) for i in reservation.get("Instances", []))
        token = page.get("NextToken")
        if not token:
            break
    nodes.sort(key=lambda n: (n.launch_time, n.instance_id))
    return tuple(nodes)


def read_volume(runtime: Runtime) -> Volume:
    volume_id = runtime.config.data_volume_id
    page = aws_call(runtime.clock, "ec2:DescribeVolumes", runtime.ec2.describe_volumes, VolumeIds=[volume_id])
    raw = page["Volumes"][0]
    attachments = tuple(
        Attachment(instance_id=a["InstanceId"], state=a.get("State", "attached"), device=a.get("Device", ""))
        for a in raw.get("Attachments", [])
    )
    return Volume(
        volume_id=volume_id, state=raw.get("State", ""), az=raw["AvailabilityZone"], attachments=attachments
    )


def read_address(runtime: Runtime) -> Address:
    allocation = runtime.config.eip_allocation_id
    page = aws_call(
        runtime.clock, "ec2:DescribeAddresses", runtime.ec2.describe_addresses, AllocationIds=[allocation]
    )
    raw = page["Addresses"][0]
    return Address(
        allocation_id=allocation,
        public_ip=raw.get("PublicIp", ""),
        instance_id=raw.get("InstanceId") or None,
        association_id=raw.get("AssociationId") or None,
        network_interface_id=raw.get("NetworkInterfaceId") or None,
    )


def read_latest_lt_version(runtime: Runtime) -> int:
    page = aws_call(
        runtime.clock,
        "ec2:DescribeLaunchTemplates",
        runtime.ec2.describe_launch_templates,
        LaunchTemplateIds=[runtime.config.launch_template_id],
    )
    return int(page["LaunchTemplates"][0]["LatestVersionNumber"])


def _get_doc(runtime: Runtime, key: str) -> dict[str, Any] | None:
    item = aws_call(
        runtime.clock,
        "dynamodb:GetItem",
        runtime.dynamodb.get_item,
        TableName=runtime.config.state_table,
        Key={"pk": {"S": key}},
        ConsistentRead=True,
    ).get("Item")
    if not item or "doc" not in item:
        return None
    doc = json.loads(item["doc"]["S"])
    return doc if isinstance(doc, dict) else None


def read_recovery(runtime: Runtime) -> Recovery | None:
    doc = _get_doc(runtime, "recovery")
    return recovery_from_doc(doc) if doc is not None else None


def read_health(runtime: Runtime) -> HealthRecord:
    doc = _get_doc(runtime, "health")
    return health_from_doc(doc) if doc is not None else HealthRecord()


def read_drain(runtime: Runtime, command_id: str, instance_id: str) -> DrainStatus:
    try:
        invocation = aws_call(
            runtime.clock,
            "ssm:GetCommandInvocation",
            runtime.ssm.get_command_invocation,
            CommandId=command_id,
            InstanceId=instance_id,
        )
    except ClientError as exc:
        # Right after SendCommand the invocation may not be registered yet.
        if error_code(exc) == "InvocationDoesNotExist":
            return DrainStatus(command_id=command_id, instance_id=instance_id, status="Pending")
        raise
    detail = (invocation.get("StandardErrorContent") or invocation.get("StatusDetails") or "").strip()
    return DrainStatus(
        command_id=command_id,
        instance_id=instance_id,
        status=str(invocation.get("Status", "Pending")),
        detail=detail.splitlines()[-1] if detail else "",
    )


# ---------------------------------------------------------------- health probe


def health_url(runtime: Runtime, address: Address) -> str:
    """Always the node behind the Elastic IP: a DNS record not created yet, or a certificate not
    issued yet, must not look like a sick Forgejo (that would replace healthy nodes in a loop)."""
    scheme = "https" if runtime.config.domain else "http"
    return f"{scheme}://{address.public_ip}/api/healthz"


def parse_healthz(http_status: int, body: bytes) -> tuple[str, dict[str, str], str]:
    """Read Forgejo's /api/healthz answer: (status, {check: status}, detail).

    HTTP 200 alone is not health: the JSON must say pass or warn, and no check may have failed.
    """
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "invalid", {}, f"HTTP {http_status} with a body that is not JSON"
    if not isinstance(doc, dict) or doc.get("status") not in _PROBE_STATUSES:
        return "invalid", {}, f"HTTP {http_status} without a pass/warn/fail status"
    status = str(doc["status"])
    checks: dict[str, str] = {}
    raw_checks = doc.get("checks") or {}
    if isinstance(raw_checks, dict):
        for name, results in raw_checks.items():
            entries = results if isinstance(results, list) else [results]
            statuses = [e.get("status") for e in entries if isinstance(e, dict)]
            if "fail" in statuses:
                checks[name] = "fail"
            elif "warn" in statuses:
                checks[name] = "warn"
            elif statuses:
                checks[name] = str(statuses[0])
    failed = sorted(name for name, value in checks.items() if value == "fail")
    if failed and status != "fail":
        status = "fail"
    if status != "fail" and http_status != 200:
        return "fail", checks, f"HTTP {http_status} although the body says {doc['status']}"
    if status == "fail":
        detail = f"failed checks: {', '.join(failed)}" if failed else f"HTTP {http_status}, status fail"
        return status, checks, detail
    return status, checks, ""


def probe_health(runtime: Runtime, address: Address, instance_id: str | None) -> Probe:
    url = health_url(runtime, address)
    try:
        if runtime.config.domain:
            response = runtime.http_get(url, PROBE_TIMEOUT_SECONDS, host=runtime.config.domain)
        else:
            response = runtime.http_get(url, PROBE_TIMEOUT_SECONDS)
    except OSError as exc:
        return Probe(
            url=url, status="unreachable", instance_id=instance_id, detail=str(exc) or type(exc).__name__
        )
    status, checks, detail = parse_healthz(response.status, response.body)
    days = None
    if runtime.config.domain:
        days = certificate_days_left(runtime, runtime.config.domain)
    return Probe(
        url=url,
        status=status,
        instance_id=instance_id,
        http_status=response.status,
        checks=checks,
        detail=detail,
        cert_days_left=days,
    )


def certificate_days_left(runtime: Runtime, hostname: str) -> float | None:
    try:
        expires = runtime.cert_expiry(hostname, PROBE_TIMEOUT_SECONDS)
    except (OSError, ValueError):
        return None
    return round((expires - runtime.clock.now()).total_seconds() / 86400.0, 2)
