"""observe, act and reconcile against plain moto (instant, permissive AWS) with a manual clock.

A tiny stand-in for the node agent runs when the controller sleeps: it tags running nodes
`standby` and the node holding the volume `serving`, and the fake Forgejo answers `pass` only
through the EIP of a running node that holds the data volume. Strict AWS behaviour (async
states, zone checks) is the emulator's job and is tested through it in tests/scenarios.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from spotforge_controller.act import mark_interruption, snapshot_for_rebalance
from spotforge_controller.clock import ManualClock
from spotforge_controller.config import Config
from spotforge_controller.errors import ConflictError, PermissionDeniedError, aws_call
from spotforge_controller.model import TAG_INTERRUPTION, TAG_PHASE
from spotforge_controller.observe import observe, parse_healthz, read_recovery
from spotforge_controller.reconcile import ReconcileResult, Trigger, reconcile
from spotforge_controller.runtime import HttpResponse, Runtime

START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
STACK = "sf-test"
LEASE_SECONDS = 120
PASS = json.dumps(
    {
        "status": "pass",
        "description": "Forgejo",
        "checks": {
            "cache:ping": [{"status": "pass", "time": "2026-12-04T12:00:00Z"}],
            "database:ping": [{"status": "pass", "time": "2026-12-04T12:00:00Z"}],
        },
    }
).encode()
FAIL = json.dumps(
    {
        "status": "fail",
        "description": "Forgejo",
        "checks": {"database:ping": [{"status": "fail", "time": "x"}]},
    }
).encode()


def _tags(**tags: str) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


class AgentClock(ManualClock):
    """A manual clock that lets the simulated node agents act whenever the controller waits."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
        self.on_sleep: list[Callable[[], None]] = []

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        for hook in self.on_sleep:
            hook()


@dataclass
class World:
    session: boto3.Session
    config: Config
    clock: AgentClock
    ami: str
    unhealthy: set[str] = field(default_factory=set)
    probes: list[str] = field(default_factory=list)
    # Building a boto3 client costs tens of milliseconds: share them across runs of one test.
    clients: dict[str, Any] = field(default_factory=dict)

    @property
    def ec2(self) -> Any:
        if "ec2" not in self.clients:
            self.clients["ec2"] = self.session.client("ec2")
        return self.clients["ec2"]

    def launch_template_of(self, instance_id: str) -> str | None:
        """The template moto recorded for the instance (its aws:ec2launchtemplate:id tag)."""
        tags = {t["Key"]: t["Value"] for t in self.instances()[instance_id].get("Tags", [])}
        return tags.get("aws:ec2launchtemplate:id")

    def runtime(self, **overrides: Any) -> Runtime:
        config = overrides.pop("config", self.config)
        return Runtime(
            config=config,
            session=self.session,
            clock=self.clock,
            http_get=self.http_get,
            _clients=dict(self.clients),
            **overrides,
        )

    def launch_node(self, phase: str = "serving", version: str = "1", **extra: str) -> str:
        tags = {
            "spotforge:stack": self.config.stack_name,
            "spotforge:role": "node",
            TAG_PHASE: phase,
            "spotforge:lt-version": version,
        }
        tags.update(extra)
        reply = self.ec2.run_instances(
            LaunchTemplate={"LaunchTemplateId": self.config.launch_template_id, "Version": version},
            MinCount=1,
            MaxCount=1,
            SubnetId=self.config.subnets["us-east-1a"],
            TagSpecifications=[{"ResourceType": "instance", "Tags": _tags(**tags)}],
        )
        return str(reply["Instances"][0]["InstanceId"])

    def serve_from(self, instance_id: str) -> None:
        self.ec2.attach_volume(VolumeId=self.config.data_volume_id, InstanceId=instance_id, Device="/dev/sdf")
        self.ec2.associate_address(AllocationId=self.config.eip_allocation_id, InstanceId=instance_id)

    def holder(self) -> str | None:
        volume = self.ec2.describe_volumes(VolumeIds=[self.config.data_volume_id])["Volumes"][0]
        attached = [a["InstanceId"] for a in volume["Attachments"] if a["State"] == "attached"]
        return attached[0] if attached else None

    def eip_target(self) -> str | None:
        address = self.ec2.describe_addresses(AllocationIds=[self.config.eip_allocation_id])["Addresses"][0]
        return address.get("InstanceId")

    def instances(self) -> dict[str, dict[str, Any]]:
        reply = self.ec2.describe_instances(
            Filters=[{"Name": "tag:spotforge:stack", "Values": [self.config.stack_name]}]
        )
        return {i["InstanceId"]: i for r in reply["Reservations"] for i in r["Instances"]}

    def tags_of(self, instance_id: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.instances()[instance_id].get("Tags", [])}

    def running(self) -> list[str]:
        return sorted(i for i, d in self.instances().items() if d["State"]["Name"] in ("pending", "running"))

    def agents_tick(self) -> None:
        holder = self.holder()
        for instance_id, data in self.instances().items():
            if data["State"]["Name"] != "running":
                continue
            phase = self.tags_of(instance_id).get(TAG_PHASE)
            if instance_id == holder and phase in ("booting", "standby"):
                new = "serving"
            elif phase == "booting":
                new = "standby"
            else:
                continue
            self.ec2.create_tags(Resources=[instance_id], Tags=_tags(**{TAG_PHASE: new}))

    def http_get(self, url: str, timeout: float, host: str | None = None) -> HttpResponse:
        self.probes.append(url)
        target = self.eip_target()
        if target is None:
            raise OSError("connection timed out")
        if target != self.holder() or target in self.unhealthy:
            return HttpResponse(424, FAIL)
        return HttpResponse(200, PASS)


