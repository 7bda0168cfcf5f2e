"""How a node is made: instance role, launch templates (spot and on-demand) and the small user data
that fetches the node bundle (`userdata/`, a CDK asset) and runs its bootstrap.

CloudFormation creates no instance: the controller launches nodes from these templates, so a
replacement is built exactly like the first node.
"""

from __future__ import annotations

from pathlib import Path

from aws_cdk import Aws, Stack, Tags
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from infra_stack.nag import acknowledge

BUNDLE_DIR = Path(__file__).resolve().parent.parent / "userdata"
USER_DATA_LIMIT_BYTES = 16 * 1024
MOUNT_POINT = "/srv/spotforge"
# Tags the node may set on its own instance: its phase, and the interruption time the agent saw.
NODE_TAGGABLE_KEYS = ("spotforge:phase", "spotforge:interruption")


class NodeTemplate(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SpotforgeConfig,
        security_group: ec2.ISecurityGroup,
        bucket: s3.IBucket,
        backup_prefix: str,
        volume_id: str,
        allocation_id: str,
        public_ip: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.bundle = s3_assets.Asset(
            self, "Bundle", path=str(BUNDLE_DIR), exclude=["**/__pycache__", "**/*.pyc", "**/.pytest_cache"]
        )

        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            description="spotforge node: SSM agent, own backups prefix, own phase tags",
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name("AmazonSSMManagedInstanceCore")],
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]",
            "The AWS-maintained SSM core policy is what Run Command and Session Manager need; admin access "
            "goes through SSM instead of an open SSH port.",
        )
        self.bundle.grant_read(self.role)
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="BackupsReadWrite",
                actions=["s3:GetObject", "s3:PutObject"],
                resources=[bucket.arn_for_objects(f"{backup_prefix}*")],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="BackupsList",
                actions=["s3:ListBucket"],
                resources=[bucket.bucket_arn],
                conditions={"StringLike": {"s3:prefix": [f"{backup_prefix}*"]}},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="TagOwnPhase",
                actions=["ec2:CreateTags"],
                resources=[f"arn:{Aws.PARTITION}:ec2:{Aws.REGION}:{Aws.ACCOUNT_ID}:instance/*"],
                conditions={
                    "StringEquals": {"aws:ResourceTag/spotforge:stack": config.stack_name},
                    "ForAllValues:StringEquals": {"aws:TagKeys": list(NODE_TAGGABLE_KEYS)},
                },
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="ReadOwnState",
                # Describe calls support no resource-level permissions.
                actions=["ec2:DescribeInstances", "ec2:DescribeVolumes", "ec2:DescribeTags"],
                resources=["*"],
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="InterruptionSignal",
                actions=["events:PutEvents"],
                resources=[f"arn:{Aws.PARTITION}:events:{Aws.REGION}:{Aws.ACCOUNT_ID}:event-bus/default"],
                conditions={"StringEquals": {"events:source": "spotforge.node"}},
            )
        )
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="AdminPassword",
                actions=["ssm:GetParameter", "ssm:PutParameter"],
                resources=[
                    f"arn:{Aws.PARTITION}:ssm:{Aws.REGION}:{Aws.ACCOUNT_ID}:parameter"
                    f"{config.admin_password_parameter}"
                ],
            )
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::*]",
            "ec2:Describe* has no resource-level permissions; everything that writes is scoped.",
        )
        acknowledge(
            self.role,
            f"AwsSolutions-IAM5[Resource::<{_logical_ref(bucket)}.Arn>/{backup_prefix}*]",
            "The node writes time-ordered and content-addressed keys under its own backups prefix only.",
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ec2:<AWS::Region>:<AWS::AccountId>:instance/*]",
            "Instance ids are not known before launch; the statement is limited to this stack's tagged "
            "instances and to the phase/interruption tag keys.",
        )
        for action in ("s3:GetBucket*", "s3:GetObject*", "s3:List*"):
            acknowledge(
                self.role,
                f"AwsSolutions-IAM5[Action::{action}]",
                "Read-only access to the CDK asset that holds the node bundle (grant_read).",
            )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:s3:::cdk-hnb659fds-assets-<AWS::AccountId>-<AWS::Region>/*]",
            "The CDK bootstrap asset bucket holds the node bundle; keys are content hashes.",
        )

        self.user_data = ec2.UserData.custom(
            _user_data_script(
                config=config,
                bundle=self.bundle,
                bucket=bucket.bucket_name,
                backup_prefix=backup_prefix,
                volume_id=volume_id,
                allocation_id=allocation_id,
                public_ip=public_ip,
                region=Aws.REGION,
            )
        )
        self.instance_profile = iam.InstanceProfile(self, "InstanceProfile", role=self.role)
        machine_image = ec2.MachineImage.latest_amazon_linux2023(cpu_type=ec2.AmazonLinuxCpuType.ARM_64)
        common = dict(
            instance_type=ec2.InstanceType(config.instance_types[0]),
            machine_image=machine_image,
            instance_profile=self.instance_profile,
            security_group=security_group,
            user_data=self.user_data,
            http_put_response_hop_limit=1,
            http_tokens=ec2.LaunchTemplateHttpTokens.REQUIRED,
            instance_metadata_tags=False,
            block_devices=[
                ec2.BlockDevice(
                    device_name="/dev/xvda",
                    volume=ec2.BlockDeviceVolume.ebs(
                        10,
                        volume_type=ec2.EbsDeviceVolumeType.GP3,
                        encrypted=True,
                        delete_on_termination=True,
                    ),
                )
            ],
            cpu_credits=ec2.CpuCredits.STANDARD,
        )
        self.spot_template = ec2.LaunchTemplate(
            self,
            "SpotTemplate",
            launch_template_name=f"{config.stack_name}-node-spot",
            spot_options=ec2.LaunchTemplateSpotOptions(
                request_type=ec2.SpotRequestType.ONE_TIME,
                interruption_behavior=ec2.SpotInstanceInterruption.TERMINATE,
            ),
            **common,
        )
        self.on_demand_template = ec2.LaunchTemplate(
            self, "OnDemandTemplate", launch_template_name=f"{config.stack_name}-node-on-demand", **common
        )
        for template in (self.spot_template, self.on_demand_template):
            Tags.of(template).add("spotforge:role", "node")
            acknowledge(
                template,
                "AwsSolutions-EC26",
                "The root volume is encrypted (see BlockDeviceMappings); the rule cannot see launch "
                "template block devices.",
            )


def _logical_ref(bucket: s3.IBucket) -> str:
    return Stack.of(bucket).get_logical_id(bucket.node.default_child)  # type: ignore[arg-type]


def _user_data_script(
    *,
    config: SpotforgeConfig,
    bundle: s3_assets.Asset,
    bucket: str,
    backup_prefix: str,
    volume_id: str,
    allocation_id: str,
    public_ip: str,
    region: str,
) -> str:
    settings = {
        "SPOTFORGE_STACK": config.stack_name,
        "SPOTFORGE_REGION": region,
        "SPOTFORGE_BUCKET": bucket,
        "SPOTFORGE_BACKUP_PREFIX": backup_prefix,
        "SPOTFORGE_VOLUME_ID": volume_id,
        "SPOTFORGE_MOUNT": MOUNT_POINT,
        "SPOTFORGE_DOMAIN": config.domain or "",
        "SPOTFORGE_ACME_EMAIL": config.acme_email or "",
        "SPOTFORGE_EIP_ALLOCATION_ID": allocation_id,
        "SPOTFORGE_PUBLIC_IP": public_ip,
        "SPOTFORGE_FORGEJO_IMAGE": f"codeberg.org/forgejo/forgejo:{config.forgejo_version}",
        "SPOTFORGE_K3S_VERSION": config.k3s_version,
        "SPOTFORGE_BACKUP_INTERVAL_MINUTES": str(config.backup_interval_minutes),
        "SPOTFORGE_BACKUP_RETENTION_DAYS": str(config.backup_retention_days),
        "SPOTFORGE_ADMIN_PASSWORD_PARAM": config.admin_password_parameter,
    }
    env_lines = "\n".join(f"{key}={value}" for key, value in settings.items())
    # Values are validated (no quotes, spaces or $), so the env file needs no escaping.
    return f"""#!/bin/bash
# spotforge node user data: write settings, fetch the node bundle, hand over to its bootstrap.
set -euo pipefail
exec > >(tee -a /var/log/spotforge-userdata.log | logger -t spotforge-userdata) 2>&1
install -d -m 0755 /etc/spotforge /opt/spotforge
cat > /etc/spotforge/node.env <<'SPOTFORGE_ENV'
{env_lines}
SPOTFORGE_ENV
chmod 0644 /etc/spotforge/node.env
for attempt in 1 2 3 4 5; do
  aws s3 cp --only-show-errors --region {region} {bundle.s3_object_url} /opt/spotforge/bundle.zip && break
  echo "bundle download failed (attempt $attempt), retrying"; sleep $((attempt * 3))
done
python3 -m zipfile -e /opt/spotforge/bundle.zip /opt/spotforge/
exec bash /opt/spotforge/bootstrap.sh
"""
