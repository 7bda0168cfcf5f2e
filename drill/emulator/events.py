"""EventBridge events in the shapes the EC2 User Guide documents (see tests/emulator/fixtures)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

STATE_CHANGE = "EC2 Instance State-change Notification"
INTERRUPTION_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"


def iso(when: datetime) -> str:
    """AWS event and IMDS timestamps: second precision, 'Z' suffix."""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _envelope(
    detail_type: str, account: str, region: str, when: datetime, instance_id: str, detail: dict[str, Any]
) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.ec2",
        "account": account,
        "time": iso(when),
        "region": region,
        "resources": [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"],
        "detail": detail,
    }


def state_change(account: str, region: str, when: datetime, instance_id: str, state: str) -> dict[str, Any]:
    event = _envelope(
        STATE_CHANGE, account, region, when, instance_id, {"instance-id": instance_id, "state": state}
    )
    # The documented state-change sample has no "version"; keep the shape exactly so consumers
    # that wrongly require it fail here rather than in production.
    del event["version"]
    return event


def interruption_warning(
    account: str, region: str, when: datetime, instance_id: str, action: str
) -> dict[str, Any]:
    return _envelope(
        INTERRUPTION_WARNING,
        account,
        region,
        when,
        instance_id,
        {"instance-id": instance_id, "instance-action": action},
    )


def rebalance_recommendation(account: str, region: str, when: datetime, instance_id: str) -> dict[str, Any]:
    return _envelope(REBALANCE, account, region, when, instance_id, {"instance-id": instance_id})