@pytest.fixture(scope="module")
def moto_session() -> Iterator[boto3.Session]:
    # One in-process moto for the module keeps the folder fast; each test builds its own stack.
    with mock_aws():
        yield boto3.Session(region_name="us-east-1")


_counter = itertools.count()


@pytest.fixture
def world(moto_session: boto3.Session) -> World:
    session = moto_session
    n = next(_counter)
    stack = f"{STACK}-{n}"
    ec2 = session.client("ec2")
    # moto does not check image ids; skipping DescribeImages saves seconds per test.
    ami = "ami-0123456789abcdef0"
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = {
        az: ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"]
        for az, cidr in (("us-east-1a", "10.0.1.0/24"), ("us-east-1b", "10.0.2.0/24"))
    }
    node_data: dict[str, Any] = {"ImageId": ami, "InstanceType": "t4g.small"}
    spot = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time"}}
    template = ec2.create_launch_template(
        LaunchTemplateName=f"node-{n}", LaunchTemplateData={**node_data, "InstanceMarketOptions": spot}
    )["LaunchTemplate"]["LaunchTemplateId"]
    on_demand_template = ec2.create_launch_template(
        LaunchTemplateName=f"node-on-demand-{n}", LaunchTemplateData=node_data
    )["LaunchTemplate"]["LaunchTemplateId"]
    volume = ec2.create_volume(
        AvailabilityZone="us-east-1a",
        Size=20,
        Encrypted=True,
        VolumeType="gp3",
        TagSpecifications=[
            {"ResourceType": "volume", "Tags": _tags(**{"spotforge:stack": stack, "spotforge:role": "data"})}
        ],
    )["VolumeId"]
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    dynamodb = session.client("dynamodb")
    dynamodb.create_table(
        TableName=f"state-{n}",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    config = Config(
        stack_name=stack,
        launch_template_id=template,
        on_demand_launch_template_id=on_demand_template,
        subnets=subnets,
        data_volume_id=volume,
        eip_allocation_id=allocation,
        backup_bucket="backups",
        state_table=f"state-{n}",
        topic_arn="arn:aws:sns:us-east-1:123456789012:alerts",
        instance_types=("t4g.small", "t4g.medium"),
    )
    clock = AgentClock(START)
    clients = {"ec2": ec2, "dynamodb": dynamodb, "ssm": session.client("ssm")}
    built = World(session=session, config=config, clock=clock, ami=ami, clients=clients)
    clock.on_sleep.append(built.agents_tick)
    return built


@pytest.fixture
def serving(world: World) -> str:
    instance_id = world.launch_node()
    world.serve_from(instance_id)
    return instance_id


def run(world: World, trigger: Trigger, budget: float = 300, **overrides: Any) -> ReconcileResult:
    runtime = world.runtime(**overrides)
    return reconcile(runtime, trigger, until=world.clock.now() + timedelta(seconds=budget))


def kinds(result: ReconcileResult) -> list[str]:
    return [h.kind for h in result.happenings]


def done(result: ReconcileResult) -> list[str]:
    return [e.action.kind for e in result.actions if e.outcome == "done"]


# ---------------------------------------------------------------- observe


def test_observe_reads_nodes_volume_address_template_and_records(world: World, serving: str) -> None:
    observed = observe(world.runtime())
    (node,) = observed.nodes
    assert (node.instance_id, node.state, node.phase, node.lt_version, node.az) == (
        serving,
        "running",
        "serving",
        1,
        "us-east-1a",
    )
    assert observed.volume.holder is not None and observed.volume.holder.instance_id == serving
    assert observed.volume.az == "us-east-1a"
    assert observed.address.instance_id == serving
    assert observed.latest_lt_version == 1
    assert observed.recovery is None
    assert observed.probe is not None and observed.probe.status == "pass"
    assert observed.probe.url == f"http://{observed.address.public_ip}/api/healthz"


def test_observe_ignores_instances_of_other_stacks(world: World, serving: str) -> None:
    world.ec2.run_instances(
        ImageId=world.ami,
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": _tags(**{"spotforge:stack": "other", "spotforge:role": "node"}),
            }
        ],
    )
    assert [n.instance_id for n in observe(world.runtime()).nodes] == [serving]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(200, PASS, "pass", id="pass-with-passing-checks"),
        pytest.param(
            200, b'{"status": "warn", "description": "Forgejo"}', "warn", id="warn-is-reported-as-warn"
        ),
        pytest.param(424, FAIL, "fail", id="failed-dependency-with-failed-check"),
        pytest.param(200, b"<html>Forgejo</html>", "invalid", id="http-200-html-is-not-health"),
        pytest.param(200, b'{"ok": true}', "invalid", id="json-without-status-is-not-health"),
        pytest.param(
            200,
            b'{"status": "pass", "checks": {"database:ping": [{"status": "fail"}]}}',
            "fail",
            id="pass-with-a-failed-check-is-fail",
        ),
        pytest.param(502, b'{"status": "pass"}', "fail", id="pass-body-behind-a-proxy-error-is-fail"),
    ],
)
def test_healthz_parsing_reads_the_json_not_the_status_code(status: int, body: bytes, expected: str) -> None:
    parsed, _, detail = parse_healthz(status, body)
    assert parsed == expected
    if expected in ("fail", "invalid"):
        assert detail


