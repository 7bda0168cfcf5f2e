"""Every Lambda entry point through `handler(event, context, runtime=...)` on plain moto.

The world: one serving node of stack `sf` holding the data volume and the EIP, one foreign
instance (no tags) and one node of another stack. Forgejo's /api/healthz is a fake http_get.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from spotforge_controller.clock import ManualClock
from spotforge_controller.config import Config
from spotforge_controller.errors import ConfigError
from spotforge_controller.handlers import common, health, interruption, lifecycle, rebalance
from spotforge_controller.handlers import reconcile as reconcile_handler
from spotforge_controller.runtime import HttpResponse, Runtime

FIXTURES = Path(__file__).parent / "fixtures"
START = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
STACK = "sf"
TABLE = "sf-state"
BUCKET = "sf-backups"
HEALTHY = {
    "status": "pass",
    "description": "Forgejo: Beyond coding. We forge.",
    "checks": {
        "cache:ping": [{"status": "pass", "time": "2026-12-04T12:00:00Z"}],
        "database:ping": [{"status": "pass", "time": "2026-12-04T12:00:00Z"}],
    },
}


@dataclass
class World:
    runtime: Runtime
    clock: ManualClock
    session: boto3.Session
    node_id: str
    foreign_id: str
    other_stack_id: str
    volume_id: str
    allocation_id: str
    queue_url: str
    healthz: dict[str, Any] = field(default_factory=lambda: dict(HEALTHY))
    cert_not_after: datetime | None = None

    @property
    def ec2(self) -> Any:
        return self.session.client("ec2")

    def state(self, instance_id: str) -> str:
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        return reply["Reservations"][0]["Instances"][0]["State"]["Name"]

    def tags(self, instance_id: str) -> dict[str, str]:
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        return {t["Key"]: t["Value"] for t in reply["Reservations"][0]["Instances"][0].get("Tags", [])}

    def instance_ids(self) -> set[str]:
        reply = self.ec2.describe_instances()
        return {i["InstanceId"] for r in reply["Reservations"] for i in r["Instances"]}

    def inbox(self) -> list[dict[str, str]]:
        sqs = self.session.client("sqs")
        got = sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
        return [json.loads(m["Body"]) for m in got]

    def with_config(self, **changes: Any) -> Runtime:
        config = Config(**{**self.runtime.config.__dict__, **changes})
        return Runtime(config, self.session, self.clock, self.runtime.http_get, self.runtime.cert_expiry)


class FakeContext:
    """The slice of the Lambda context the handlers read."""

    def __init__(self, remaining_seconds: float = 900.0) -> None:
        self.remaining_ms = int(remaining_seconds * 1000)

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def _run(ec2: Any, image: str, subnet: str, lt_id: str, tags: dict[str, str]) -> str:
    spec: dict[str, Any] = {
        "ImageId": image,
        "MinCount": 1,
        "MaxCount": 1,
        "InstanceType": "t4g.small",
        "SubnetId": subnet,
    }
    if tags:
        spec["TagSpecifications"] = [
            {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
    if lt_id:
        spec["LaunchTemplate"] = {"LaunchTemplateId": lt_id, "Version": "1"}
    return ec2.run_instances(**spec)["Instances"][0]["InstanceId"]


# Any id will do: moto does not validate AMIs unless asked, and loading its default catalogue costs
# more than a second per test.
IMAGE = "ami-0123456789abcdef0"


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with mock_aws():
        session = boto3.Session(region_name="us-east-1")
        ec2 = session.client("ec2")
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")[
            "Subnet"
        ]["SubnetId"]
        image = IMAGE
        lt_id = ec2.create_launch_template(
            LaunchTemplateName="sf-node", LaunchTemplateData={"ImageId": image, "InstanceType": "t4g.small"}
        )["LaunchTemplate"]["LaunchTemplateId"]
        volume = ec2.create_volume(
            AvailabilityZone="us-east-1a",
            Size=20,
            VolumeType="gp3",
            TagSpecifications=[
                {
                    "ResourceType": "volume",
                    "Tags": [
                        {"Key": "spotforge:stack", "Value": STACK},
                        {"Key": "spotforge:role", "Value": "data"},
                    ],
                }
            ],
        )["VolumeId"]
        allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
        node = _run(
            ec2,
            image,
            subnet,
            lt_id,
            {
                "spotforge:stack": STACK,
                "spotforge:role": "node",
                "spotforge:phase": "serving",
                "spotforge:lt-version": "1",
            },
        )
        ec2.attach_volume(VolumeId=volume, InstanceId=node, Device="/dev/sdf")
        ec2.associate_address(AllocationId=allocation, InstanceId=node)
        foreign = _run(ec2, image, subnet, "", {})
        other = _run(ec2, image, subnet, "", {"spotforge:stack": "someone-else", "spotforge:role": "node"})

        ddb = session.client("dynamodb")
        ddb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        session.client("s3").create_bucket(Bucket=BUCKET)
        sns, sqs = session.client("sns"), session.client("sqs")
        topic = sns.create_topic(Name="sf-alerts")["TopicArn"]
        queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

        config = Config(
            stack_name=STACK,
            launch_template_id=lt_id,
            subnets={"us-east-1a": subnet},
            data_volume_id=volume,
            eip_allocation_id=allocation,
            backup_bucket=BUCKET,
            state_table=TABLE,
            topic_arn=topic,
            instance_types=("t4g.small", "t4g.medium"),
            on_demand_fallback=True,
        )
        clock = ManualClock(START)
        holder: dict[str, World] = {}

        def http_get(url: str, timeout: float, host: str | None = None) -> HttpResponse:
            body = holder["world"].healthz
            status = 200 if body.get("status") in ("pass", "warn") else 503
            return HttpResponse(status, json.dumps(body).encode())

        def cert_expiry(hostname: str, timeout: float) -> datetime:
            expires = holder["world"].cert_not_after
            if expires is None:
                raise OSError("no certificate")
            return expires

        runtime = Runtime(config, session, clock, http_get=http_get, cert_expiry=cert_expiry)
        built = World(runtime, clock, session, node, foreign, other, volume, allocation, queue_url)
        holder["world"] = built
        yield built


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def warning_for(instance_id: str) -> dict[str, Any]:
    event = load("spot-interruption-warning.json")
    event["detail"]["instance-id"] = instance_id
    event["time"] = START.isoformat().replace("+00:00", "Z")
    event["resources"] = [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"]
    return event


def rebalance_for(instance_id: str, event_id: str = "rb-1") -> dict[str, Any]:
    event = load("rebalance-recommendation.json")
    event["id"] = event_id
    event["detail"]["instance-id"] = instance_id
    return event


def state_change_for(instance_id: str, state: str) -> dict[str, Any]:
    event = load("instance-state-change.json")
    event["detail"] = {"instance-id": instance_id, "state": state}
    return event


def scheduled() -> dict[str, Any]:
    return {
        "version": "0",
        "id": "sched-1",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-12-04T12:00:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/sf-schedule"],
        "detail": {},
    }


def log_lines(out: str) -> list[dict[str, Any]]:
    lines = []
    for raw in out.splitlines():
        if raw.startswith("{") and '"level"' in raw:
            lines.append(json.loads(raw))
    return lines


def emf_records(out: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in out.splitlines() if raw.startswith("{") and '"_aws"' in raw]


ALL_EVENT_HANDLERS = [interruption.handler, rebalance.handler, reconcile_handler.handler, health.handler]


# ------------------------------------------------------------------ bad input: logged, nothing done


class Untouchable:
    """A runtime stand-in that fails the test on any use: ignored events must not reach AWS."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an ignored event touched runtime.{name}")


