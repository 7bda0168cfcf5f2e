from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from .conftest import World


def test_associating_an_address_held_elsewhere_needs_allow_reassociation(world: World) -> None:
    old = world.launch_ready()
    new = world.launch_ready()
    world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=old)
    with pytest.raises(ClientError) as exc:
        world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=new)
    assert exc.value.response["Error"]["Code"] == "Resource.AlreadyAssociated"
    world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=new, AllowReassociation=True)
    address = world.ec2.describe_addresses(AllocationIds=[world.allocation_id])["Addresses"][0]
    assert address["InstanceId"] == new


def test_traffic_follows_a_moved_address_only_after_the_eip_latency(world: World) -> None:
    old = world.launch_ready()
    new = world.launch_ready()
    world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=old)
    world.emu.clock.sleep(world.emu.latency.eip_move)
    assert world.emu.address_target(world.public_ip) == old
    world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=new, AllowReassociation=True)
    world.emu.clock.sleep(world.emu.latency.eip_move - 0.1)
    assert world.emu.address_target(world.public_ip) == old
    world.emu.clock.sleep(0.1)
    assert world.emu.address_target(world.public_ip) == new


def test_an_address_routes_nowhere_once_its_instance_is_gone(world: World) -> None:
    node = world.launch_ready()
    world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=node)
    world.emu.clock.sleep(world.emu.latency.eip_move)
    world.ec2.terminate_instances(InstanceIds=[node])
    assert world.emu.address_target(world.public_ip) is None
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated)
    address = world.ec2.describe_addresses(AllocationIds=[world.allocation_id])["Addresses"][0]
    assert "InstanceId" not in address or not address["InstanceId"]


def test_an_address_cannot_be_associated_with_a_pending_instance(world: World) -> None:
    pending = world.launch()
    with pytest.raises(ClientError) as exc:
        world.ec2.associate_address(AllocationId=world.allocation_id, InstanceId=pending)
    assert exc.value.response["Error"]["Code"] == "IncorrectInstanceState"
