from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError

from drill.emulator import Emulator, NodeResult

from .conftest import World

AGENT = "/opt/spotforge/bin/spotforge-agent"


def _send(world: World, instance_id: str, command: str, **extra: Any) -> str:
    return world.ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": [command], **extra},
    )["Command"]["CommandId"]


def _invocation(world: World, command_id: str, instance_id: str) -> dict[str, Any]:
    return world.ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)


def test_commands_to_an_instance_without_a_registered_agent_are_refused(world: World) -> None:
    pending = world.launch()
    with pytest.raises(ClientError) as before_running:
        _send(world, pending, f"{AGENT} status")
    world.emu.clock.sleep(world.emu.latency.run_to_running)
    with pytest.raises(ClientError) as before_agent:
        _send(world, pending, f"{AGENT} status")
    assert before_running.value.response["Error"]["Code"] == "InvalidInstanceId"
    assert before_agent.value.response["Error"]["Code"] == "InvalidInstanceId"
    world.emu.clock.sleep(world.emu.latency.ssm_registered_after_running)
    assert _send(world, pending, f"{AGENT} status")


def test_commands_to_stopped_or_terminated_instances_are_refused(world: World) -> None:
    node = world.launch_ready()
    world.ec2.terminate_instances(InstanceIds=[node])
    with pytest.raises(ClientError) as shutting_down:
        _send(world, node, f"{AGENT} status")
    world.emu.clock.sleep(120)
    with pytest.raises(world.ssm.exceptions.InvalidInstanceId):
        _send(world, node, f"{AGENT} status")
    assert shutting_down.value.response["Error"]["Code"] == "InvalidInstanceId"


def test_a_command_really_runs_on_the_node_and_reports_in_progress_until_it_is_done(world: World) -> None:
    node = world.launch_ready()
    command_id = _send(world, node, f"{AGENT} status")
    with pytest.raises(ClientError) as too_soon:
        _invocation(world, command_id, node)
    assert too_soon.value.response["Error"]["Code"] == "InvocationDoesNotExist"
    world.emu.clock.sleep(world.emu.latency.ssm_invocation_visible)
    assert _invocation(world, command_id, node)["Status"] == "Pending"
    assert world.emu.node(node).commands == []
    lat = world.emu.latency
    world.emu.clock.sleep(lat.ssm_command_delivery - lat.ssm_invocation_visible)
    assert world.emu.node(node).commands == [[AGENT, "status"]]
    assert _invocation(world, command_id, node)["Status"] == "InProgress"
    world.emu.clock.sleep(world.emu.node(node).command_seconds)
    done = _invocation(world, command_id, node)
    assert done["Status"] == "Success" and done["ResponseCode"] == 0
    assert json.loads(done["StandardOutputContent"])["instance_id"] == node
    listed = world.ssm.list_command_invocations(CommandId=command_id, Details=True)["CommandInvocations"]
    assert [(i["InstanceId"], i["Status"]) for i in listed] == [(node, "Success")]
    assert listed[0]["CommandPlugins"][0]["ResponseCode"] == 0


def test_a_failing_command_reports_failed_with_its_exit_code_and_stderr(instant_world: World) -> None:
    world = instant_world
    node = world.launch_ready()
    command_id = _send(world, node, "no-such-tool --flag")
    world.emu.clock.sleep(1)
    done = _invocation(world, command_id, node)
    assert (done["Status"], done["ResponseCode"]) == ("Failed", 127)
    assert "no-such-tool" in done["StandardErrorContent"]


class _SlowNode:
    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def run_command(self, argv: list[str]) -> NodeResult:
        return NodeResult(0, "ok\n", "", self.seconds)


def test_a_command_longer_than_its_execution_timeout_times_out(instant_world: World) -> None:
    world = instant_world
    world.emu.set_node_factory(lambda instance_id, emu: _SlowNode(90.0))
    node = world.launch_ready()
    command_id = _send(world, node, f"{AGENT} drain --deadline 25", executionTimeout=["30"])
    world.emu.clock.sleep(29)
    assert _invocation(world, command_id, node)["Status"] == "InProgress"
    world.emu.clock.sleep(1)
    done = _invocation(world, command_id, node)
    assert (done["Status"], done["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")


def test_a_hanging_command_times_out_at_the_execution_timeout(instant_world: World) -> None:
    world = instant_world
    world.emu.set_node_factory(lambda instance_id, emu: _SlowNode(None))
    node = world.launch_ready()
    command_id = _send(world, node, f"{AGENT} backup", executionTimeout=["60"])
    world.emu.clock.sleep(59)
    assert _invocation(world, command_id, node)["Status"] == "InProgress"
    world.emu.clock.sleep(1)
    assert _invocation(world, command_id, node)["Status"] == "TimedOut"


def test_a_command_cut_short_by_termination_fails(world: World) -> None:
    world.emu.set_node_factory(lambda instance_id, emu: _SlowNode(300.0))
    node = world.launch_ready()
    command_id = _send(world, node, f"{AGENT} backup")
    world.emu.clock.sleep(10)
    world.emu.lose(node)
    world.emu.clock.sleep(1)
    assert _invocation(world, command_id, node)["Status"] == "Failed"


def test_the_emulator_type_hint_for_factories_accepts_the_emulator(world: World) -> None:
    seen: list[Emulator] = []

    def factory(instance_id: str, emu: Emulator) -> _SlowNode:
        seen.append(emu)
        return _SlowNode(1.0)

    world.emu.set_node_factory(factory)
    world.launch_ready()
    assert seen == [world.emu]
