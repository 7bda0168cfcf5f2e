"""The long-lived pieces that outlive every node: the data volume (with daily snapshots) and the Elastic IP."""

from __future__ import annotations

from aws_cdk import CfnTag, Duration, RemovalPolicy, Size, Tags
from aws_cdk import aws_dlm as dlm
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_route53 as route53
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge

ROLE_TAG = "spotforge:role"
SNAPSHOT_TAG = "spotforge:snapshot"


class DataVolume(Construct):
    """gp3, encrypted with the AWS-managed EBS key (free), retained when the stack goes away."""

    def __init__(
        self, scope: Construct, construct_id: str, *, config: SpotforgeConfig, availability_zone: str
    ) -> None:
        super().__init__(scope, construct_id)
        self.volume = ec2.Volume(
            self,
            "Volume",
            availability_zone=availability_zone,
            size=Size.gibibytes(config.data_volume_gib),
            volume_type=ec2.EbsDeviceVolumeType.GP3,
            encrypted=True,
            removal_policy=RemovalPolicy.RETAIN,
            volume_name=f"{config.stack_name}-data",
        )
        Tags.of(self.volume).add(ROLE_TAG, "data")
        Tags.of(self.volume).add(SNAPSHOT_TAG, config.stack_name)

        dlm_role = iam.Role(
            self,
            "SnapshotRole",
            assumed_by=iam.ServicePrincipal("dlm.amazonaws.com"),
            managed_policies=[
                iam.ManagedPolicy.from_aws_managed_policy_name(
                    "service-role/AWSDataLifecycleManagerServiceRole"
                )
            ],
        )
        acknowledge(
            dlm_role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AWSDataLifecycleManagerServiceRole]",
            "The AWS-maintained DLM service policy is the documented role for EBS snapshot policies.",
        )
        self.snapshot_policy = dlm.CfnLifecyclePolicy(
            self,
            "DailySnapshots",
            description=f"{config.stack_name} data volume daily snapshots",
            state="ENABLED",
            execution_role_arn=dlm_role.role_arn,
            policy_details=dlm.CfnLifecyclePolicy.PolicyDetailsProperty(
                policy_type="EBS_SNAPSHOT_MANAGEMENT",
                resource_types=["VOLUME"],
                target_tags=[CfnTag(key=SNAPSHOT_TAG, value=config.stack_name)],
                schedules=[
                    dlm.CfnLifecyclePolicy.ScheduleProperty(
                        name="daily",
                        copy_tags=True,
                        create_rule=dlm.CfnLifecyclePolicy.CreateRuleProperty(
                            interval=24, interval_unit="HOURS", times=["03:00"]
                        ),
                        retain_rule=dlm.CfnLifecyclePolicy.RetainRuleProperty(
                            interval=config.snapshot_retention_days, interval_unit="DAYS"
                        ),
                    )
                ],
            ),
        )


class PublicAddress(Construct):
    """The Elastic IP the forge is reached at, and the optional Route 53 record pointing at it."""

    def __init__(self, scope: Construct, construct_id: str, *, config: SpotforgeConfig) -> None:
        super().__init__(scope, construct_id)
        self.eip = ec2.CfnEIP(self, "Address", domain="vpc")
        self.eip.apply_removal_policy(
            RemovalPolicy.RETAIN if config.retain_elastic_ip else RemovalPolicy.DESTROY
        )
        Tags.of(self.eip).add(ROLE_TAG, "ip")
        Tags.of(self.eip).add("Name", f"{config.stack_name}-ip")
        self.record: route53.ARecord | None = None
        if config.hosted_zone_id and config.hosted_zone_name and config.domain:
            zone = route53.HostedZone.from_hosted_zone_attributes(
                self, "Zone", hosted_zone_id=config.hosted_zone_id, zone_name=config.hosted_zone_name
            )
            self.record = route53.ARecord(
                self,
                "Record",
                zone=zone,
                record_name=config.domain + ".",
                target=route53.RecordTarget.from_ip_addresses(self.eip.attr_public_ip),
                ttl=Duration.minutes(5),
            )

    @property
    def allocation_id(self) -> str:
        return self.eip.attr_allocation_id

    @property
    def public_ip(self) -> str:
        return self.eip.attr_public_ip
