from __future__ import annotations

from datetime import timedelta

import pytest
from botocore.exceptions import ClientError

from drill.emulator import DirectoryNode

from .conftest import World


def _code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return exc.value.response["Error"]["Code"]


def test_spot_options_inside_the_launch_template_make_a_spot_instance(world: World) -> None:
    spot = world.launch()
    on_demand_template = world.ec2.create_launch_template(
        LaunchTemplateName="plain",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t4g.small"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    plain = world.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateId": on_demand_template},
        MinCount=1,
        MaxCount=1,
        SubnetId=world.subnet_a,
    )["Instances"][0]["InstanceId"]
    assert world.emu.market_of(spot) == "spot"
    assert world.instance(spot)["InstanceLifecycle"] == "spot"
    assert world.emu.market_of(plain) == "on-demand"
    assert "InstanceLifecycle" not in world.instance(plain)


def test_market_options_in_the_request_override_the_template(world: World) -> None:
    spot = world.ec2.create_launch_template(
        LaunchTemplateName="plain",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "t4g.small"},
    )["LaunchTemplate"]["LaunchTemplateId"]
    instance = world.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateId": spot},
        InstanceMarketOptions={"MarketType": "spot"},
        MinCount=1,
        MaxCount=1,
        SubnetId=world.subnet_a,
    )["Instances"][0]["InstanceId"]
    assert world.emu.market_of(instance) == "spot"


def test_tags_come_from_the_request_and_the_template(world: World) -> None:
    instance = world.launch(
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "spotforge:phase", "Value": "booting"}]}
        ]
    )
    tags = {t["Key"]: t["Value"] for t in world.instance(instance)["Tags"]}
    assert tags["spotforge:role"] == "node"
    assert tags["spotforge:phase"] == "booting"


def test_a_new_instance_is_pending_until_the_model_says_it_runs_and_then_its_node_boots(world: World) -> None:
    booted: list[tuple[str, object]] = []
    make = DirectoryNode.factory(world.emu._tmp.name)  # type: ignore[union-attr]

    def factory(instance_id: str, emu: object) -> DirectoryNode:
        booted.append((instance_id, world.emu.clock.now()))
        return make(instance_id, emu)  # type: ignore[arg-type]

    world.emu.set_node_factory(factory)
    start = world.emu.clock.now()
    answer = world.ec2.run_instances(
        LaunchTemplate={"LaunchTemplateId": world.template_id},
        MinCount=1,
        MaxCount=1,
        SubnetId=world.subnet_a,
    )
    instance = answer["Instances"][0]["InstanceId"]
    assert answer["Instances"][0]["State"]["Name"] == "pending"
    assert world.state(instance) == "pending"
    world.emu.clock.sleep(world.emu.latency.run_to_running - 0.5)
    assert world.state(instance) == "pending" and booted == []
    world.emu.clock.sleep(0.5)
    assert world.state(instance) == "running"
    assert booted == [(instance, start + timedelta(seconds=world.emu.latency.run_to_running))]


def test_the_same_client_token_returns_the_same_instance_without_a_second_launch(world: World) -> None:
    first = world.launch(token="launch-1")
    second = world.launch(token="launch-1")
    assert first == second
    reservations = world.ec2.describe_instances()["Reservations"]
    assert [i["InstanceId"] for r in reservations for i in r["Instances"]] == [first]
    third = world.launch(token="launch-2")
    assert third != first


def test_a_reused_client_token_with_different_parameters_is_refused(world: World) -> None:
    world.launch(token="launch-1")
    with pytest.raises(ClientError) as exc:
        world.launch(subnet=world.subnet_b, token="launch-1")
    assert _code(exc) == "IdempotentParameterMismatch"


def test_capacity_faults_apply_per_type_zone_and_market(world: World) -> None:
    world.emu.faults.capacity(instance_type="t4g.small", az="us-east-1a", market="spot")
    with pytest.raises(ClientError) as exc:
        world.launch()
    assert _code(exc) == "InsufficientInstanceCapacity"
    assert world.ec2.describe_instances()["Reservations"] == []
    other_az = world.launch(subnet=world.subnet_b)
    on_demand = world.launch(InstanceMarketOptions={"MarketType": "spot"}, InstanceType="t4g.medium")
    assert world.emu.market_of(other_az) == world.emu.market_of(on_demand) == "spot"
    world.emu.faults.restore_capacity()
    assert world.launch()