@pytest.mark.parametrize("handler", ALL_EVENT_HANDLERS)
@pytest.mark.parametrize(
    "event",
    [
        None,
        "not json",
        {},
        {"source": "aws.ec2", "detail-type": "EC2 Fleet Instance Change", "detail": {}},
        {"source": "aws.ec2", "detail-type": "EC2 Spot Instance Interruption Warning", "id": "x"},
        {"source": "aws.ec2", "detail-type": "EC2 Instance Rebalance Recommendation", "detail": {"x": 1}},
        {
            "source": "aws.ec2",
            "detail-type": "EC2 Instance State-change Notification",
            "detail": {"instance-id": 1},
        },
    ],
)
def test_malformed_and_unknown_events_are_logged_at_info_and_touch_nothing(
    handler: Any, event: object, capsys: pytest.CaptureFixture[str]
) -> None:
    result = handler(event, FakeContext(), runtime=Untouchable())
    assert result["outcome"] == "ignored" and result["reason"]
    (line,) = log_lines(capsys.readouterr().out)
    assert line["level"] == "INFO" and line["outcome"] == "ignored"
    assert line["reason"] == result["reason"]


def test_an_ignored_event_in_a_real_world_changes_nothing(world: World) -> None:
    before = world.instance_ids()
    result = interruption.handler(
        {"source": "aws.ec2", "detail-type": "x"}, FakeContext(), runtime=world.runtime
    )
    assert result["outcome"] == "ignored"
    assert world.instance_ids() == before and world.inbox() == []


