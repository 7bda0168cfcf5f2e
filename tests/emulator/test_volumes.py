from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from .conftest import World


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def test_attach_across_availability_zones_is_refused_with_zone_mismatch(world: World) -> None:
    other_az = world.launch_ready(world.subnet_b)
    with pytest.raises(ClientError) as exc:
        world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=other_az, Device="/dev/sdf")
    assert _code(exc) == "InvalidVolume.ZoneMismatch"
    assert world.volume()["State"] == "available"


def test_attach_goes_through_attaching_before_attached(world: World) -> None:
    node = world.launch_ready()
    answer = world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=node, Device="/dev/sdf")
    assert answer["State"] == "attaching"
    volume = world.volume()
    assert volume["State"] == "in-use"
    assert volume["Attachments"][0]["State"] == "attaching"
    world.emu.clock.sleep(world.emu.latency.attach)
    assert world.volume()["Attachments"][0]["State"] == "attached"
    assert world.emu.node(node).attached == {world.data_volume: "/dev/sdf"}


def test_a_volume_attached_or_attaching_to_one_instance_cannot_be_attached_to_another(world: World) -> None:
    first = world.launch_ready()
    second = world.launch_ready()
    world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=first, Device="/dev/sdf")
    with pytest.raises(ClientError) as attaching:
        world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=second, Device="/dev/sdf")
    world.emu.clock.sleep(10)
    with pytest.raises(ClientError) as attached:
        world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=second, Device="/dev/sdf")
    assert _code(attaching) == _code(attached) == "VolumeInUse"
    assert [a["InstanceId"] for a in world.volume()["Attachments"]] == [first]


def test_attach_is_refused_while_the_volume_is_detaching_or_the_instance_is_not_running(world: World) -> None:
    first = world.launch_ready()
    second = world.launch_ready()
    world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=first, Device="/dev/sdf")
    world.emu.clock.sleep(10)
    world.ec2.detach_volume(VolumeId=world.data_volume)
    with pytest.raises(ClientError) as detaching:
        world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=second, Device="/dev/sdf")
    assert _code(detaching) == "IncorrectState"
    world.emu.clock.sleep(10)
    pending = world.launch()
    with pytest.raises(ClientError) as not_running:
        world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=pending, Device="/dev/sdf")
    assert _code(not_running) == "IncorrectState"
    world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=second, Device="/dev/sdf")


def test_attach_names_the_missing_volume_or_instance(world: World) -> None:
    node = world.launch_ready()
    with pytest.raises(ClientError) as no_volume:
        world.ec2.attach_volume(VolumeId="vol-0123456789abcdef0", InstanceId=node, Device="/dev/sdf")
    with pytest.raises(ClientError) as no_instance:
        world.ec2.attach_volume(
            VolumeId=world.data_volume, InstanceId="i-0123456789abcdef0", Device="/dev/sdf"
        )
    assert _code(no_volume) == "InvalidVolume.NotFound"
    assert _code(no_instance) == "InvalidInstanceID.NotFound"


def _attached(world: World) -> str:
    node = world.launch_ready()
    world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=node, Device="/dev/sdf")
    world.emu.clock.sleep(world.emu.latency.attach)
    return node


def test_detach_goes_through_detaching_to_available(world: World) -> None:
    _attached(world)
    answer = world.ec2.detach_volume(VolumeId=world.data_volume)
    assert answer["State"] == "detaching"
    assert world.volume()["Attachments"][0]["State"] == "detaching"
    world.emu.clock.sleep(world.emu.latency.detach)
    volume = world.volume()
    assert volume["State"] == "available" and volume["Attachments"] == []


def test_detach_of_a_volume_that_is_not_attached_is_incorrect_state(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.ec2.detach_volume(VolumeId=world.data_volume)
    assert _code(exc) == "IncorrectState"


def test_a_mounted_volume_stays_detaching_until_the_node_unmounts_it(world: World) -> None:
    node_id = _attached(world)
    node = world.emu.node(node_id)
    node.mount(world.data_volume)
    world.ec2.detach_volume(VolumeId=world.data_volume)
    world.emu.clock.sleep(600)
    assert world.volume()["Attachments"][0]["State"] == "detaching"
    node.unmount(world.data_volume)
    world.emu.clock.sleep(1.5)
    assert world.volume()["State"] == "available"
    assert world.emu.violations == []


def test_force_detach_from_a_node_that_still_has_it_mounted_is_a_violation(world: World) -> None:
    node_id = _attached(world)
    world.emu.node(node_id).mount(world.data_volume)
    world.ec2.detach_volume(VolumeId=world.data_volume, Force=True)
    world.emu.clock.sleep(world.emu.latency.detach)
    assert world.volume()["State"] == "available"
    assert [v.kind for v in world.emu.violations] == ["force-detach-mounted"]


def test_force_detach_of_an_unmounted_volume_is_no_violation(world: World) -> None:
    _attached(world)
    world.ec2.detach_volume(VolumeId=world.data_volume, Force=True)
    world.emu.clock.sleep(world.emu.latency.detach)
    assert world.volume()["State"] == "available"
    assert world.emu.violations == []


def test_deleting_the_data_volume_is_recorded_as_a_violation_and_in_use_volumes_cannot_be_deleted(
    world: World,
) -> None:
    _attached(world)
    with pytest.raises(ClientError) as exc:
        world.ec2.delete_volume(VolumeId=world.data_volume)
    assert _code(exc) == "VolumeInUse"
    scratch = world.ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    world.ec2.delete_volume(VolumeId=scratch)
    assert world.emu.violations == []
    world.ec2.detach_volume(VolumeId=world.data_volume)
    world.emu.clock.sleep(5)
    world.ec2.delete_volume(VolumeId=world.data_volume)
    assert [v.kind for v in world.emu.violations] == ["data-volume-deleted"]


def test_a_terminated_instance_releases_its_volume_only_at_termination(world: World) -> None:
    node = _attached(world)
    world.ec2.terminate_instances(InstanceIds=[node])
    assert world.volume()["Attachments"][0]["State"] == "detaching"
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated - 1)
    assert world.volume()["State"] == "in-use"
    world.emu.clock.sleep(1)
    assert world.volume()["State"] == "available"
    assert world.state(node) == "terminated"
    # the root volume went with the instance (DeleteOnTermination); the data volume stayed
    assert [v["VolumeId"] for v in world.ec2.describe_volumes()["Volumes"]] == [world.data_volume]