def test_probe_of_a_silent_node_is_unreachable(world: World, serving: str) -> None:
    def refuse(url: str, timeout: float) -> HttpResponse:
        raise ConnectionRefusedError("connection refused")

    runtime = replace(world.runtime(), http_get=refuse)
    probe = observe(runtime).probe
    assert probe is not None and (probe.status, probe.ok) == ("unreachable", False)


def test_probe_with_a_domain_asks_the_node_behind_the_eip_by_name_and_reads_certificate_expiry(
    world: World, serving: str
) -> None:
    config = replace(world.config, domain="git.example.com")
    hosts: list[str | None] = []

    def http_get(url: str, timeout: float, host: str | None = None) -> HttpResponse:
        hosts.append(host)
        return world.http_get(url, timeout)

    runtime = replace(
        world.runtime(config=config, cert_expiry=lambda host, timeout: START + timedelta(days=20, hours=12)),
        http_get=http_get,
    )
    probe = observe(runtime).probe
    assert probe is not None
    # Not through DNS: a record the user has not created yet must not look like a sick Forgejo.
    assert probe.url == f"https://{observe(runtime).address.public_ip}/api/healthz"
    assert hosts[0] == "git.example.com"
    assert probe.ok and probe.cert_days_left == pytest.approx(20.5)