@pytest.mark.parametrize("code", ["SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "Unsupported"])
def test_other_launch_refusals_can_be_configured(world: World, code: str) -> None:
    world.emu.faults.capacity(market="spot", code=code)
    with pytest.raises(ClientError) as exc:
        world.launch()
    assert _code(exc) == code


def test_user_termination_passes_through_shutting_down_with_the_user_reason(world: World) -> None:
    instance = world.launch_ready()
    answer = world.ec2.terminate_instances(InstanceIds=[instance])["TerminatingInstances"][0]
    assert answer["CurrentState"]["Name"] == "shutting-down"
    assert answer["PreviousState"]["Name"] == "running"
    assert world.state(instance) == "shutting-down"
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated)
    described = world.instance(instance)
    assert described["State"]["Name"] == "terminated"
    assert described["StateReason"]["Code"] == "Client.UserInitiatedShutdown"


def test_terminating_an_unknown_instance_is_refused(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.ec2.terminate_instances(InstanceIds=["i-0123456789abcdef0"])
    assert _code(exc) == "InvalidInstanceID.NotFound"


def test_an_interruption_warns_then_terminates_two_minutes_later_with_the_spot_reason(world: World) -> None:
    instance = world.launch_ready()
    world.emu.drain_events()
    warned_at = world.emu.clock.now()
    warning = world.emu.interrupt(instance, action="terminate")
    assert warning["detail"] == {"instance-id": instance, "instance-action": "terminate"}
    assert world.emu.imds_instance_action(instance) == {
        "action": "terminate",
        "time": (warned_at + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    world.emu.clock.sleep(119)
    assert world.state(instance) == "running"
    kinds = [e["detail-type"] for e in world.emu.drain_events()]
    assert kinds == ["EC2 Instance Rebalance Recommendation", "EC2 Spot Instance Interruption Warning"]
    world.emu.clock.sleep(1)
    assert world.state(instance) == "shutting-down"
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated)
    described = world.instance(instance)
    assert described["State"]["Name"] == "terminated"
    assert described["StateReason"]["Code"] == "Server.SpotInstanceTermination"


def test_a_stop_interruption_stops_the_instance_with_the_spot_shutdown_reason(world: World) -> None:
    instance = world.launch_ready()
    world.emu.interrupt(instance, action="stop")
    world.emu.clock.sleep(120 + world.emu.latency.stopping_to_stopped)
    described = world.instance(instance)
    assert described["State"]["Name"] == "stopped"
    assert described["StateReason"]["Code"] == "Server.SpotInstanceShutdown"


def test_an_unwarned_loss_terminates_without_any_warning(world: World) -> None:
    instance = world.launch_ready()
    world.emu.drain_events()
    world.emu.lose(instance)
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated + world.emu.latency.event_delivery)
    events = world.emu.drain_events()
    assert [e["detail"]["state"] for e in events] == ["shutting-down", "terminated"]
    assert world.emu.imds_instance_action(instance) is None
    assert world.instance(instance)["StateReason"]["Code"] == "Server.SpotInstanceTermination"


def test_every_state_transition_emits_a_state_change_event_after_the_delivery_latency(world: World) -> None:
    instance = world.launch()
    assert world.emu.events == []  # not delivered yet
    world.emu.clock.sleep(world.emu.latency.event_delivery)
    assert [e["detail"]["state"] for e in world.emu.events] == ["pending"]
    world.emu.clock.sleep(world.emu.latency.run_to_running)
    world.ec2.terminate_instances(InstanceIds=[instance])
    world.emu.clock.sleep(world.emu.latency.shutting_down_to_terminated + world.emu.latency.event_delivery)
    events = world.emu.drain_events()
    assert [e["detail"]["state"] for e in events] == ["pending", "running", "shutting-down", "terminated"]
    assert all(e["detail"]["instance-id"] == instance for e in events)
    assert world.emu.events == []


def test_only_running_spot_instances_can_be_interrupted(world: World) -> None:
    from drill.emulator import EmulatorError

    pending = world.launch()
    with pytest.raises(EmulatorError):
        world.emu.interrupt(pending)


def test_a_launch_into_an_unknown_subnet_is_answered_with_the_aws_error(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.launch(subnet="subnet-0123456789abcdef0")
    assert _code(exc) == "InvalidSubnetID.NotFound"


def test_a_stopped_spot_instance_starts_again_through_pending_and_keeps_its_node(world: World) -> None:
    instance = world.launch_ready()
    node = world.emu.node(instance)
    world.emu.interrupt(instance, action="stop")
    world.emu.clock.sleep(120 + world.emu.latency.stopping_to_stopped)
    answer = world.ec2.start_instances(InstanceIds=[instance])["StartingInstances"][0]
    assert (answer["PreviousState"]["Name"], answer["CurrentState"]["Name"]) == ("stopped", "pending")
    world.emu.clock.sleep(world.emu.latency.run_to_running)
    assert world.state(instance) == "running"
    assert world.emu.node(instance) is node


def test_a_dry_run_termination_changes_nothing(world: World) -> None:
    instance = world.launch_ready()
    with pytest.raises(ClientError) as exc:
        world.ec2.terminate_instances(InstanceIds=[instance], DryRun=True)
    assert _code(exc) == "DryRunOperation"
    world.emu.clock.sleep(120)
    assert world.state(instance) == "running"


def test_a_launch_from_an_unknown_template_is_answered_with_the_aws_error(world: World) -> None:
    with pytest.raises(ClientError) as exc:
        world.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": "lt-0123456789abcdef0"}, MinCount=1, MaxCount=1
        )
    assert _code(exc) == "InvalidLaunchTemplateId.NotFound"
