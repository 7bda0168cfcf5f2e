"""The emulated region the drill deploys into: what the CDK stack creates, made with the emulator's
strict session (VPC with public subnets in two AZs, spot and on-demand launch templates with
TagSpecifications, the tagged data volume, the Elastic IP, the DynamoDB state table, the SNS
topic with an SQS inbox standing in for the email subscription, the backups bucket)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .emulator import Emulator

STACK = "spotforge-drill"
# Any id works: the emulator skips moto's sample AMIs and moto does not check the image exists.
IMAGE_ID = "ami-12c6146b"
INSTANCE_TYPES = ("t4g.small", "t4g.medium", "m6g.medium", "m7g.medium")


@dataclass(frozen=True)
class Region:
    stack: str
    region: str
    vpc_id: str
    subnets: dict[str, str]  # AZ -> public subnet id
    spot_template_id: str
    on_demand_template_id: str
    volume_id: str
    volume_az: str
    allocation_id: str
    public_ip: str
    table: str
    topic_arn: str
    bucket: str
    inbox_url: str

    def controller_env(self, **overrides: str) -> dict[str, str]:
        """The controller Lambdas' environment, names as in docs/design.md."""
        env = {
            "STACK_NAME": self.stack,
            "LAUNCH_TEMPLATE_ID": self.spot_template_id,
            "ON_DEMAND_LAUNCH_TEMPLATE_ID": self.on_demand_template_id,
            "SUBNETS": json.dumps(self.subnets),
            "DATA_VOLUME_ID": self.volume_id,
            "EIP_ALLOCATION_ID": self.allocation_id,
            "BACKUP_BUCKET": self.bucket,
            "STATE_TABLE": self.table,
            "TOPIC_ARN": self.topic_arn,
            "INSTANCE_TYPES": ",".join(INSTANCE_TYPES),
            "ON_DEMAND_FALLBACK": "true",
            "HANDOFF_DEADLINE_SECONDS": "85",
            "DRAIN_TIMEOUT_SECONDS": "25",
            "PROACTIVE_REBALANCE": "false",
            "DOMAIN": "",
            "HEALTH_FAILURE_THRESHOLD": "3",
            "LEASE_SECONDS": "120",
            "POWERTOOLS_SERVICE_NAME": "spotforge",
            "POWERTOOLS_METRICS_NAMESPACE": "Spotforge",
        }
        env.update(overrides)
        return env


def _template_data(stack: str, spot: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ImageId": IMAGE_ID,
        "InstanceType": INSTANCE_TYPES[0],
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        "CreditSpecification": {"CpuCredits": "standard"},
        "TagSpecifications": [
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": "spotforge:stack", "Value": stack},
                    {"Key": "spotforge:role", "Value": "node"},
                ],
            }
        ],
    }
    if spot:
        data["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"},
        }
    return data


def build_region(emu: Emulator, stack: str = STACK, volume_az: str | None = None) -> Region:
    """Create everything the stack would, through `emu.session` (strict clients)."""
    session = emu.session
    ec2 = session.client("ec2")
    region = emu.region
    zones = [f"{region}a", f"{region}b"]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = {}
    for index, az in enumerate(zones):
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{index}.0/24", AvailabilityZone=az)
        subnets[az] = subnet["Subnet"]["SubnetId"]
    spot = ec2.create_launch_template(
        LaunchTemplateName=f"{stack}-node", LaunchTemplateData=_template_data(stack, spot=True)
    )["LaunchTemplate"]["LaunchTemplateId"]
    on_demand = ec2.create_launch_template(
        LaunchTemplateName=f"{stack}-node-on-demand", LaunchTemplateData=_template_data(stack, spot=False)
    )["LaunchTemplate"]["LaunchTemplateId"]
    az = volume_az or zones[0]
    volume = ec2.create_volume(
        AvailabilityZone=az,
        Size=20,
        VolumeType="gp3",
        Encrypted=True,
        TagSpecifications=[
            {
                "ResourceType": "volume",
                "Tags": [
                    {"Key": "spotforge:stack", "Value": stack},
                    {"Key": "spotforge:role", "Value": "data"},
                ],
            }
        ],
    )["VolumeId"]
    address = ec2.allocate_address(
        Domain="vpc",
        TagSpecifications=[
            {
                "ResourceType": "elastic-ip",
                "Tags": [
                    {"Key": "spotforge:stack", "Value": stack},
                    {"Key": "spotforge:role", "Value": "ip"},
                ],
            }
        ],
    )
    table = f"{stack}-state"
    session.client("dynamodb").create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    bucket = f"{stack}-backups"
    session.client("s3").create_bucket(Bucket=bucket)
    sns, sqs = session.client("sns"), session.client("sqs")
    topic = sns.create_topic(Name=f"{stack}-alerts")["TopicArn"]
    inbox = sqs.create_queue(QueueName=f"{stack}-inbox")["QueueUrl"]
    inbox_arn = sqs.get_queue_attributes(QueueUrl=inbox, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=inbox_arn)
    return Region(
        stack=stack,
        region=region,
        vpc_id=vpc,
        subnets=subnets,
        spot_template_id=spot,
        on_demand_template_id=on_demand,
        volume_id=volume,
        volume_az=az,
        allocation_id=address["AllocationId"],
        public_ip=address["PublicIp"],
        table=table,
        topic_arn=topic,
        bucket=bucket,
        inbox_url=inbox,
    )


def read_inbox(emu: Emulator, region: Region) -> list[dict[str, Any]]:
    """SNS notifications delivered so far (each the SNS envelope: Subject, Message...)."""
    sqs = emu.session.client("sqs")
    out: list[dict[str, Any]] = []
    while True:
        got = sqs.receive_message(QueueUrl=region.inbox_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return out
        for message in got:
            out.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=region.inbox_url, ReceiptHandle=message["ReceiptHandle"])