def test_a_domain_without_dns_or_certificate_yet_still_reads_as_healthy(world: World, serving: str) -> None:
    def no_certificate(host: str, timeout: float) -> datetime:
        raise OSError(f"{host}: Name or service not known")

    runtime = world.runtime(
        config=replace(world.config, domain="git.example.com"), cert_expiry=no_certificate
    )
    probe = observe(runtime).probe
    assert probe is not None and probe.ok and probe.cert_days_left is None


# ---------------------------------------------------------------- flows through reconcile


def test_first_deploy_launches_attaches_and_serves(world: World) -> None:
    result = run(world, Trigger("deploy"))
    assert result.settled and result.lease_held
    (node,) = world.running()
    tags = world.tags_of(node)
    assert tags["spotforge:lt-version"] == "1"
    assert tags["spotforge:launch-token"].startswith("sf-")
    # Plain moto ignores a template's market options (the strict emulator honours them): check the
    # launch went through the spot template.
    assert world.launch_template_of(node) == world.config.launch_template_id
    assert world.instances()[node]["Placement"]["AvailabilityZone"] == "us-east-1a"
    assert world.holder() == node and world.eip_target() == node
    assert kinds(result)[0] == "node-missing"
    assert "recovery-complete" in kinds(result)
    recovery = read_recovery(world.runtime())
    assert recovery is not None and recovery.status == "closed"


def test_warned_interruption_hands_off_before_the_termination(world: World, serving: str) -> None:
    warned_at = world.clock.now()
    result = run(world, Trigger("interruption", serving, {"time": warned_at.isoformat()}), budget=150)
    assert result.settled
    (replacement,) = world.running()
    assert replacement != serving
    assert world.holder() == replacement and world.eip_target() == replacement
    assert world.instances()[serving]["State"]["Name"] == "terminated"
    assert world.tags_of(serving)[TAG_INTERRUPTION].startswith("2026-12-04T12:00:00")
    assert kinds(result) == [
        "interruption-started",
        "replacement-launched",
        "drain-started",
        "handoff-done",
        "recovery-complete",
    ]
    complete = result.happenings[-1]
    assert complete.data["cause"] == "spot-interruption"
    drain_started = next(h.at for h in result.happenings if h.kind == "drain-started")
    # moto is instant, so downtime is exactly the virtual time between drain start and health pass.
    assert complete.data["downtime_seconds"] == (complete.at - drain_started).total_seconds()
    steps = [step for _, step in complete.data["timeline"]]  # type: ignore[union-attr]
    assert steps[0] == "spot interruption warning"
    assert any(step.startswith("drain started") for step in steps)
    commands = world.clients["ssm"].list_commands(InstanceId=serving)["Commands"]
    assert [c["Parameters"]["commands"] for c in commands] == [
        ["/opt/spotforge/bin/spotforge-agent drain --deadline 25"]
    ]
    # The handoff waited for standby, not the 85 s deadline.
    assert (world.clock.now() - warned_at).total_seconds() < 85


def test_second_reconcile_makes_no_changes(world: World, serving: str) -> None:
    first = run(world, Trigger("interruption", serving, {"time": world.clock.now().isoformat()}))
    assert first.settled
    before = (world.running(), world.holder(), world.eip_target())
    second = run(world, Trigger("schedule"))
    assert second.settled
    assert second.actions == ()
    assert second.happenings == ()
    assert (world.running(), world.holder(), world.eip_target()) == before


def test_duplicate_and_late_warnings_change_nothing_after_recovery(world: World, serving: str) -> None:
    trigger = Trigger("interruption", serving, {"time": world.clock.now().isoformat()})
    run(world, trigger)
    after = (world.running(), world.holder())
    again = run(world, trigger)
    assert again.actions == ()
    assert (world.running(), world.holder()) == after


