from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from .conftest import World


def _attach(world: World, node: str) -> None:
    world.ec2.attach_volume(VolumeId=world.data_volume, InstanceId=node, Device="/dev/sdf")


def test_ec2_throttling_fails_exactly_the_given_number_of_calls(instant_world: World) -> None:
    world = instant_world
    node = world.launch_ready()
    world.emu.faults.throttle("AttachVolume", times=2)
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            _attach(world, node)
        assert exc.value.response["Error"]["Code"] == "RequestLimitExceeded"
    assert world.volume()["State"] == "available"
    _attach(world, node)
    assert world.volume()["State"] == "in-use"


def test_ssm_throttling_uses_the_ssm_code(instant_world: World) -> None:
    world = instant_world
    node = world.launch_ready()
    world.emu.faults.throttle("SendCommand", service="ssm")
    with pytest.raises(ClientError) as exc:
        world.ssm.send_command(
            InstanceIds=[node], DocumentName="AWS-RunShellScript", Parameters={"commands": ["status"]}
        )
    assert exc.value.response["Error"]["Code"] == "ThrottlingException"


def test_any_error_code_can_be_injected_for_any_operation_until_cleared(instant_world: World) -> None:
    world = instant_world
    world.emu.faults.fail("DescribeVolumes", code="InternalError", times=None)
    for _ in range(3):
        with pytest.raises(ClientError) as exc:
            world.volume()
        assert exc.value.response["Error"]["Code"] == "InternalError"
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    world.emu.faults.clear()
    assert world.volume()["VolumeId"] == world.data_volume


def test_a_fault_on_one_operation_leaves_the_others_alone(instant_world: World) -> None:
    world = instant_world
    world.emu.faults.fail("AttachVolume", code="RequestLimitExceeded", times=1)
    assert world.volume()["State"] == "available"
    assert world.launch()
