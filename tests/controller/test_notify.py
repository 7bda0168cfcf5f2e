"""notify: message wording per happening kind, subject rules, and once-only sending on moto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from moto import mock_aws

from spotforge_controller import notify
from spotforge_controller.model import Happening
from spotforge_controller.notify import Message, NotifySettings, compose, send

AT = datetime(2026, 11, 20, 8, 21, 40, tzinfo=UTC)
TABLE = "spotforge-state"
SETTINGS = NotifySettings(
    stack_name="spotforge",
    topic_arn="",
    on_demand_fallback=True,
    health_failure_threshold=3,
    domain="git.example.com",
)
TIMELINE = [
    ["2026-11-20T08:20:00+00:00", "spot interruption warning"],
    ["2026-11-20T08:20:02+00:00", "replacement i-0bbb launched (spot t4g.small)"],
    ["2026-11-20T08:21:05+00:00", "drain sent to i-0aaa"],
    ["2026-11-20T08:21:40+00:00", "Forgejo on i-0bbb passes its health check"],
]


def happening(kind: str, message: str = "Something happened.", **data: Any) -> Happening:
    return Happening(kind, AT, message, data)


def test_a_completed_recovery_says_why_how_long_and_that_nothing_is_needed() -> None:
    msg = compose(
        happening(
            "recovery-complete",
            "Forgejo is back on i-0bbb.",
            cause="spot-interruption",
            downtime_seconds=31.2,
            total_seconds=100.0,
            timeline=TIMELINE,
            old_instance_id="i-0aaa",
            replacement_id="i-0bbb",
        ),
        SETTINGS,
    )
    assert msg.subject == "[spotforge] Forgejo recovered after a spot interruption, 31 s downtime"
    assert "What happened: Forgejo is back on i-0bbb." in msg.body
    assert "Why: AWS reclaimed the spot capacity and sent its two-minute warning." in msg.body
    assert "Downtime: 31 s" in msg.body
    assert "Total recovery time: 100 s." in msg.body
    assert "What to do: Nothing." in msg.body
    assert "  08:20:00  spot interruption warning" in msg.body
    assert "  08:21:40  Forgejo on i-0bbb passes its health check" in msg.body
    assert "Old node: i-0aaa" in msg.body and "New node: i-0bbb" in msg.body
    assert "https://git.example.com" in msg.body
    assert "When: 2026-11-20 08:21:40 UTC" in msg.body


@pytest.mark.parametrize(
    ("cause", "subject_part", "why_part"),
    [
        ("spot-reclaim", "after a spot reclaim", "AWS reclaimed the spot capacity without a usable warning"),
        ("instance-lost", "after the node was stopped or terminated", "other than AWS spot"),
        ("health", "after failed health checks", "kept failing its health check"),
        ("planned", "after a planned replacement", "cdk deploy"),
    ],
)
def test_the_recovery_message_tells_a_spot_reclaim_from_a_user_action_and_from_bad_health(
    cause: str, subject_part: str, why_part: str
) -> None:
    msg = compose(happening("recovery-complete", cause=cause, downtime_seconds=150.0), SETTINGS)
    assert subject_part in msg.subject
    assert "2 min 30 s downtime" in msg.subject
    assert why_part in msg.body


def test_no_capacity_without_on_demand_suggests_allowing_the_fallback() -> None:
    settings = NotifySettings("spotforge", "", on_demand_fallback=False)
    msg = compose(happening("capacity-unavailable", tried=["spot:t4g.small", "spot:t4g.medium"]), settings)
    assert msg.subject == "[spotforge] No EC2 capacity for a new node"
    assert "Consider allowing on-demand fallback with -c onDemandFallback=true" in msg.body
    assert "Tried: spot:t4g.small, spot:t4g.medium" in msg.body


def test_no_capacity_with_on_demand_allowed_says_the_controller_keeps_trying() -> None:
    msg = compose(happening("capacity-unavailable"), SETTINGS)
    assert "onDemandFallback" not in msg.body
    assert "keeps trying spot and on-demand" in msg.body


def test_a_failed_recovery_asks_for_attention_and_shows_the_error() -> None:
    msg = compose(happening("recovery-failed", error="missing permission ec2:AttachVolume"), SETTINGS)
    assert "FAILED" in msg.subject
    assert "Error: missing permission ec2:AttachVolume" in msg.body
    assert "CloudWatch Logs" in msg.body


def test_a_failed_health_check_explains_when_the_controller_steps_in() -> None:
    msg = compose(happening("health-failed", checks={"database:ping": "fail"}), SETTINGS)
    assert msg.subject == "[spotforge] Forgejo failed its health check"
    assert "After 3 failed checks in a row the controller restarts Forgejo, after 6 it replaces" in msg.body
    assert "Failed checks: database:ping: fail" in msg.body


@pytest.mark.parametrize(
    ("kind", "subject_part"),
    [
        ("interruption-started", "Spot interruption warning"),
        ("node-lost", "Node lost"),
        ("recovery-stuck", "stuck"),
        ("remediated", "stepped in"),
        ("restart-sent", "restarting it"),
        ("rebalance-snapshot", "rebalance warning: backup taken"),
        ("drain-failed", "Final backup on the old node failed"),
        ("certificate-expiring", "TLS certificate expires soon"),
        ("stray-terminated", "Stray node terminated"),
        ("something-new", "Something happened"),
    ],
)
def test_every_happening_kind_gets_a_subject_and_a_what_to_do_line(kind: str, subject_part: str) -> None:
    msg = compose(happening(kind), SETTINGS)
    assert subject_part in msg.subject
    assert msg.subject.startswith("[spotforge] ")
    assert "What to do: " in msg.body
    assert msg.body.endswith("-- spotforge controller, stack spotforge\n")


def test_the_certificate_message_gives_the_days_left() -> None:
    msg = compose(happening("certificate-expiring", days_left=9.6), SETTINGS)
    assert msg.subject == "[spotforge] TLS certificate expires soon (10 days left)"


def test_subjects_stay_within_100_printable_ascii_characters() -> None:
    long = NotifySettings("s" * 80 + "\u00e9\n", "", True)
    msg = compose(happening("recovery-complete", cause="spot-interruption", downtime_seconds=3.0), long)
    assert len(msg.subject) <= 100
    assert msg.subject.endswith("...")
    assert all(32 <= ord(ch) < 127 for ch in msg.subject)


def test_mid_recovery_steps_are_not_mailed_on_their_own() -> None:
    assert not notify.should_send(happening("replacement-launched"))
    assert not notify.should_send(happening("handoff-done"))
    assert notify.should_send(happening("recovery-complete"))


# ------------------------------------------------------------------ sending once, on moto


@pytest.fixture
def aws() -> Iterator[dict[str, Any]]:
    with mock_aws():
        session = boto3.Session(region_name="us-east-1")
        ddb = session.client("dynamodb")
        ddb.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        sns = session.client("sns")
        sqs = session.client("sqs")
        topic = sns.create_topic(Name="alerts")["TopicArn"]
        queue_url = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        yield {"ddb": ddb, "sns": sns, "sqs": sqs, "topic": topic, "queue": queue_url}


def inbox(aws: dict[str, Any]) -> list[dict[str, str]]:
    got = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(m["Body"]) for m in got]


def put_recovery(aws: dict[str, Any], recovery_id: str) -> None:
    aws["ddb"].put_item(
        TableName=TABLE, Item={"pk": {"S": "recovery"}, "id": {"S": recovery_id}, "status": {"S": "open"}}
    )


def settings_for(aws: dict[str, Any]) -> NotifySettings:
    return NotifySettings("spotforge", aws["topic"], on_demand_fallback=True)


def test_the_same_recovery_happening_is_sent_once_even_when_reported_twice(aws: dict[str, Any]) -> None:
    put_recovery(aws, "spot-interruption:i-0aaa")
    done = happening("recovery-complete", recovery_id="spot-interruption:i-0aaa", downtime_seconds=20.0)
    first = send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [done], AT)
    second = send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [done], AT)
    assert len(first) == 1 and second == []
    (mail,) = inbox(aws)
    assert mail["Subject"] == first[0].subject
    assert "Downtime: 20 s" in mail["Message"]
    item = aws["ddb"].get_item(TableName=TABLE, Key={"pk": {"S": "recovery"}})["Item"]
    assert item["notified"]["SS"] == ["spot-interruption:i-0aaa/recovery-complete"]
    assert item["status"]["S"] == "open"


def test_a_later_recovery_with_the_same_kind_is_sent_again(aws: dict[str, Any]) -> None:
    put_recovery(aws, "r1")
    send(
        aws["sns"],
        aws["ddb"],
        TABLE,
        settings_for(aws),
        [happening("recovery-complete", recovery_id="r1")],
        AT,
    )
    put_recovery(aws, "r2")
    sent = send(
        aws["sns"],
        aws["ddb"],
        TABLE,
        settings_for(aws),
        [happening("recovery-complete", recovery_id="r2")],
        AT,
    )
    assert len(sent) == 1
    assert len(inbox(aws)) == 2


def test_a_happening_of_a_recovery_whose_item_is_gone_is_still_sent_and_creates_no_item(
    aws: dict[str, Any],
) -> None:
    sent = send(
        aws["sns"], aws["ddb"], TABLE, settings_for(aws), [happening("recovery-failed", recovery_id="r9")], AT
    )
    assert len(sent) == 1
    assert "Item" not in aws["ddb"].get_item(TableName=TABLE, Key={"pk": {"S": "recovery"}})


def test_an_event_happening_delivered_twice_is_sent_once_with_an_expiring_marker(aws: dict[str, Any]) -> None:
    snap = happening("rebalance-snapshot", event_id="evt-1", instance_id="i-0aaa")
    assert len(send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [snap], AT)) == 1
    assert send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [snap], AT) == []
    marker = aws["ddb"].get_item(
        TableName=TABLE, Key={"pk": {"S": "notified#event:evt-1/rebalance-snapshot"}}
    )
    assert int(marker["Item"]["expires_at"]["N"]) == int(AT.timestamp()) + notify.NOTIFIED_TTL_SECONDS


def test_quiet_kinds_are_not_published(aws: dict[str, Any]) -> None:
    put_recovery(aws, "r1")
    sent = send(
        aws["sns"],
        aws["ddb"],
        TABLE,
        settings_for(aws),
        [happening("replacement-launched", recovery_id="r1"), happening("handoff-done", recovery_id="r1")],
        AT,
    )
    assert sent == [] and inbox(aws) == []


def test_a_failed_publish_gives_the_claim_back_so_a_later_run_can_send_it(aws: dict[str, Any]) -> None:
    put_recovery(aws, "r1")
    done = happening("recovery-complete", recovery_id="r1")

    class BrokenSns:
        def publish(self, **_: Any) -> None:
            raise ConnectionError("sns unreachable")

    with pytest.raises(ConnectionError):
        send(BrokenSns(), aws["ddb"], TABLE, settings_for(aws), [done], AT)
    sent = send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [done], AT)
    assert [m.subject for m in sent] == [compose(done, settings_for(aws)).subject]


def test_a_happening_without_any_key_is_sent_every_time(aws: dict[str, Any]) -> None:
    bare = happening("health-failed")
    assert notify.dedupe_key(bare) is None
    for _ in range(2):
        assert send(aws["sns"], aws["ddb"], TABLE, settings_for(aws), [bare], AT) == [
            Message(compose(bare, settings_for(aws)).subject, compose(bare, settings_for(aws)).body)
        ]


def test_first_node_of_a_deploy_is_announced_without_downtime() -> None:
    from datetime import UTC, datetime

    from spotforge_controller.model import Happening
    from spotforge_controller.notify import NotifySettings, compose

    happening = Happening(
        "recovery-complete",
        datetime(2026, 12, 4, 12, 0, tzinfo=UTC),
        "Node i-1 is serving.",
        {"cause": "no-node", "old_instance_id": None, "downtime_seconds": 74.0, "instance_id": "i-1"},
    )
    message = compose(happening, NotifySettings("sf", "", on_demand_fallback=True))
    assert message.subject == "[sf] Forgejo is up: a node is serving"
    assert "Downtime" not in message.body
    assert "AdminPasswordCommand" in message.body


def test_a_missing_node_says_one_is_being_launched() -> None:
    msg = compose(happening("node-missing", cause="no-node"), SETTINGS)
    assert msg.subject == "[spotforge] No node is serving: launching one"
    assert "another email when Forgejo is up" in msg.body