def test_foreign_instance_warning_is_ignored(world: World, serving: str) -> None:
    foreign = world.ec2.run_instances(ImageId=world.ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert not mark_interruption(world.runtime(), foreign, world.clock.now())
    result = run(world, Trigger("interruption", foreign))
    assert result.actions == ()
    tags = world.ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [foreign]}])["Tags"]
    assert tags == []
    assert not mark_interruption(world.runtime(), "i-0000000000000dead", world.clock.now())


def test_first_interruption_mark_wins(world: World, serving: str) -> None:
    runtime = world.runtime()
    assert mark_interruption(runtime, serving, START)
    assert mark_interruption(runtime, serving, START + timedelta(seconds=30))
    assert world.tags_of(serving)[TAG_INTERRUPTION] == "2026-12-04T12:00:00Z"


def test_unwarned_termination_is_healed(world: World, serving: str) -> None:
    world.ec2.terminate_instances(InstanceIds=[serving])
    result = run(world, Trigger("state-change", serving, {"state": "terminated"}))
    assert result.settled
    (replacement,) = world.running()
    assert world.holder() == replacement and world.eip_target() == replacement
    complete = result.happenings[-1]
    assert complete.kind == "recovery-complete"
    assert complete.data["cause"] == "instance-lost"  # moto reports a user-initiated shutdown


def test_planned_replacement_follows_a_new_launch_template_version(world: World, serving: str) -> None:
    world.ec2.create_launch_template_version(
        LaunchTemplateId=world.config.launch_template_id, LaunchTemplateData={"ImageId": world.ami}
    )
    result = run(world, Trigger("schedule"))
    assert result.settled
    (replacement,) = world.running()
    assert world.tags_of(replacement)["spotforge:lt-version"] == "2"
    assert world.holder() == replacement
    assert kinds(result)[0] == "replacement-planned"


