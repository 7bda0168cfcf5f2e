"""Turn raw Lambda events into small typed values, or an `Ignored` with a reason.

Plain dicts rather than Powertools event data classes: those wrappers raise `KeyError` on a missing
field, and every field here has to be checked anyway because EventBridge delivers every spot warning
in the region, at least once, in any order. Powertools Parser (pydantic) is avoided on purpose: it
adds about 330 ms to a cold start (research row 1g). Nothing in this module raises on bad input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# The EC2 User Guide documents the warning as arriving two minutes before the action.
SPOT_WARNING_LEAD = timedelta(minutes=2)

SOURCE_EC2 = "aws.ec2"
SOURCE_NODE = "spotforge.node"
SOURCE_SCHEDULE = "aws.events"

DETAIL_INTERRUPTION = "EC2 Spot Instance Interruption Warning"
DETAIL_REBALANCE = "EC2 Instance Rebalance Recommendation"
DETAIL_STATE_CHANGE = "EC2 Instance State-change Notification"
DETAIL_NODE_SIGNAL = "Spot Interruption Signal"
DETAIL_SCHEDULED = "Scheduled Event"

INSTANCE_ACTIONS = frozenset({"terminate", "stop", "hibernate"})
INSTANCE_STATES = frozenset({"pending", "running", "stopping", "stopped", "shutting-down", "terminated"})
CUSTOM_RESOURCE_REQUESTS = frozenset({"Create", "Update", "Delete"})

_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,32}$")


@dataclass(frozen=True)
class Ignored:
    """The event is not one we act on; `reason` is one sentence for the info log."""

    reason: str
    event_id: str | None = None
    kind: str = "ignored"


@dataclass(frozen=True)
class SpotInterruption:
    """A two-minute warning, from AWS (`origin="aws"`) or from our node agent (`origin="node"`)."""

    event_id: str | None
    instance_id: str
    action: str
    warned_at: datetime | None
    action_at: datetime | None
    origin: str
    kind: str = "interruption"

    def trigger_detail(self) -> dict[str, str]:
        detail = {"instance-action": self.action, "origin": self.origin}
        if self.warned_at is not None:
            detail["time"] = _iso(self.warned_at)
        if self.action_at is not None:
            detail["action-time"] = _iso(self.action_at)
        return detail


@dataclass(frozen=True)
class RebalanceRecommendation:
    event_id: str | None
    instance_id: str
    at: datetime | None
    kind: str = "rebalance"

    def trigger_detail(self) -> dict[str, str]:
        return {"time": _iso(self.at)} if self.at is not None else {}


@dataclass(frozen=True)
class StateChange:
    event_id: str | None
    instance_id: str
    state: str
    at: datetime | None
    kind: str = "state-change"

    def trigger_detail(self) -> dict[str, str]:
        detail = {"state": self.state}
        if self.at is not None:
            detail["time"] = _iso(self.at)
        return detail


@dataclass(frozen=True)
class Scheduled:
    event_id: str | None
    at: datetime | None
    rule_arn: str | None
    kind: str = "schedule"

    def trigger_detail(self) -> dict[str, str]:
        detail: dict[str, str] = {}
        if self.at is not None:
            detail["time"] = _iso(self.at)
        if self.rule_arn:
            detail["rule"] = self.rule_arn
        return detail


@dataclass(frozen=True)
class CustomResourceRequest:
    """A CloudFormation custom resource request as the CDK Provider framework hands it to `onEvent`."""

    request_type: str
    request_id: str | None
    stack_id: str | None
    logical_resource_id: str | None
    physical_resource_id: str | None
    properties: Mapping[str, Any] = field(default_factory=dict)
    old_properties: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "custom-resource"


EventBridgeEvent = SpotInterruption | RebalanceRecommendation | StateChange | Scheduled
Parsed = EventBridgeEvent | Ignored


def parse_event(event: object) -> Parsed:
    """Classify an EventBridge event. Unknown, malformed or incomplete events become `Ignored`."""
    if not isinstance(event, Mapping):
        return Ignored(f"event is a {type(event).__name__}, not a JSON object")
    event_id = _opt_str(event.get("id"))
    source = event.get("source")
    detail_type = event.get("detail-type")
    if not isinstance(source, str) or not isinstance(detail_type, str):
        return Ignored("event has no source or detail-type", event_id)
    at = _parse_time(event.get("time"))

    if source == SOURCE_SCHEDULE and detail_type == DETAIL_SCHEDULED:
        resources = event.get("resources")
        rule = resources[0] if isinstance(resources, list) and resources else None
        return Scheduled(event_id, at, rule if isinstance(rule, str) else None)

    handled = {
        (SOURCE_EC2, DETAIL_INTERRUPTION),
        (SOURCE_NODE, DETAIL_NODE_SIGNAL),
        (SOURCE_EC2, DETAIL_REBALANCE),
        (SOURCE_EC2, DETAIL_STATE_CHANGE),
    }
    if (source, detail_type) not in handled:
        return Ignored(f"unknown event {source!r} / {detail_type!r}", event_id)

    detail = event.get("detail")
    if not isinstance(detail, Mapping):
        return Ignored(f"{detail_type} has no detail object", event_id)
    instance_id = detail.get("instance-id")
    if not isinstance(instance_id, str) or not _INSTANCE_ID.match(instance_id):
        return Ignored(f"{detail_type} has no valid detail.instance-id", event_id)

    if detail_type == DETAIL_REBALANCE:
        return RebalanceRecommendation(event_id, instance_id, at)

    if detail_type == DETAIL_STATE_CHANGE:
        # The documented sample has no `version`; nothing here looks at it.
        state = detail.get("state")
        if state not in INSTANCE_STATES:
            return Ignored(f"state-change for {instance_id} has unknown state {state!r}", event_id)
        return StateChange(event_id, instance_id, str(state), at)

    action = detail.get("instance-action")
    if action not in INSTANCE_ACTIONS:
        return Ignored(f"interruption for {instance_id} has unknown instance-action {action!r}", event_id)
    if source == SOURCE_EC2:
        # AWS stamps the envelope when it issues the warning; the action follows two minutes later.
        action_at = at + SPOT_WARNING_LEAD if at is not None else None
        return SpotInterruption(event_id, instance_id, str(action), at, action_at, "aws")
    # The agent copies IMDS `spot/instance-action`, whose `time` is when the action happens; the
    # warning was issued two minutes before that, which can be earlier than the envelope time.
    action_at = _parse_time(detail.get("time"))
    warned_at = action_at - SPOT_WARNING_LEAD if action_at is not None else at
    if warned_at is not None and at is not None:
        warned_at = min(warned_at, at)
    return SpotInterruption(event_id, instance_id, str(action), warned_at, action_at, "node")


def parse_custom_resource(event: object) -> CustomResourceRequest | Ignored:
    """Read a CloudFormation custom resource request (Provider framework `onEvent` shape)."""
    if not isinstance(event, Mapping):
        return Ignored(f"custom resource event is a {type(event).__name__}, not a JSON object")
    request_id = _opt_str(event.get("RequestId"))
    request_type = event.get("RequestType")
    if request_type not in CUSTOM_RESOURCE_REQUESTS:
        reason = f"custom resource RequestType {request_type!r} is not Create/Update/Delete"
        return Ignored(reason, request_id)
    properties = event.get("ResourceProperties")
    old_properties = event.get("OldResourceProperties")
    return CustomResourceRequest(
        request_type=str(request_type),
        request_id=request_id,
        stack_id=_opt_str(event.get("StackId")),
        logical_resource_id=_opt_str(event.get("LogicalResourceId")),
        physical_resource_id=_opt_str(event.get("PhysicalResourceId")),
        properties=dict(properties) if isinstance(properties, Mapping) else {},
        old_properties=dict(old_properties) if isinstance(old_properties, Mapping) else {},
    )


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    # EventBridge times are UTC; a naive string is read as UTC rather than local time.
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
