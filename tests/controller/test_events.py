"""events.parse_event / parse_custom_resource on the documented samples and on bad input."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotforge_controller import events
from spotforge_controller.events import (
    CustomResourceRequest,
    Ignored,
    RebalanceRecommendation,
    Scheduled,
    SpotInterruption,
    StateChange,
    parse_custom_resource,
    parse_event,
)

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def node_signal(**detail: Any) -> dict[str, Any]:
    body = {
        "instance-id": "i-0123456789abcdef0",
        "instance-action": "terminate",
        "time": "2026-11-20T08:22:00Z",
    }
    body.update(detail)
    return {
        "version": "0",
        "id": "node-evt-1",
        "detail-type": "Spot Interruption Signal",
        "source": "spotforge.node",
        "time": "2026-11-20T08:20:03Z",
        "resources": [],
        "detail": body,
    }


def scheduled_event() -> dict[str, Any]:
    return {
        "version": "0",
        "id": "sched-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-11-20T08:21:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/spotforge-reconcile"],
        "detail": {},
    }


def test_the_documented_spot_warning_parses_with_its_action_two_minutes_after_the_warning() -> None:
    parsed = parse_event(load("spot-interruption-warning.json"))
    assert isinstance(parsed, SpotInterruption)
    assert parsed.instance_id == "i-1234567890abcdef0"
    assert parsed.action == "terminate"
    assert parsed.origin == "aws"
    assert parsed.warned_at == datetime(2026, 11, 20, 8, 20, tzinfo=UTC)
    assert parsed.action_at == datetime(2026, 11, 20, 8, 22, tzinfo=UTC)
    assert parsed.event_id == "12345678-1234-1234-1234-123456789012"
    assert parsed.trigger_detail() == {
        "instance-action": "terminate",
        "origin": "aws",
        "time": "2026-11-20T08:20:00Z",
        "action-time": "2026-11-20T08:22:00Z",
    }


def test_the_node_signal_dates_the_warning_two_minutes_before_the_imds_action_time() -> None:
    parsed = parse_event(node_signal())
    assert isinstance(parsed, SpotInterruption)
    assert parsed.origin == "node"
    assert parsed.action_at == datetime(2026, 11, 20, 8, 22, tzinfo=UTC)
    assert parsed.warned_at == datetime(2026, 11, 20, 8, 20, tzinfo=UTC)


def test_a_node_signal_without_an_action_time_falls_back_to_the_envelope_time() -> None:
    event = node_signal()
    del event["detail"]["time"]
    parsed = parse_event(event)
    assert isinstance(parsed, SpotInterruption)
    assert parsed.action_at is None
    assert parsed.warned_at == datetime(2026, 11, 20, 8, 20, 3, tzinfo=UTC)


def test_the_documented_rebalance_recommendation_parses() -> None:
    parsed = parse_event(load("rebalance-recommendation.json"))
    assert isinstance(parsed, RebalanceRecommendation)
    assert parsed.instance_id == "i-1234567890abcdef0"
    assert parsed.at == datetime(2026, 11, 20, 8, 10, tzinfo=UTC)


def test_the_documented_state_change_sample_without_a_version_field_parses() -> None:
    sample = load("instance-state-change.json")
    assert "version" not in sample
    parsed = parse_event(sample)
    assert isinstance(parsed, StateChange)
    assert parsed.instance_id == "i-abcd1111"
    assert parsed.state == "pending"
    assert parsed.trigger_detail() == {"state": "pending", "time": "2021-11-11T21:29:54Z"}


def test_the_scheduled_event_parses_with_its_rule() -> None:
    parsed = parse_event(scheduled_event())
    assert isinstance(parsed, Scheduled)
    assert parsed.rule_arn == "arn:aws:events:us-east-1:123456789012:rule/spotforge-reconcile"
    assert parsed.kind == "schedule"


@pytest.mark.parametrize(
    ("event", "reason_part"),
    [
        (None, "NoneType"),
        ("a string", "str"),
        ([1, 2], "list"),
        ({}, "no source or detail-type"),
        ({"source": "aws.ec2"}, "no source or detail-type"),
        ({"source": "aws.ec2", "detail-type": "EC2 Fleet Error"}, "unknown event"),
        ({"source": "aws.s3", "detail-type": "EC2 Spot Instance Interruption Warning"}, "unknown event"),
        ({"source": "spotforge.node", "detail-type": "EC2 Spot Instance Interruption Warning"}, "unknown"),
    ],
)
def test_malformed_or_unknown_events_are_ignored_with_a_reason(event: object, reason_part: str) -> None:
    parsed = parse_event(event)
    assert isinstance(parsed, Ignored)
    assert reason_part in parsed.reason


@pytest.mark.parametrize(
    ("fixture", "mutate", "reason_part"),
    [
        ("spot-interruption-warning.json", lambda e: e.pop("detail"), "no detail object"),
        ("spot-interruption-warning.json", lambda e: e.update(detail="x"), "no detail object"),
        ("spot-interruption-warning.json", lambda e: e["detail"].pop("instance-id"), "instance-id"),
        ("spot-interruption-warning.json", lambda e: e["detail"].update({"instance-id": 7}), "instance-id"),
        (
            "spot-interruption-warning.json",
            lambda e: e["detail"].update({"instance-id": "vol-1"}),
            "instance-id",
        ),
        ("spot-interruption-warning.json", lambda e: e["detail"].pop("instance-action"), "instance-action"),
        (
            "spot-interruption-warning.json",
            lambda e: e["detail"].update({"instance-action": "x"}),
            "instance-action",
        ),
        ("rebalance-recommendation.json", lambda e: e["detail"].clear(), "instance-id"),
        ("instance-state-change.json", lambda e: e["detail"].pop("state"), "unknown state"),
        ("instance-state-change.json", lambda e: e["detail"].update(state="melting"), "unknown state"),
    ],
)
def test_events_missing_required_fields_are_ignored(fixture: str, mutate: Any, reason_part: str) -> None:
    event = copy.deepcopy(load(fixture))
    mutate(event)
    parsed = parse_event(event)
    assert isinstance(parsed, Ignored)
    assert reason_part in parsed.reason
    assert parsed.event_id == event["id"]


def test_a_bad_or_missing_time_does_not_reject_the_event() -> None:
    event = load("spot-interruption-warning.json")
    event["time"] = "yesterday"
    parsed = parse_event(event)
    assert isinstance(parsed, SpotInterruption)
    assert parsed.warned_at is None and parsed.action_at is None
    assert "time" not in parsed.trigger_detail()


def test_a_naive_time_is_read_as_utc() -> None:
    event = load("rebalance-recommendation.json")
    event["time"] = "2026-11-20T08:10:00"
    parsed = parse_event(event)
    assert isinstance(parsed, RebalanceRecommendation)
    assert parsed.at == datetime(2026, 11, 20, 8, 10, tzinfo=UTC)


def test_every_documented_instance_action_is_accepted() -> None:
    for action in ("terminate", "stop", "hibernate"):
        event = load("spot-interruption-warning.json")
        event["detail"]["instance-action"] = action
        parsed = parse_event(event)
        assert isinstance(parsed, SpotInterruption) and parsed.action == action


def provider_event(request_type: str, **extra: Any) -> dict[str, Any]:
    # The CDK Provider framework hands onEvent the CloudFormation request without ResponseURL duties.
    event = {
        "RequestType": request_type,
        "RequestId": "req-1",
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/spotforge/abc",
        "LogicalResourceId": "Lifecycle",
        "ResourceType": "Custom::SpotforgeLifecycle",
        "ResourceProperties": {"ServiceToken": "arn:aws:lambda:...", "LaunchTemplateVersion": "3"},
    }
    event.update(extra)
    return event


def test_custom_resource_create_update_and_delete_parse() -> None:
    create = parse_custom_resource(provider_event("Create"))
    assert isinstance(create, CustomResourceRequest)
    assert create.request_type == "Create"
    assert create.physical_resource_id is None
    assert create.properties["LaunchTemplateVersion"] == "3"

    update = parse_custom_resource(
        provider_event("Update", PhysicalResourceId="spotforge-lifecycle", OldResourceProperties={"A": "1"})
    )
    assert isinstance(update, CustomResourceRequest)
    assert update.physical_resource_id == "spotforge-lifecycle"
    assert update.old_properties == {"A": "1"}

    delete = parse_custom_resource(provider_event("Delete", PhysicalResourceId="spotforge-lifecycle"))
    assert isinstance(delete, CustomResourceRequest)
    assert delete.request_type == "Delete"


@pytest.mark.parametrize("event", [None, {}, {"RequestType": "Explode"}, {"RequestType": 3}])
def test_a_custom_resource_request_of_unknown_type_is_ignored(event: object) -> None:
    parsed = parse_custom_resource(event)
    assert isinstance(parsed, Ignored)
    assert parsed.reason


def test_custom_resource_properties_that_are_not_objects_become_empty() -> None:
    parsed = parse_custom_resource(provider_event("Create", ResourceProperties="nope"))
    assert isinstance(parsed, CustomResourceRequest)
    assert parsed.properties == {}


def test_the_warning_lead_time_is_the_documented_two_minutes() -> None:
    assert events.SPOT_WARNING_LEAD.total_seconds() == 120