def test_eip_moved_elsewhere_is_brought_back(world: World, serving: str) -> None:
    other = world.ec2.run_instances(ImageId=world.ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    world.ec2.associate_address(
        AllocationId=world.config.eip_allocation_id, InstanceId=other, AllowReassociation=True
    )
    result = run(world, Trigger("schedule"))
    assert world.eip_target() == serving
    assert kinds(result) == ["eip-reassociated"]
    foreign = world.ec2.describe_instances(InstanceIds=[other])["Reservations"][0]["Instances"][0]
    assert foreign["State"]["Name"] == "running", "an instance that is not ours is never terminated"


def test_failed_health_restarts_then_replaces(world: World, serving: str) -> None:
    world.unhealthy.add(serving)
    results = [run(world, Trigger("health"), budget=0) for _ in range(3)]
    assert "health-failed" in kinds(results[-1])
    assert done(results[-1]) == ["restart"]
    commands = world.clients["ssm"].list_commands(InstanceId=serving)["Commands"]
    assert commands[0]["Parameters"]["commands"] == ["/opt/spotforge/bin/spotforge-agent restart"]
    for _ in range(2):
        assert done(run(world, Trigger("health"), budget=0)) == []
    result = run(world, Trigger("health"))
    assert result.settled
    assert serving not in world.running()
    assert result.happenings[-1].data["cause"] == "health"


class Faulty:
    """Wraps a boto3 client, raising scripted ClientErrors for chosen operations."""

    def __init__(self, client: Any, faults: dict[str, Callable[[dict[str, Any]], str | None]]) -> None:
        self._client = client
        self._faults = faults
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._client, name)
        fault = self._faults.get(name)
        if fault is None:
            return real

        def call(**kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            code = fault(kwargs)
            if code:
                raise ClientError({"Error": {"Code": code, "Message": f"scripted {code}"}}, name)
            return real(**kwargs)

        return call


def test_capacity_shortage_moves_through_types_then_on_demand(world: World) -> None:
    ec2 = Faulty(
        world.ec2,
        {
            "run_instances": lambda kw: (
                "InsufficientInstanceCapacity"
                if kw["LaunchTemplate"]["LaunchTemplateId"] == world.config.launch_template_id
                else None
            )
        },
    )
    runtime = world.runtime()
    runtime._clients["ec2"] = ec2
    result = reconcile(runtime, Trigger("deploy"), until=world.clock.now() + timedelta(seconds=300))
    assert result.settled
    (node,) = world.running()
    assert world.launch_template_of(node) == world.config.on_demand_launch_template_id
    assert [e.outcome for e in result.actions if e.action.kind == "launch"] == [
        "capacity",
        "capacity",
        "done",
    ]
    recovery = read_recovery(runtime)
    assert recovery is not None and recovery.tried == ("spot:t4g.small", "spot:t4g.medium")


def test_no_capacity_anywhere_is_reported_and_not_restarted_by_the_next_run(world: World) -> None:
    ec2 = Faulty(world.ec2, {"run_instances": lambda kw: "InsufficientInstanceCapacity"})
    runtime = world.runtime()
    runtime._clients["ec2"] = ec2
    first = reconcile(runtime, Trigger("deploy"), until=world.clock.now() + timedelta(seconds=30))
    assert "capacity-unavailable" in kinds(first)
    assert ec2.calls["run_instances"] == 4
    second = reconcile(runtime, Trigger("schedule"))
    assert ec2.calls["run_instances"] == 4, "the tried choices are remembered"
    assert not second.settled
    world.clock.advance(130)
    ec2._faults.clear()
    third = reconcile(runtime, Trigger("schedule"), until=world.clock.now() + timedelta(seconds=300))
    assert third.settled and len(world.running()) == 1


def test_throttling_is_retried_with_backoff_on_the_clock(world: World) -> None:
    script = iter(["RequestLimitExceeded", "RequestLimitExceeded", None])
    ec2 = Faulty(world.ec2, {"describe_volumes": lambda kw: next(script, None)})
    world.clock.slept.clear()
    reply = aws_call(
        world.clock, "ec2:DescribeVolumes", ec2.describe_volumes, VolumeIds=[world.config.data_volume_id]
    )
    assert reply["Volumes"]
    assert world.clock.slept == [0.5, 1.0]


def test_missing_permission_ends_the_run_with_a_named_permission(world: World) -> None:
    ec2 = Faulty(world.ec2, {"run_instances": lambda kw: "UnauthorizedOperation"})
    runtime = world.runtime()
    runtime._clients["ec2"] = ec2
    result = reconcile(runtime, Trigger("deploy"), until=world.clock.now() + timedelta(seconds=30))
    assert not result.settled
    failed = result.happenings[-1]
    assert failed.kind == "recovery-failed"
    assert failed.data["permission"] == "ec2:RunInstances"
    with pytest.raises(PermissionDeniedError, match="ec2:RunInstances"):
        aws_call(world.clock, "ec2:RunInstances", ec2.run_instances, MinCount=1, MaxCount=1)


def test_unknown_errors_are_raised_unchanged(world: World) -> None:
    ec2 = Faulty(world.ec2, {"describe_volumes": lambda kw: "SomethingNew"})
    with pytest.raises(ClientError, match="SomethingNew"):
        aws_call(world.clock, "ec2:DescribeVolumes", ec2.describe_volumes, VolumeIds=["vol-1"])


def test_conflicts_are_sorted_for_the_loop(world: World) -> None:
    ec2 = Faulty(world.ec2, {"attach_volume": lambda kw: "VolumeInUse"})
    with pytest.raises(ConflictError):
        aws_call(
            world.clock,
            "ec2:AttachVolume",
            ec2.attach_volume,
            VolumeId="v",
            InstanceId="i",
            Device="/dev/sdf",
        )


def test_a_run_that_cannot_take_the_lease_does_nothing(world: World, serving: str) -> None:
    from spotforge_controller.lease import Lease

    assert Lease(world.runtime()).acquire()
    world.ec2.terminate_instances(InstanceIds=[serving])
    result = run(world, Trigger("state-change", serving))
    assert (result.lease_held, result.actions, result.settled) == (False, (), False)
    assert world.running() == []


def test_rebalance_takes_one_snapshot_per_node(world: World, serving: str) -> None:
    first = run(world, Trigger("rebalance", serving))
    second = run(world, Trigger("rebalance", serving))
    assert kinds(first) == ["rebalance-snapshot"]
    assert kinds(second) == []
    snapshots = world.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert [s["VolumeId"] for s in snapshots if s["VolumeId"] == world.config.data_volume_id] == [
        world.config.data_volume_id
    ]
    assert world.running() == [serving]


def test_rebalance_snapshots_beyond_the_newest_three_are_pruned(world: World) -> None:
    nodes = [world.launch_node() for _ in range(5)]
    for node in nodes:
        snapshot_for_rebalance(world.runtime(), node)
        world.clock.advance(60)
    ours = [
        s
        for s in world.ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
        if s["VolumeId"] == world.config.data_volume_id
    ]
    kept = sorted(
        {t["Value"] for s in ours for t in s.get("Tags", []) if t["Key"] == "spotforge:rebalance-of"}
    )
    assert len(ours) == 3
    # moto stamps StartTime with the wall clock (ties here), so only the newest is certain.
    assert nodes[-1] in kept


def test_destroy_terminates_every_node_and_keeps_the_volume(world: World, serving: str) -> None:
    result = run(world, Trigger("destroy"))
    assert result.settled
    assert world.running() == []
    assert world.ec2.describe_volumes(VolumeIds=[world.config.data_volume_id])["Volumes"]


def test_lasting_throttling_ends_the_run_unsettled_for_the_schedule_to_finish(world: World) -> None:
    ec2 = Faulty(world.ec2, {"run_instances": lambda kw: "RequestLimitExceeded"})
    runtime = world.runtime()
    runtime._clients["ec2"] = ec2
    result = reconcile(runtime, Trigger("deploy"), until=world.clock.now() + timedelta(seconds=60))
    assert (result.settled, result.lease_held) == (False, True)
    assert ec2.calls["run_instances"] == 5
    assert world.running() == []


def test_proactive_rebalance_hands_off_through_a_standby_replacement(world: World, serving: str) -> None:
    config = replace(world.config, proactive_rebalance=True)
    result = run(world, Trigger("rebalance", serving), config=config)
    assert result.settled
    (replacement,) = world.running()
    assert replacement != serving and world.holder() == replacement
    assert kinds(result)[:2] == ["rebalance-snapshot", "replacement-planned"]
    assert result.happenings[-1].data["cause"] == "rebalance"


def test_a_crash_right_after_launch_is_finished_by_the_next_run_without_a_second_launch(
    world: World, serving: str
) -> None:
    class CrashAfterLaunch:
        def __init__(self, client: Any) -> None:
            self._client = client

        def __getattr__(self, name: str) -> Any:
            return getattr(self._client, name)

        def run_instances(self, **kwargs: Any) -> Any:
            self._client.run_instances(**kwargs)
            raise RuntimeError("Lambda timed out before recording the launch")

    world.ec2.terminate_instances(InstanceIds=[serving])
    crashing = world.runtime()
    crashing._clients["ec2"] = CrashAfterLaunch(world.ec2)
    with pytest.raises(RuntimeError):
        reconcile(crashing, Trigger("state-change", serving), until=world.clock.now() + timedelta(seconds=60))
    # A real Lambda timeout skips the release; the lease expiring covers that case too.
    world.clock.advance(LEASE_SECONDS + 1)
    result = run(world, Trigger("schedule"))
    assert result.settled
    assert [e.action.kind for e in result.actions if e.action.kind == "launch"] == []
    (replacement,) = world.running()
    assert world.holder() == replacement
    assert [e.action.params.get("step") for e in result.actions if e.action.kind == "update-recovery"] == [
        "replacement-adopted"
    ]
