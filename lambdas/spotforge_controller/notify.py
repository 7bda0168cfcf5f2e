"""Plain-language SNS messages for the happenings the core reports, each sent once.

A user reads these in an email client: what happened, why, the timeline, the downtime, and what to
do (usually nothing). Steps in the middle of a recovery (launched, handed off) are not mailed on
their own; they appear in the timeline of the final message.

Once-only delivery: the core reports a happening when the step that causes it succeeds, and a
retried or duplicated run can report it again. Before publishing, `send` adds the happening's key
to the `notified` string set of the DynamoDB item that owns it (the `recovery` item when the
happening belongs to a recovery) with a condition that it is not there yet; a lost race means
another run already sent it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

SUBJECT_LIMIT = 100
NOTIFIED_TTL_SECONDS = 7 * 24 * 3600
# SNS subjects must be printable ASCII on one line.
_NOT_SUBJECT_SAFE = re.compile(r"[^\x20-\x7e]")

# Mid-recovery steps: told in the final message's timeline instead of an email each.
QUIET_KINDS = frozenset(
    {"replacement-planned", "replacement-launched", "drain-started", "handoff-done", "eip-reassociated"}
)

_CAUSES = {
    "spot-interruption": "AWS reclaimed the spot capacity and sent its two-minute warning",
    "spot-reclaim": "AWS reclaimed the spot capacity without a usable warning",
    "spot reclaim": "AWS reclaimed the spot capacity",
    "instance-lost": "the node stopped or was terminated by someone or something other than AWS spot",
    "user action": "the node was stopped or terminated by a user or another tool, not by AWS spot",
    "user": "the node was stopped or terminated by a user or another tool, not by AWS spot",
    "no-node": "no node was running (first deploy, or a node vanished)",
    "health": "Forgejo kept failing its health check",
    "failed health": "Forgejo kept failing its health check",
    "planned": "a new launch template version (a cdk deploy) asked for a new node",
    "rebalance": "AWS flagged the node's spot capacity as at elevated risk of interruption",
    "capacity": "EC2 had no capacity for the allowed instance types",
    "resume": "an earlier handoff was interrupted part-way and is being finished",
}


class HappeningLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def message(self) -> str: ...
    @property
    def data(self) -> Mapping[str, object]: ...


@dataclass(frozen=True)
class NotifySettings:
    stack_name: str
    topic_arn: str
    on_demand_fallback: bool
    health_failure_threshold: int = 3
    domain: str | None = None


@dataclass(frozen=True)
class Message:
    subject: str
    body: str


def should_send(happening: HappeningLike) -> bool:
    return happening.kind not in QUIET_KINDS


def compose(happening: HappeningLike, settings: NotifySettings) -> Message:
    """Build the subject (<= 100 printable ASCII characters) and body for one happening."""
    data = happening.data
    kind = happening.kind
    where = f"https://{settings.domain}" if settings.domain else "your Forgejo"
    downtime = _number(data.get("downtime_seconds"))
    cause_text = describe_cause(data.get("cause"))

    first_start = (
        kind == "recovery-complete" and data.get("cause") == "no-node" and not data.get("old_instance_id")
    )
    if first_start:
        # Nothing was lost: the first node of a fresh deploy (or after every node was removed).
        headline = "Forgejo is up: a node is serving"
        todo = "Nothing. The stack output AdminPasswordCommand prints the forgejo-admin password."
        downtime = None
    elif kind == "recovery-complete":
        headline = f"Forgejo recovered after {_short_cause(data.get('cause'))}"
        if downtime is not None:
            headline += f", {_seconds(downtime)} downtime"
        todo = "Nothing. The new node is serving with the same data volume and address."
    elif kind == "interruption-started":
        headline = "Spot interruption warning: replacing the node"
        todo = (
            "Nothing. A replacement is starting now and the data volume will move to it; "
            "you will get another email when Forgejo is back."
        )
    elif kind == "node-missing":
        # The first deploy, or every node gone long enough that AWS no longer lists it.
        headline = "No node is serving: launching one"
        todo = "Nothing yet. You will get another email when Forgejo is up."
    elif kind == "node-lost":
        headline = "Node lost: launching a replacement"
        todo = "Nothing yet. You will get another email when Forgejo is back."
    elif kind == "recovery-failed":
        headline = "Recovery FAILED: Forgejo needs attention"
        todo = (
            "Look at the reconciler's log in CloudWatch Logs for the error below. The scheduled "
            "reconciler retries every minute; if the error names a missing permission or a "
            "setting, fix it and run `cdk deploy`."
        )
    elif kind == "recovery-stuck":
        headline = "Recovery is stuck: Forgejo may be down"
        todo = (
            "The controller keeps retrying every minute. Check the reconciler's log in "
            "CloudWatch Logs and the EC2 console for the data volume and the node."
        )
    elif kind == "capacity-unavailable":
        headline = "No EC2 capacity for a new node"
        if settings.on_demand_fallback:
            todo = (
                "Nothing for now: the controller keeps trying spot and on-demand in the data volume's "
                "Availability Zone every two minutes. If this repeats, allow more arm64 instance types "
                "with -c instanceTypes=... and run cdk deploy."
            )
        else:
            todo = (
                "Every allowed spot instance type is out of capacity and on-demand is not allowed. "
                "Consider allowing on-demand fallback with -c onDemandFallback=true and run cdk deploy."
            )
    elif kind == "health-failed":
        headline = "Forgejo failed its health check"
        n = settings.health_failure_threshold
        todo = (
            f"Nothing yet. After {n} failed checks in a row the controller restarts Forgejo, "
            f"after {2 * n} it replaces the node. Look at the checks below if this repeats."
        )
    elif kind == "restart-sent":
        headline = "Forgejo was unhealthy: restarting it"
        n = settings.health_failure_threshold
        todo = (
            f"Nothing yet. If Forgejo still fails after the restart, the controller replaces the node "
            f"after {2 * n} failed checks in a row."
        )
    elif kind == "remediated":
        headline = "Forgejo was unhealthy: the controller stepped in"
        todo = "Nothing, unless this keeps happening; then check Forgejo's logs on the node."
    elif kind == "rebalance-snapshot":
        headline = "Spot rebalance warning: backup taken"
        todo = (
            "Nothing. AWS often sends these without an interruption following; a fresh backup is in S3 "
            "and the controller will hand off if a real interruption warning comes."
        )
    elif kind == "drain-failed":
        headline = "Final backup on the old node failed"
        todo = (
            "The controller moved on without a clean drain. Data since the last backup is on the "
            "volume and moves with it; check the new node with "
            "`spotforge-agent status` (SSM Session Manager or Run Command)."
        )
    elif kind == "certificate-expiring":
        days = _number(data.get("days_left"))
        headline = "TLS certificate expires soon" + (f" ({days:.0f} days left)" if days is not None else "")
        todo = (
            "Check that the domain's DNS A record points at the Elastic IP and that ports 80 and 443 "
            "are reachable: Traefik renews through the Let's Encrypt HTTP-01 challenge."
        )
    elif kind == "stray-terminated":
        headline = "Stray node terminated"
        todo = "Nothing. An extra node of this stack was running and has been terminated."
    else:
        headline = happening.message.rstrip(".") or kind
        todo = "Nothing unless the details below say otherwise."

    lines = [
        f"What happened: {happening.message}",
        f"When: {_when(happening.at)}",
    ]
    if cause_text:
        lines.append(f"Why: {cause_text}.")
    if downtime is not None:
        lines.append(f"Downtime: {_seconds(downtime)} (Forgejo did not answer from the drain until healthy).")
    recovery_seconds = _number(data.get("recovery_seconds", data.get("total_seconds")))
    if recovery_seconds is not None:
        lines.append(f"Total recovery time: {_seconds(recovery_seconds)}.")
    lines.append(f"What to do: {todo}")
    lines.append(f"Forgejo: {where}")
    timeline = _timeline(data.get("timeline"))
    if timeline:
        lines.append("")
        lines.append("Timeline (UTC):")
        lines.extend(timeline)
    details = _details(data)
    if details:
        lines.append("")
        lines.append("Details:")
        lines.extend(details)
    lines.append("")
    lines.append(f"-- spotforge controller, stack {settings.stack_name}")
    return Message(subject=_subject(f"[{settings.stack_name}] {headline}"), body="\n".join(lines) + "\n")


def dedupe_key(happening: HappeningLike) -> str | None:
    """The key that makes a repeat of this happening recognisable, or None when it has none."""
    recovery_id = happening.data.get("recovery_id")
    if isinstance(recovery_id, str) and recovery_id:
        return f"{recovery_id}/{happening.kind}"
    event_id = happening.data.get("event_id")
    if isinstance(event_id, str) and event_id:
        return f"event:{event_id}/{happening.kind}"
    return None


def claim(dynamodb: Any, table: str, happening: HappeningLike, now: datetime) -> bool:
    """Record that this happening is being sent; False when an earlier run already claimed it."""
    key = dedupe_key(happening)
    if key is None:
        return True
    if key.startswith("event:"):
        # Not part of a recovery (e.g. a rebalance warning delivered twice): a small item of its own,
        # with a TTL attribute so the table does not collect them forever.
        request: dict[str, Any] = {
            "Key": {"pk": {"S": f"notified#{key}"}},
            "UpdateExpression": "SET expires_at = :exp ADD notified :key",
            "ConditionExpression": "attribute_not_exists(pk)",
            "ExpressionAttributeValues": {
                ":key": {"SS": [key]},
                ":exp": {"N": str(int(now.timestamp()) + NOTIFIED_TTL_SECONDS)},
            },
        }
    else:
        request = {
            "Key": {"pk": {"S": "recovery"}},
            "UpdateExpression": "ADD notified :key",
            # Never create the recovery item from here: a half item would confuse the core.
            "ConditionExpression": (
                "attribute_exists(pk) AND (attribute_not_exists(notified) OR NOT contains(notified, :one))"
            ),
            "ExpressionAttributeValues": {":key": {"SS": [key]}, ":one": {"S": key}},
        }
    try:
        dynamodb.update_item(TableName=table, **request)
    except dynamodb.exceptions.ConditionalCheckFailedException:
        if key.startswith("event:"):
            return False
        # The condition also fails when there is no recovery item at all; then there is nothing to
        # remember the send in, and a message sent twice beats a message never sent.
        existing = dynamodb.get_item(TableName=table, Key={"pk": {"S": "recovery"}}, ConsistentRead=True)
        return "Item" not in existing
    return True


def release(dynamodb: Any, table: str, happening: HappeningLike) -> None:
    """Undo `claim` after a failed publish (best effort: the publish error is what matters)."""
    key = dedupe_key(happening)
    if key is None:
        return
    pk = f"notified#{key}" if key.startswith("event:") else "recovery"
    try:
        if pk == "recovery":
            dynamodb.update_item(
                TableName=table,
                Key={"pk": {"S": pk}},
                UpdateExpression="DELETE notified :key",
                ConditionExpression="attribute_exists(pk)",
                ExpressionAttributeValues={":key": {"SS": [key]}},
            )
        else:
            dynamodb.delete_item(TableName=table, Key={"pk": {"S": pk}})
    except Exception:  # the caller re-raises the publish error, which matters more
        return


def send(
    sns: Any,
    dynamodb: Any,
    table: str,
    settings: NotifySettings,
    happenings: Iterable[HappeningLike],
    now: datetime,
) -> list[Message]:
    """Publish one SNS message per new, non-quiet happening; return what was published."""
    sent: list[Message] = []
    for happening in happenings:
        if not should_send(happening):
            continue
        if not claim(dynamodb, table, happening, now):
            continue
        message = compose(happening, settings)
        try:
            sns.publish(TopicArn=settings.topic_arn, Subject=message.subject, Message=message.body)
        except Exception:
            # Give the claim back so the next run that reports this happening can send it.
            release(dynamodb, table, happening)
            raise
        sent.append(message)
    return sent


def describe_cause(cause: object) -> str:
    if not isinstance(cause, str) or not cause:
        return ""
    return _CAUSES.get(cause, cause)


def _short_cause(cause: object) -> str:
    short = {
        "spot-interruption": "a spot interruption",
        "spot-reclaim": "a spot reclaim",
        "spot reclaim": "a spot reclaim",
        "instance-lost": "the node was stopped or terminated",
        "user action": "the node was stopped or terminated",
        "user": "the node was stopped or terminated",
        "health": "failed health checks",
        "failed health": "failed health checks",
        "planned": "a planned replacement",
        "rebalance": "a rebalance handoff",
        "resume": "finishing an interrupted handoff",
    }
    return short.get(cause, "a node replacement") if isinstance(cause, str) else "a node replacement"


def _subject(text: str) -> str:
    clean = _NOT_SUBJECT_SAFE.sub("", " ".join(text.split()))
    if len(clean) <= SUBJECT_LIMIT:
        return clean
    return clean[: SUBJECT_LIMIT - 3].rstrip() + "..."


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds} s"


def _when(at: datetime) -> str:
    moment = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _timeline(raw: object) -> list[str]:
    if not isinstance(raw, Sequence) or isinstance(raw, str):
        return []
    lines = []
    for entry in raw:
        if not isinstance(entry, Sequence) or isinstance(entry, str) or len(entry) < 2:
            continue
        stamp, step = entry[0], entry[1]
        text = str(stamp)
        if isinstance(stamp, datetime):
            text = stamp.astimezone(UTC).strftime("%H:%M:%S")
        elif isinstance(stamp, str) and "T" in stamp:
            # ISO-8601 from the core: keep the time of day, the date is in the "When" line.
            text = stamp.split("T", 1)[1][:8]
        lines.append(f"  {text}  {step}")
    return lines


_DETAIL_LABELS = (
    ("old_instance_id", "Old node"),
    ("instance_id", "Node"),
    ("replacement_id", "New node"),
    ("instance_type", "Instance type"),
    ("az", "Availability Zone"),
    ("tried", "Tried"),
    ("checks", "Failed checks"),
    ("action", "Action taken"),
    ("error", "Error"),
    ("backup", "Backup"),
)


def _details(data: Mapping[str, object]) -> list[str]:
    lines = []
    for key, label in _DETAIL_LABELS:
        value = data.get(key)
        if value is None or value == "" or value == () or value == []:
            continue
        if isinstance(value, Mapping):
            text = ", ".join(f"{k}: {v}" for k, v in value.items())
        elif isinstance(value, list | tuple):
            text = ", ".join(str(v) for v in value)
        else:
            text = str(value)
        lines.append(f"  {label}: {text}")
    return lines


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
