"""CDK assertions on the controller: functions, rules, least privilege, lifecycle hook, alarms."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match

from spotforge_controller.metrics import METRIC_NAMES

pytestmark = pytest.mark.slow

DOMAIN = {"domain": "git.example.com", "acmeEmail": "me@example.com"}


def _of_type(result: Any, kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in result.template_dict["Resources"].items() if v["Type"] == kind}


def _controller_functions(result: Any) -> list[dict[str, Any]]:
    return [
        f["Properties"]
        for f in _of_type(result, "AWS::Lambda::Function").values()
        if "spotforge_controller" in f["Properties"].get("Handler", "")
    ]


def test_controller_functions_are_python_313_arm64_with_powertools_and_no_reserved_concurrency(synth) -> None:
    functions = _controller_functions(synth())
    assert sorted(f["Handler"].split(".")[2] for f in functions) == [
        "health",
        "interruption",
        "lifecycle",
        "rebalance",
        "reconcile",
    ]
    for fn in functions:
        assert fn["Runtime"] == "python3.13"
        assert fn["Architectures"] == ["arm64"]
        assert len(fn["Layers"]) == 1
        assert "ReservedConcurrentExecutions" not in fn
        assert fn["Environment"]["Variables"]["POWERTOOLS_SERVICE_NAME"] == "spotforge"


def test_powertools_layer_comes_from_the_public_ssm_parameter(synth) -> None:
    parameters = synth().template_dict["Parameters"]
    defaults = [p.get("Default", "") for p in parameters.values()]
    assert "/aws/service/powertools/python/arm64/python3.13/latest" in defaults


def test_controller_environment_names_every_seam(synth) -> None:
    (fn, *_) = _controller_functions(synth())
    variables = fn["Environment"]["Variables"]
    for name in (
        "STACK_NAME",
        "LAUNCH_TEMPLATE_ID",
        "ON_DEMAND_LAUNCH_TEMPLATE_ID",
        "SUBNETS",
        "DATA_VOLUME_ID",
        "EIP_ALLOCATION_ID",
        "BACKUP_BUCKET",
        "STATE_TABLE",
        "TOPIC_ARN",
        "INSTANCE_TYPES",
        "ON_DEMAND_FALLBACK",
        "HANDOFF_DEADLINE_SECONDS",
        "DRAIN_TIMEOUT_SECONDS",
    ):
        assert name in variables, name
    assert variables["INSTANCE_TYPES"].startswith("t4g.small,")
    subnets = json.dumps(variables["SUBNETS"])
    assert subnets.count("Fn::GetAZs") == 2 and subnets.count("publicSubnet") == 2


def test_rules_cover_spot_warning_node_signal_rebalance_state_change_and_schedules(synth) -> None:
    rules = [r["Properties"] for r in _of_type(synth(), "AWS::Events::Rule").values()]
    patterns = [r["EventPattern"] for r in rules if "EventPattern" in r]
    detail_types = sorted(p["detail-type"][0] for p in patterns)
    assert detail_types == [
        "EC2 Instance Rebalance Recommendation",
        "EC2 Instance State-change Notification",
        "EC2 Spot Instance Interruption Warning",
        "Spot Interruption Signal",
    ]
    (state_change,) = [p for p in patterns if p["detail-type"] == ["EC2 Instance State-change Notification"]]
    assert state_change["detail"] == {"state": ["shutting-down", "terminated", "stopping", "stopped"]}
    assert sorted(r["ScheduleExpression"] for r in rules if "ScheduleExpression" in r) == [
        "rate(1 minute)",
        "rate(1 minute)",
    ]


def _statements(result: Any, role_fragment: str) -> list[dict[str, Any]]:
    policies = _of_type(result, "AWS::IAM::Policy")
    return [
        s
        for p in policies.values()
        if any(role_fragment in json.dumps(r) for r in p["Properties"]["Roles"])
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def test_mutating_ec2_calls_are_limited_to_resources_tagged_with_the_stack(synth) -> None:
    statements = _statements(synth(), "ReconcileRole")
    (manage,) = [s for s in statements if s.get("Sid") == "ManageOurNodesAndVolume"]
    assert set(manage["Action"]) >= {"ec2:TerminateInstances", "ec2:AttachVolume", "ec2:DetachVolume"}
    assert manage["Condition"] == {"StringEquals": {"aws:ResourceTag/spotforge:stack": "spotforge"}}
    (launch,) = [s for s in statements if s.get("Sid") == "LaunchFromOurTemplates"]
    assert "launch-template/" in json.dumps(launch["Resource"])
    (tagged,) = [s for s in statements if s.get("Sid") == "LaunchCreatesTaggedInstance"]
    assert tagged["Condition"] == {"StringEquals": {"aws:RequestTag/spotforge:stack": "spotforge"}}
    (ssm,) = [s for s in statements if s.get("Sid") == "RunAgentOnOurNodes"]
    assert ssm["Condition"] == {"StringEquals": {"ssm:resourceTag/spotforge:stack": "spotforge"}}
    wildcard = [s for s in statements if s["Resource"] == "*"]
    for statement in wildcard:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a.split(":")[1].startswith(("Describe", "Get", "List")) for a in actions), actions


def test_rebalance_snapshots_can_be_pruned_only_when_tagged_as_ours(synth) -> None:
    statements = _statements(synth(), "ReconcileRole")
    (prune,) = [s for s in statements if s.get("Sid") == "PruneOurRebalanceSnapshots"]
    assert prune["Action"] == "ec2:DeleteSnapshot"
    assert prune["Condition"] == {
        "StringLike": {
            "aws:ResourceTag/spotforge:stack": "spotforge",
            "aws:ResourceTag/spotforge:rebalance-of": "i-*",
        }
    }


def test_rules_are_deleted_before_the_destroy_cleanup_runs(synth) -> None:
    result = synth()
    (lifecycle_id,) = _of_type(result, "Custom::SpotforgeLifecycle")
    for rule in _of_type(result, "AWS::Events::Rule").values():
        assert lifecycle_id in rule.get("DependsOn", [])


def test_lifecycle_custom_resource_follows_the_launch_template_versions(synth) -> None:
    result = synth()
    (resource,) = _of_type(result, "Custom::SpotforgeLifecycle").values()
    versions = json.dumps(resource["Properties"])
    assert "LatestVersionNumber" in versions
    assert any("NetworkVpc" in dep for dep in resource.get("DependsOn", []))


def test_alarms_stay_in_the_free_tier_and_notify_the_topic(synth) -> None:
    for variant in ({}, DOMAIN):
        alarms = _of_type(synth(**variant), "AWS::CloudWatch::Alarm")
        assert 4 <= len(alarms) <= 10
        for alarm in alarms.values():
            props = alarm["Properties"]
            assert props["AlarmActions"] and props["OKActions"]
            assert "AlertsTopic" in json.dumps(props["AlarmActions"])
    assert len(METRIC_NAMES) <= 10


def test_certificate_alarm_only_with_a_domain(synth) -> None:
    def names(result: Any) -> str:
        return json.dumps(list(_of_type(result, "AWS::CloudWatch::Alarm").values()))

    assert "CertificateDaysLeft" not in names(synth())
    assert "CertificateDaysLeft" in names(synth(**DOMAIN))


def test_unhealthy_alarm_treats_silence_as_an_outage(synth) -> None:
    synth().template.has_resource_properties(
        "AWS::CloudWatch::Alarm",
        {
            "MetricName": "Healthy",
            "Namespace": "Spotforge",
            "Dimensions": [{"Name": "service", "Value": "spotforge"}],
            "TreatMissingData": "breaching",
        },
    )


def test_backup_stale_alarm_scales_with_the_backup_interval(synth) -> None:
    synth(backupIntervalMinutes=30).template.has_resource_properties(
        "AWS::CloudWatch::Alarm", {"MetricName": "BackupAgeSeconds", "Threshold": 5400}
    )


def test_state_table_is_on_demand_with_point_in_time_recovery(synth) -> None:
    synth().template.has_resource_properties(
        "AWS::DynamoDB::GlobalTable",
        {
            "BillingMode": "PAY_PER_REQUEST",
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "Replicas": [
                Match.object_like({"PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True}})
            ],
        },
    )


def test_one_dashboard(synth) -> None:
    synth().template.resource_count_is("AWS::CloudWatch::Dashboard", 1)


def test_first_spot_launch_in_a_new_account_may_create_the_spot_service_linked_role(synth) -> None:
    statements = _statements(synth(), "ReconcileRole")
    (slr,) = [s for s in statements if s.get("Sid") == "SpotServiceLinkedRole"]
    assert slr["Action"] == "iam:CreateServiceLinkedRole"
    assert slr["Condition"] == {"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}}
    assert "AWSServiceRoleForEC2Spot" in json.dumps(slr["Resource"])