@pytest.mark.parametrize(
    ("handler", "event"),
    [
        (interruption.handler, load("rebalance-recommendation.json")),
        (rebalance.handler, load("spot-interruption-warning.json")),
        (reconcile_handler.handler, load("spot-interruption-warning.json")),
        (health.handler, load("instance-state-change.json")),
    ],
)
def test_a_valid_event_sent_to_the_wrong_function_is_ignored(handler: Any, event: Any) -> None:
    result = handler(event, FakeContext(), runtime=Untouchable())
    assert result["outcome"] == "ignored"
    assert "not a" in result["reason"]


def test_an_ignored_event_needs_no_configuration_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_runtime", None)
    for name in ("STACK_NAME", "SUBNETS"):
        monkeypatch.delenv(name, raising=False)
    assert interruption.handler({"junk": True}, None)["outcome"] == "ignored"


# ------------------------------------------------------------------ missing configuration


def test_missing_configuration_fails_with_one_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "_runtime", None)
    env = {
        "LAUNCH_TEMPLATE_ID": "lt-1",
        "SUBNETS": '{"us-east-1a": "subnet-1"}',
        "DATA_VOLUME_ID": "vol-1",
        "EIP_ALLOCATION_ID": "eipalloc-1",
        "BACKUP_BUCKET": "b",
        "STATE_TABLE": "t",
        "TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:t",
    }
    monkeypatch.delenv("STACK_NAME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="STACK_NAME"):
        reconcile_handler.handler(scheduled(), FakeContext())
    errors = [line for line in log_lines(capsys.readouterr().out) if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert "STACK_NAME" in errors[0]["error"]


# ------------------------------------------------------------------ interruption


def test_a_warning_for_a_foreign_instance_is_ignored_without_tagging_it(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    before = world.instance_ids()
    for instance_id in (world.foreign_id, world.other_stack_id, "i-00000000deadbeef0"):
        result = interruption.handler(warning_for(instance_id), FakeContext(), runtime=world.runtime)
        assert result["outcome"] == "ignored"
        assert "not a node of this stack" in result["reason"]
    assert "spotforge:interruption" not in world.tags(world.foreign_id)
    assert "spotforge:interruption" not in world.tags(world.other_stack_id)
    assert world.instance_ids() == before
    assert world.inbox() == []
    lines = log_lines(capsys.readouterr().out)
    assert [line["level"] for line in lines] == ["INFO"] * 3
    assert lines[0]["correlation_id"] == "12345678-1234-1234-1234-123456789012"


def test_a_warning_for_our_node_tags_it_starts_the_handoff_and_tells_the_user(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    # moto never reports the replacement as standby; 40 s of budget is enough to see the launch.
    result = interruption.handler(warning_for(world.node_id), FakeContext(50), runtime=world.runtime)
    assert result["outcome"] == "reconciled"
    assert world.tags(world.node_id)["spotforge:interruption"] == "2026-12-04T12:00:00Z"
    assert "interruption-started" in result["happenings"]
    assert any(a.startswith("launch") for a in result["actions"])
    assert len(world.instance_ids()) == 4, "one replacement launched"
    subjects = [mail["Subject"] for mail in world.inbox()]
    assert "[sf] Spot interruption warning: replacing the node" in subjects
    out = capsys.readouterr().out
    results = [line for line in log_lines(out) if line.get("handler") == "interruption"]
    assert len(results) == 1 and results[0]["outcome"] == "reconciled"


def test_a_duplicate_warning_launches_no_second_replacement_and_sends_no_second_mail(world: World) -> None:
    interruption.handler(warning_for(world.node_id), FakeContext(30), runtime=world.runtime)
    first_mails = world.inbox()
    count = len(world.instance_ids())
    interruption.handler(warning_for(world.node_id), FakeContext(30), runtime=world.runtime)
    assert len(world.instance_ids()) == count
    again = [m["Subject"] for m in world.inbox()]
    assert "[sf] Spot interruption warning: replacing the node" not in again
    assert first_mails


def test_the_node_agent_signal_is_handled_like_the_aws_warning(world: World) -> None:
    event = {
        "version": "0",
        "id": "node-1",
        "detail-type": "Spot Interruption Signal",
        "source": "spotforge.node",
        "time": "2026-12-04T12:00:04Z",
        "detail": {
            "instance-id": world.node_id,
            "instance-action": "terminate",
            "time": "2026-12-04T12:02:00Z",
        },
    }
    result = interruption.handler(event, FakeContext(20), runtime=world.runtime)
    assert result["outcome"] == "reconciled" and result["origin"] == "node"
    assert world.tags(world.node_id)["spotforge:interruption"] == "2026-12-04T12:00:00Z"


def test_the_interruption_budget_is_cut_to_the_lambda_time_left(world: World) -> None:
    deadline = common.until(world.runtime, FakeContext(remaining_seconds=60), interruption.BUDGET_SECONDS)
    assert deadline == START + timedelta(seconds=60 - common.TIMEOUT_MARGIN_SECONDS)
    assert common.until(world.runtime, None, 150) == START + timedelta(seconds=150)


def test_a_busy_lease_is_waited_for_on_the_clock_within_the_budget(world: World) -> None:
    from spotforge_controller.lease import Lease

    other = Lease(world.runtime)
    assert other.acquire()
    result = interruption.handler(
        warning_for(world.node_id), FakeContext(remaining_seconds=40), runtime=world.runtime
    )
    assert result["outcome"] == "busy"
    assert world.clock.slept and all(s == common.LEASE_RETRY_SECONDS for s in world.clock.slept)
    assert world.clock.now() <= START + timedelta(seconds=30)
    assert world.tags(world.node_id)["spotforge:interruption"], "the warning is recorded even when busy"


# ------------------------------------------------------------------ state change and schedule


def test_the_documented_state_change_sample_without_version_for_a_foreign_instance_is_ignored(
    world: World,
) -> None:
    sample = load("instance-state-change.json")
    assert "version" not in sample
    result = reconcile_handler.handler(sample, FakeContext(), runtime=world.runtime)
    assert result["outcome"] == "ignored"
    assert result["instance_id"] == "i-abcd1111" and result["state"] == "pending"


def test_a_state_change_of_our_node_runs_the_reconciler(world: World) -> None:
    world.ec2.terminate_instances(InstanceIds=[world.node_id])
    result = reconcile_handler.handler(
        state_change_for(world.node_id, "terminated"), FakeContext(), runtime=world.runtime
    )
    assert result["outcome"] == "reconciled" and result["trigger"] == "state-change"
    assert "node-lost" in result["happenings"]
    subjects = [m["Subject"] for m in world.inbox()]
    assert subjects[0] == "[sf] Node lost: launching a replacement"
    # moto attaches and reports health at once, so the whole recovery fits in this one run.
    assert subjects[1:] == ["[sf] Forgejo recovered after the node was stopped or terminated, 0.0 s downtime"]


def test_the_schedule_on_a_healthy_stack_settles_without_changes(world: World) -> None:
    before = world.instance_ids()
    result = reconcile_handler.handler(scheduled(), FakeContext(), runtime=world.runtime)
    assert result["outcome"] == "reconciled" and result["trigger"] == "schedule"
    assert result["settled"] is True and result["actions"] == []
    assert world.instance_ids() == before


# ------------------------------------------------------------------ rebalance


def test_a_rebalance_for_a_foreign_instance_is_ignored(world: World) -> None:
    result = rebalance.handler(rebalance_for(world.foreign_id), FakeContext(), runtime=world.runtime)
    assert result["outcome"] == "ignored"
    assert world.session.client("ssm").list_commands()["Commands"] == []


def test_a_rebalance_for_our_node_backs_up_and_notifies_once(world: World) -> None:
    result = rebalance.handler(rebalance_for(world.node_id), FakeContext(), runtime=world.runtime)
    assert result["outcome"] == "reconciled" and result["proactive"] is False
    commands = world.session.client("ssm").list_commands()["Commands"]
    assert [c["Parameters"]["commands"] for c in commands] == [["/opt/spotforge/bin/spotforge-agent backup"]]
    # moto also lists every other instance here (it reads empty Targets as "all"); ours must be in.
    assert world.node_id in commands[0]["InstanceIds"]
    mails = world.inbox()
    assert [m["Subject"] for m in mails] == ["[sf] Spot rebalance warning: backup taken"]
    assert result["backup_command"] in mails[0]["Message"]
    # EventBridge delivers at least once: the same event again is not mailed again.
    rebalance.handler(rebalance_for(world.node_id), FakeContext(), runtime=world.runtime)
    assert world.inbox() == []
    assert len(world.instance_ids()) == 3, "no proactive handoff by default"


def test_proactive_rebalance_opens_a_handoff_when_configured(world: World) -> None:
    runtime = world.with_config(proactive_rebalance=True)
    result = rebalance.handler(rebalance_for(world.node_id), FakeContext(30), runtime=runtime)
    assert result["proactive"] is True
    assert "replacement-planned" in result["happenings"]
    assert len(world.instance_ids()) == 4


# ------------------------------------------------------------------ health


def put_backup(world: World, stamp: str) -> None:
    world.session.client("s3").put_object(Bucket=BUCKET, Key=f"backups/index/{stamp}.json.gz", Body=b"{}")


def test_health_publishes_healthy_backup_age_and_certificate_days(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    put_backup(world, "20261204T114500.000000Z")
    put_backup(world, "20261204T115500.000000Z")
    world.cert_not_after = START + timedelta(days=40)
    runtime = world.with_config(domain="git.example.com")
    result = health.handler(scheduled(), FakeContext(), runtime=runtime)
    assert result["outcome"] == "checked" and result["status"] == "pass"
    assert result["metrics"] == {"Healthy": 1.0, "CertificateDaysLeft": 40.0, "BackupAgeSeconds": 300.0}
    assert result["newest_backup"] == "backups/index/20261204T115500.000000Z.json.gz"
    (emf,) = emf_records(capsys.readouterr().out)
    assert (
        emf["Healthy"] == [1.0]
        and emf["BackupAgeSeconds"] == [300.0]
        and emf["CertificateDaysLeft"] == [40.0]
    )
    assert emf["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service"]]


def test_a_failing_healthz_with_http_200_semantics_is_reported_unhealthy(world: World) -> None:
    world.healthz = {"status": "fail", "checks": {"database:ping": [{"status": "fail"}]}}
    result = health.handler(scheduled(), FakeContext(), runtime=world.runtime)
    assert result["metrics"]["Healthy"] == 0.0
    assert "BackupAgeSeconds" not in result["metrics"], "no backup yet: no age to report"
    assert "CertificateDaysLeft" not in result["metrics"], "no domain: no certificate"


def test_health_probes_by_itself_when_another_run_holds_the_lease(world: World) -> None:
    from spotforge_controller.lease import Lease

    assert Lease(world.runtime).acquire()
    result = health.handler(scheduled(), FakeContext(), runtime=world.runtime)
    assert result["lease_held"] is False
    assert result["metrics"]["Healthy"] == 1.0 and result["status"] == "pass"


def test_health_without_a_serving_node_reports_unhealthy(world: World) -> None:
    world.ec2.disassociate_address(
        AssociationId=world.ec2.describe_addresses(AllocationIds=[world.allocation_id])["Addresses"][0][
            "AssociationId"
        ]
    )
    from spotforge_controller.lease import Lease

    assert Lease(world.runtime).acquire()
    result = health.handler(scheduled(), FakeContext(), runtime=world.runtime)
    assert result["status"] == "no serving node" and result["metrics"]["Healthy"] == 0.0


def test_the_newest_backup_is_found_even_when_older_than_the_recent_window(world: World) -> None:
    put_backup(world, "20261101T000000.000000Z")
    newest = health.newest_backup(world.session.client("s3"), BUCKET, START)
    assert newest == ("backups/index/20261101T000000.000000Z.json.gz", datetime(2026, 11, 1, tzinfo=UTC))


def test_an_unreadable_backup_bucket_gives_no_age_instead_of_an_error(world: World) -> None:
    assert health.newest_backup(world.session.client("s3"), "no-such-bucket", START) is None


# ------------------------------------------------------------------ lifecycle (custom resource)


def cfn(request_type: str, physical_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "RequestType": request_type,
        "RequestId": "req-1",
        "StackId": "arn:aws:cloudformation:us-east-1:123456789012:stack/sf/1",
        "LogicalResourceId": "NodeLifecycle",
        "ResourceType": "Custom::SpotforgeNodeLifecycle",
        "ResourceProperties": {"LaunchTemplateVersion": "1"},
    }
    if physical_id:
        event["PhysicalResourceId"] = physical_id
    return event


def test_delete_terminates_only_our_nodes_and_keeps_volume_and_address(world: World) -> None:
    answer = lifecycle.handler(cfn("Delete", "sf-node-lifecycle"), FakeContext(), runtime=world.runtime)
    assert answer["PhysicalResourceId"] == "sf-node-lifecycle"
    assert world.state(world.node_id) == "terminated"
    assert world.state(world.foreign_id) == "running"
    assert world.state(world.other_stack_id) == "running"
    assert answer["Data"]["Terminated"] == world.node_id
    volumes = world.ec2.describe_volumes(VolumeIds=[world.volume_id])["Volumes"]
    assert len(volumes) == 1
    assert world.ec2.describe_addresses(AllocationIds=[world.allocation_id])["Addresses"]


def test_after_delete_the_lease_stays_taken_so_no_reconciler_relaunches(world: World) -> None:
    lifecycle.handler(cfn("Delete", "sf-node-lifecycle"), FakeContext(), runtime=world.runtime)
    before = world.instance_ids()
    result = reconcile_handler.handler(scheduled(), FakeContext(), runtime=world.runtime)
    assert result["outcome"] == "busy"
    assert world.instance_ids() == before


def test_create_launches_the_first_node_and_update_keeps_the_physical_id(world: World) -> None:
    world.ec2.terminate_instances(InstanceIds=[world.node_id])
    created = lifecycle.handler(cfn("Create"), FakeContext(), runtime=world.runtime)
    assert created["PhysicalResourceId"] == "sf-node-lifecycle"
    assert created["Data"]["Reconciled"] == "true"
    assert len(world.instance_ids()) == 4
    updated = lifecycle.handler(
        cfn("Update", created["PhysicalResourceId"]), FakeContext(), runtime=world.runtime
    )
    assert updated["PhysicalResourceId"] == created["PhysicalResourceId"]


def test_a_malformed_custom_resource_request_is_still_answered(world: World) -> None:
    answer = lifecycle.handler(
        {"RequestType": "Explode", "PhysicalResourceId": "p-1"}, None, runtime=world.runtime
    )
    assert answer["PhysicalResourceId"] == "p-1"
    assert "Ignored" in answer["Data"]
    assert world.state(world.node_id) == "running"


def test_a_transient_error_during_create_does_not_fail_the_deploy(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise TimeoutError("DescribeInstances timed out")

    monkeypatch.setattr(common, "reconcile", boom)
    answer = lifecycle.handler(cfn("Create"), FakeContext(), runtime=world.runtime)
    assert answer["Data"]["Reconciled"] == "false"
    assert answer["PhysicalResourceId"] == "sf-node-lifecycle"


def test_delete_fails_loudly_when_a_node_will_not_terminate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = world.runtime.ec2.terminate_instances
    monkeypatch.setattr(world.runtime.ec2, "terminate_instances", lambda **kw: {"TerminatingInstances": []})
    with pytest.raises(lifecycle.TeardownError, match=world.node_id):
        lifecycle.handler(
            cfn("Delete", "sf-node-lifecycle"), FakeContext(remaining_seconds=60), runtime=world.runtime
        )
    assert world.clock.now() <= START + timedelta(seconds=60)
    monkeypatch.setattr(world.runtime.ec2, "terminate_instances", original)


def test_events_fixtures_are_left_untouched_by_the_handlers(world: World) -> None:
    event = warning_for(world.node_id)
    snapshot = copy.deepcopy(event)
    interruption.handler(event, FakeContext(15), runtime=world.runtime)
    assert event == snapshot


def test_a_missing_permission_during_create_fails_the_deploy_with_its_name(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotforge_controller.errors import PermissionDeniedError
    from spotforge_controller.model import Happening
    from spotforge_controller.reconcile import ReconcileResult

    denied = Happening(
        "recovery-failed",
        START,
        "The controller could not act: missing permission ec2:RunInstances.",
        {"permission": "ec2:RunInstances", "error": "missing permission ec2:RunInstances"},
    )
    monkeypatch.setattr(common, "reconcile", lambda *a, **k: ReconcileResult((), (denied,), False, True))
    with pytest.raises(PermissionDeniedError, match="ec2:RunInstances"):
        lifecycle.handler(cfn("Create"), FakeContext(), runtime=world.runtime)
    assert "FAILED" in world.inbox()[0]["Subject"], "the user is told too"


def test_a_rebalance_whose_backup_cannot_be_sent_still_snapshots_and_says_so(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from botocore.exceptions import ClientError

    def unreachable(**_: Any) -> Any:
        raise ClientError(
            {"Error": {"Code": "InvalidInstanceId", "Message": "not registered"}}, "SendCommand"
        )

    monkeypatch.setattr(world.runtime.ssm, "send_command", unreachable)
    result = rebalance.handler(rebalance_for(world.node_id), FakeContext(), runtime=world.runtime)
    assert result["backup_command"] is None and "InvalidInstanceId" in result["backup_error"]
    assert "rebalance-snapshot" in result["happenings"]
    (mail,) = world.inbox()
    assert "Backup: not started: InvalidInstanceId" in mail["Message"]


def test_backup_age_comes_from_the_agent_heartbeat_when_the_forge_is_quiet(world: World) -> None:
    put_backup(world, "20261101T000000.000000Z")  # nothing changed for a month...
    heartbeat = {
        "checked_at": "2026-12-04T11:58:00Z",
        "index": "backups/index/20261101T000000.000000Z.json.gz",
    }
    world.session.client("s3").put_object(
        Bucket=BUCKET, Key="backups/heartbeat.json", Body=json.dumps(heartbeat)
    )
    newest = health.newest_backup(world.session.client("s3"), BUCKET, START)
    # ...but the agent confirmed two minutes ago that this backup is current.
    assert newest == (heartbeat["index"], datetime(2026, 12, 4, 11, 58, tzinfo=UTC))
