"""Helpers for the drill tests: a strict emulator with the drill's region and simulated nodes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from drill.emulator import Emulator, VirtualClock
from drill.node import NodeEnv, NodeFleet, NodeTimings, SimNode
from drill.region import Region

START = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)


@dataclass
class NodeWorld:
    emu: Emulator
    region: Region
    fleet: NodeFleet
    ec2: Any
    ssm: Any

    @property
    def clock(self) -> VirtualClock:
        return self.emu.clock

    def launch(self, az: str | None = None) -> str:
        subnet = self.region.subnets[az or self.region.volume_az]
        reply = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.region.spot_template_id},
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
        )
        return reply["Instances"][0]["InstanceId"]

    def running_node(self) -> SimNode:
        """A node that is running with its SSM agent registered (not yet standby)."""
        instance_id = self.launch()
        latency = self.emu.latency
        self.clock.sleep(latency.run_to_running + latency.ssm_registered_after_running + 0.1)
        return self.fleet.nodes[instance_id]

    def attach(self, instance_id: str, volume_id: str | None = None) -> None:
        self.ec2.attach_volume(
            VolumeId=volume_id or self.region.volume_id, InstanceId=instance_id, Device="/dev/sdf"
        )

    def serving_node(self) -> SimNode:
        node = self.running_node()
        self.attach(node.instance_id)
        self.clock.sleep(self.fleet.timings.boot_to_standby + 30)
        assert node.phase == "serving", node.log
        return node

    def tags(self, instance_id: str) -> dict[str, str]:
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        return {t["Key"]: t["Value"] for t in reply["Reservations"][0]["Instances"][0].get("Tags", [])}

    def agent(self, instance_id: str, arguments: str, wait: float = 60.0) -> dict[str, Any]:
        """Send `spotforge-agent <arguments>` through SSM Run Command and wait (virtually) for it."""
        command = self.ssm.send_command(
            InstanceIds=[instance_id],
            DocumentName="AWS-RunShellScript",
            Parameters={"commands": [f"/opt/spotforge/bin/spotforge-agent {arguments}"]},
        )["Command"]["CommandId"]
        self.clock.sleep(wait)
        return self.ssm.get_command_invocation(CommandId=command, InstanceId=instance_id)

    def volume_state(self, volume_id: str | None = None) -> tuple[str, list[str]]:
        volume = self.ec2.describe_volumes(VolumeIds=[volume_id or self.region.volume_id])["Volumes"][0]
        return volume["State"], [a["State"] for a in volume.get("Attachments", [])]


def make_fleet(world_emu: Emulator, region: Region, root: Path, volume_id: str | None = None) -> NodeFleet:
    env = NodeEnv(region.stack, region.region, region.bucket, volume_id or region.volume_id)
    fleet = NodeFleet(world_emu, root, env, NodeTimings(), standin_now=world_emu.clock.now)
    fleet.install()
    return fleet
