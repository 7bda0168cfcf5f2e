"""Fixtures: a strict emulator and a small spotforge-like world (VPC, two AZs, spot launch
template, tagged data volume, Elastic IP)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from drill.emulator import DirectoryNode, Emulator, LatencyModel, VirtualClock

START = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class World:
    emu: Emulator
    ec2: Any
    ssm: Any
    subnet_a: str
    subnet_b: str
    template_id: str
    data_volume: str
    allocation_id: str
    public_ip: str

    def launch(self, subnet: str | None = None, token: str | None = None, **extra: Any) -> str:
        kwargs: dict[str, Any] = {
            "LaunchTemplate": {"LaunchTemplateId": self.template_id, "Version": "$Latest"},
            "MinCount": 1,
            "MaxCount": 1,
            "SubnetId": subnet or self.subnet_a,
            **extra,
        }
        if token:
            kwargs["ClientToken"] = token
        return self.ec2.run_instances(**kwargs)["Instances"][0]["InstanceId"]

    def launch_ready(self, subnet: str | None = None) -> str:
        """Launch and wait (virtually) until running with its SSM agent registered."""
        instance_id = self.launch(subnet)
        lat = self.emu.latency
        self.emu.clock.sleep(lat.run_to_running + lat.ssm_registered_after_running + 0.001)
        return instance_id

    def instance(self, instance_id: str) -> dict[str, Any]:
        return self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def state(self, instance_id: str) -> str:
        return self.instance(instance_id)["State"]["Name"]

    def volume(self, volume_id: str | None = None) -> dict[str, Any]:
        return self.ec2.describe_volumes(VolumeIds=[volume_id or self.data_volume])["Volumes"][0]


def _world(emu: Emulator, tmp_path: Path) -> World:
    emu.set_node_factory(DirectoryNode.factory(tmp_path / "nodes"))
    ec2 = emu.session.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet_a = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")
    subnet_b = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.2.0/24", AvailabilityZone="us-east-1b")
    template = ec2.create_launch_template(
        LaunchTemplateName="spotforge-node",
        LaunchTemplateData={
            "ImageId": "ami-12c6146b",
            "InstanceType": "t4g.small",
            "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}},
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": "spotforge:role", "Value": "node"}]}
            ],
        },
    )
    volume = ec2.create_volume(
        AvailabilityZone="us-east-1a",
        Size=20,
        VolumeType="gp3",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "spotforge:role", "Value": "data"}]}],
    )
    address = ec2.allocate_address(Domain="vpc")
    return World(
        emu=emu,
        ec2=ec2,
        ssm=emu.session.client("ssm"),
        subnet_a=subnet_a["Subnet"]["SubnetId"],
        subnet_b=subnet_b["Subnet"]["SubnetId"],
        template_id=template["LaunchTemplate"]["LaunchTemplateId"],
        data_volume=volume["VolumeId"],
        allocation_id=address["AllocationId"],
        public_ip=address["PublicIp"],
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with Emulator(region="us-east-1", clock=VirtualClock(START), latency=LatencyModel.default()) as emu:
        yield _world(emu, tmp_path)


@pytest.fixture
def instant_world(tmp_path: Path) -> Iterator[World]:
    with Emulator(region="us-east-1", clock=VirtualClock(START), latency=LatencyModel.instant()) as emu:
        yield _world(emu, tmp_path)
