"""CDK assertions on the synthesized template: every property the foundation promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Match

pytestmark = pytest.mark.slow

DOMAIN = {"domain": "git.example.com", "acmeEmail": "me@example.com", "alertEmail": "me@example.com"}


def _resources(synth_result: Any, kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in synth_result.template_dict["Resources"].items() if v["Type"] == kind}


def test_vpc_has_public_subnets_in_two_azs_and_no_nat(synth) -> None:
    result = synth()
    result.template.resource_count_is("AWS::EC2::NatGateway", 0)
    subnets = _resources(result, "AWS::EC2::Subnet")
    assert len(subnets) == 2
    azs = {json.dumps(s["Properties"]["AvailabilityZone"]) for s in subnets.values()}
    assert len(azs) == 2
    assert all(s["Properties"]["MapPublicIpOnLaunch"] for s in subnets.values())
    result.template.has_resource_properties(
        "AWS::EC2::VPCEndpoint", {"VpcEndpointType": "Gateway", "ServiceName": Match.any_value()}
    )
    result.template.resource_count_is("AWS::EC2::Instance", 0)


def _ingress(result: Any) -> list[dict[str, Any]]:
    (group,) = _resources(result, "AWS::EC2::SecurityGroup").values()
    return group["Properties"]["SecurityGroupIngress"]


def test_security_group_opens_web_and_git_ssh_but_not_admin_ssh_without_admin_cidr(synth) -> None:
    rules = _ingress(synth())
    assert sorted((r["FromPort"], r["CidrIp"]) for r in rules) == [
        (22, "0.0.0.0/0"),
        (80, "0.0.0.0/0"),
        (443, "0.0.0.0/0"),
    ]


def test_security_group_opens_admin_ssh_only_to_admin_cidr(synth) -> None:
    rules = _ingress(synth(adminCidr="203.0.113.7/32"))
    admin = [r for r in rules if r["FromPort"] == 2222]
    assert admin == [
        {
            "CidrIp": "203.0.113.7/32",
            "Description": "admin SSH",
            "FromPort": 2222,
            "IpProtocol": "tcp",
            "ToPort": 2222,
        }
    ]


def _template_data(result: Any, name_part: str) -> dict[str, Any]:
    templates = _resources(result, "AWS::EC2::LaunchTemplate")
    (template,) = [t for t in templates.values() if name_part in t["Properties"]["LaunchTemplateName"]]
    return template["Properties"]["LaunchTemplateData"]


def test_spot_launch_template_is_arm64_spot_imdsv2_standard_credits_encrypted(synth) -> None:
    result = synth()
    data = _template_data(result, "node-spot")
    assert data["InstanceType"] == "t4g.small"
    assert data["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"InstanceInterruptionBehavior": "terminate", "SpotInstanceType": "one-time"},
    }
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert data["CreditSpecification"] == {"CpuCredits": "standard"}
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["VolumeType"] == "gp3"
    # Root holds only the OS, k3s and images (all data is on the data volume): 10 GB, $0.80/month.
    assert root["Ebs"]["VolumeSize"] == 10 and root["Ebs"]["DeleteOnTermination"] is True
    assert "arm64" in json.dumps(data["ImageId"])
    assert "al2023" in json.dumps(result.template_dict["Parameters"])
    assert "IamInstanceProfile" in data and "UserData" in data


def test_on_demand_template_differs_only_by_market_options(synth) -> None:
    result = synth()
    spot = dict(_template_data(result, "node-spot"))
    on_demand = dict(_template_data(result, "node-on-demand"))
    spot.pop("InstanceMarketOptions")
    for data in (spot, on_demand):
        data.pop("TagSpecifications", None)
    assert spot == on_demand


def _user_data_text(result: Any) -> str:
    encoded = _template_data(result, "node-spot")["UserData"]["Fn::Base64"]
    parts = encoded["Fn::Join"][1] if isinstance(encoded, dict) else [encoded]
    return "".join(p if isinstance(p, str) else "<token>" for p in parts)


def test_user_data_fetches_the_bundle_and_runs_bootstrap_within_16_kb(synth) -> None:
    text = _user_data_text(synth(**DOMAIN))
    assert len(text.encode()) < 16 * 1024
    assert "set -euo pipefail" in text
    assert "/etc/spotforge/node.env" in text
    assert "SPOTFORGE_DOMAIN=git.example.com" in text
    assert "exec bash /opt/spotforge/bootstrap.sh" in text


def test_user_data_shellcheck_clean(synth, tmp_path) -> None:
    import shutil

    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required (apt-get install shellcheck)"
    script = tmp_path / "user-data.sh"
    script.write_text(_user_data_text(synth()).replace("<token>", "TOKEN"))
    result = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_data_volume_is_gp3_20_gib_encrypted_retained_and_tagged(synth) -> None:
    result = synth()
    result.template.has_resource(
        "AWS::EC2::Volume",
        {
            "Properties": Match.object_like(
                {
                    "Size": 20,
                    "VolumeType": "gp3",
                    "Encrypted": True,
                    "Tags": Match.array_with(
                        [
                            {"Key": "spotforge:role", "Value": "data"},
                            {"Key": "spotforge:stack", "Value": "spotforge"},
                        ]
                    ),
                }
            ),
            "DeletionPolicy": "Retain",
            "UpdateReplacePolicy": "Retain",
        },
    )
    (volume,) = _resources(result, "AWS::EC2::Volume").values()
    (first_subnet,) = [s for k, s in _resources(result, "AWS::EC2::Subnet").items() if "publicSubnet1" in k]
    assert volume["Properties"]["AvailabilityZone"] == first_subnet["Properties"]["AvailabilityZone"]


def test_data_volume_has_a_daily_snapshot_policy(synth) -> None:
    synth().template.has_resource_properties(
        "AWS::DLM::LifecyclePolicy",
        {
            "State": "ENABLED",
            "PolicyDetails": Match.object_like(
                {
                    "ResourceTypes": ["VOLUME"],
                    "TargetTags": [{"Key": "spotforge:snapshot", "Value": "spotforge"}],
                    "Schedules": [Match.object_like({"RetainRule": {"Interval": 7, "IntervalUnit": "DAYS"}})],
                }
            ),
        },
    )


def test_elastic_ip_is_retained_by_default_and_can_opt_out(synth) -> None:
    synth().template.has_resource("AWS::EC2::EIP", {"DeletionPolicy": "Retain"})
    synth(retainElasticIp=False).template.has_resource("AWS::EC2::EIP", {"DeletionPolicy": "Delete"})


def test_route53_record_only_with_a_hosted_zone(synth) -> None:
    synth(**DOMAIN).template.resource_count_is("AWS::Route53::RecordSet", 0)
    zoned = synth(**DOMAIN, hostedZoneId="Z0123456789ABC", hostedZoneName="example.com")
    zoned.template.has_resource_properties(
        "AWS::Route53::RecordSet", {"Name": "git.example.com.", "Type": "A", "HostedZoneId": "Z0123456789ABC"}
    )


def test_backup_bucket_is_private_tls_only_versioned_encrypted_and_expires_after_retention(synth) -> None:
    result = synth()
    result.template.has_resource(
        "AWS::S3::Bucket",
        {
            "Properties": Match.object_like(
                {
                    "PublicAccessBlockConfiguration": {
                        "BlockPublicAcls": True,
                        "BlockPublicPolicy": True,
                        "IgnorePublicAcls": True,
                        "RestrictPublicBuckets": True,
                    },
                    "VersioningConfiguration": {"Status": "Enabled"},
                    "BucketEncryption": Match.any_value(),
                    "LifecycleConfiguration": {
                        "Rules": [
                            Match.object_like(
                                {
                                    "ExpirationInDays": 30,
                                    "NoncurrentVersionExpiration": {"NoncurrentDays": 30},
                                    "Status": "Enabled",
                                }
                            )
                        ]
                    },
                }
            ),
            "DeletionPolicy": "Retain",
        },
    )
    result.template.has_resource_properties(
        "AWS::S3::BucketPolicy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
                        )
                    ]
                )
            }
        },
    )
    synth(backupRetentionDays=7).template.has_resource_properties(
        "AWS::S3::Bucket",
        {"LifecycleConfiguration": {"Rules": [Match.object_like({"ExpirationInDays": 7})]}},
    )


def test_alerts_topic_is_encrypted_with_a_key_cloudwatch_can_use(synth) -> None:
    result = synth(**DOMAIN)
    result.template.has_resource_properties("AWS::SNS::Topic", {"KmsMasterKeyId": Match.any_value()})
    result.template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "EnableKeyRotation": True,
            "KeyPolicy": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Principal": {"Service": "cloudwatch.amazonaws.com"},
                                "Action": ["kms:Decrypt", "kms:GenerateDataKey*"],
                            }
                        )
                    ]
                )
            },
        },
    )
    result.template.has_resource_properties(
        "AWS::SNS::Subscription", {"Protocol": "email", "Endpoint": "me@example.com"}
    )
    synth().template.resource_count_is("AWS::SNS::Subscription", 0)
    result.template.resource_count_is("AWS::KMS::Key", 1)


def test_node_role_writes_only_its_backups_prefix(synth) -> None:
    result = synth()
    policies = _resources(result, "AWS::IAM::Policy")
    statements = [s for p in policies.values() for s in p["Properties"]["PolicyDocument"]["Statement"]]
    (write,) = [s for s in statements if s.get("Sid") == "BackupsReadWrite"]
    assert json.dumps(write["Resource"]).endswith('"/backups/*"]]}')
    assert "s3:DeleteObject" not in json.dumps(statements)


def test_outputs_tell_the_user_where_things_are(synth) -> None:
    outputs = synth(**DOMAIN).template_dict["Outputs"]
    for name in (
        "ForgejoUrl",
        "ElasticIp",
        "DnsRecordToCreate",
        "AdminPasswordCommand",
        "BackupBucket",
        "DataVolumeId",
        "AlertsTopicArn",
    ):
        assert name in outputs
    assert outputs["ForgejoUrl"]["Value"] == "https://git.example.com/"


def test_cdk_nag_reports_no_unacknowledged_finding(synth) -> None:
    for variant in ({}, DOMAIN, {"adminCidr": "203.0.113.7/32"}):
        report = synth(**variant).validation_report()
        violations = [v for plugin in report["pluginReports"] for v in plugin.get("violations", [])]
        assert violations == []


def test_cfn_lint_finds_no_error_or_warning(synth) -> None:
    paths = [str(synth(**v).template_path) for v in ({}, DOMAIN)]
    result = subprocess.run(
        [str(Path(sys.executable).with_name("cfn-lint")), "--format", "parseable", *paths],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],  # picks up .cfnlintrc.yaml and its justified ignores
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_spot_drill_interrupts_only_running_nodes_of_this_stack(synth) -> None:
    synth().template.has_resource_properties(
        "AWS::FIS::ExperimentTemplate",
        {
            "Targets": {
                "node": {
                    "ResourceType": "aws:ec2:spot-instance",
                    "ResourceTags": {"spotforge:stack": "spotforge", "spotforge:role": "node"},
                    "Filters": [{"Path": "State.Name", "Values": ["running"]}],
                    "SelectionMode": "ALL",
                }
            },
            "Actions": {
                "interrupt": Match.object_like(
                    {
                        "ActionId": "aws:ec2:send-spot-instance-interruptions",
                        "Parameters": {"durationBeforeInterruption": "PT2M"},
                    }
                )
            },
        },
    )
