"""CloudWatch metrics in Embedded Metric Format, and the one list of metric names the stack uses.

CloudWatch bills every metric beyond ten per account (a metric is a name plus its dimensions), so
every metric here has the single dimension `service`, and `METRIC_NAMES` is the only place a name is
defined: the CDK code builds alarms and the dashboard from it, and `emit` refuses names not in it.
Powertools is imported inside `emit` so the CDK app can import this list without loading it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

NAMESPACE = "Spotforge"
DEFAULT_SERVICE = "spotforge"
MAX_CUSTOM_METRICS = 10


@dataclass(frozen=True)
class AlarmHint:
    """How the stack should alarm on a metric; the CDK code maps these onto `cloudwatch.Alarm`."""

    statistic: str  # "Minimum" | "Maximum" | "Sum" | "Average"
    comparison: str  # CloudFormation ComparisonOperator name
    threshold: float
    evaluation_periods: int
    period_seconds: int
    treat_missing_data: str  # "breaching" | "notBreaching" | "ignore" | "missing"
    summary: str  # the alarm description a user reads in the email


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str  # a CloudWatch unit name, as Powertools' MetricUnit values spell it
    description: str
    alarm: AlarmHint | None = None


# Happenings that are sent to SNS directly (failed or stuck recovery, no capacity) have no alarm:
# an alarm would mail the same news twice and use up the free ten alarms.
METRIC_NAMES: tuple[MetricSpec, ...] = (
    MetricSpec("RecoveryCount", "Count", "Recoveries completed: a new node serving and healthy."),
    MetricSpec("DowntimeSeconds", "Seconds", "Seconds Forgejo was unreachable during a recovery."),
    MetricSpec(
        "RecoveryDurationSeconds", "Seconds", "Seconds from the first sign of trouble to a healthy node."
    ),
    MetricSpec("RecoveryFailed", "Count", "Recoveries that gave up and need attention."),
    MetricSpec("ControllerStuck", "Count", "Reconciler runs that ended without settling for too long."),
    MetricSpec("CapacityUnavailable", "Count", "Launches that found no capacity for any allowed type."),
    MetricSpec(
        "Healthy",
        "Count",
        "1 when /api/healthz reports pass or warn, 0 otherwise; published by every health check.",
        AlarmHint(
            statistic="Maximum",
            comparison="LessThanThreshold",
            threshold=1,
            evaluation_periods=5,
            period_seconds=60,
            # No data means the health checker itself is not running: that is an outage too.
            treat_missing_data="breaching",
            summary="Forgejo has failed its health check for 5 minutes (or the health checker stopped).",
        ),
    ),
    MetricSpec(
        "BackupAgeSeconds",
        "Seconds",
        "Age of the newest backup manifest in S3.",
        AlarmHint(
            statistic="Minimum",
            comparison="GreaterThanThreshold",
            threshold=3600,
            evaluation_periods=3,
            period_seconds=300,
            # Before the first backup there is nothing to measure; silence is not staleness.
            treat_missing_data="notBreaching",
            summary="The newest backup is more than an hour old: backups have stopped.",
        ),
    ),
    MetricSpec(
        "CertificateDaysLeft",
        "Count",
        "Days until the TLS certificate served on the domain expires (only when a domain is set).",
        AlarmHint(
            statistic="Minimum",
            comparison="LessThanThreshold",
            # Traefik renews 30 days before expiry; two weeks left means renewal keeps failing.
            threshold=14,
            evaluation_periods=1,
            period_seconds=3600,
            treat_missing_data="notBreaching",
            summary="The TLS certificate expires in under 14 days: Let's Encrypt renewal is failing.",
        ),
    ),
)

_BY_NAME: Mapping[str, MetricSpec] = {spec.name: spec for spec in METRIC_NAMES}


class HappeningLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def data(self) -> Mapping[str, object]: ...


class UnknownMetricError(ValueError):
    """A metric name outside METRIC_NAMES: adding it silently could push the account past ten."""


def metric_spec(name: str) -> MetricSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownMetricError(f"metric {name!r} is not in METRIC_NAMES") from None


def values_for_happenings(happenings: Iterable[HappeningLike]) -> list[tuple[str, float]]:
    """The metric data points a reconcile's happenings stand for, in order."""
    values: list[tuple[str, float]] = []
    for happening in happenings:
        data = happening.data
        if happening.kind == "recovery-complete":
            values.append(("RecoveryCount", 1.0))
            downtime = _number(data.get("downtime_seconds"))
            if downtime is not None:
                values.append(("DowntimeSeconds", downtime))
            # The core calls it total_seconds; recovery_seconds is accepted as the agreed alias.
            duration = _number(data.get("total_seconds", data.get("recovery_seconds")))
            if duration is not None:
                values.append(("RecoveryDurationSeconds", duration))
        elif happening.kind == "recovery-failed":
            values.append(("RecoveryFailed", 1.0))
        elif happening.kind == "recovery-stuck":
            values.append(("ControllerStuck", 1.0))
        elif happening.kind == "capacity-unavailable":
            values.append(("CapacityUnavailable", 1.0))
    return values


def emit(values: Sequence[tuple[str, float]], *, service: str | None = None) -> dict[str, Any] | None:
    """Write one EMF record to stdout (Lambda ships it to CloudWatch) and return it; None if empty."""
    for name, _ in values:
        metric_spec(name)
    if not values:
        return None
    from aws_lambda_powertools import Metrics

    metrics = Metrics(
        namespace=NAMESPACE,
        service=service or os.environ.get("POWERTOOLS_SERVICE_NAME") or DEFAULT_SERVICE,
    )
    for name, value in values:
        metrics.add_metric(name=name, unit=metric_spec(name).unit, value=value)
    record = metrics.serialize_metric_set()
    # flush prints the same record as one JSON line and clears Powertools' shared metric set.
    metrics.flush_metrics()
    return record


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
