"""metrics: the one list of names, the happening-to-metric mapping, and the EMF records on stdout."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from aws_lambda_powertools.metrics import MetricUnit

from spotforge_controller import metrics
from spotforge_controller.metrics import METRIC_NAMES, UnknownMetricError, emit, values_for_happenings
from spotforge_controller.model import Happening

AT = datetime(2026, 11, 20, 8, 21, tzinfo=UTC)


def emf_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{") and "_aws" in line]


def test_the_stack_defines_at_most_ten_custom_metrics_all_distinct() -> None:
    names = [spec.name for spec in METRIC_NAMES]
    assert len(names) <= metrics.MAX_CUSTOM_METRICS == 10
    assert len(set(names)) == len(names)


def test_every_metric_has_a_cloudwatch_unit_and_a_description() -> None:
    units = {unit.value for unit in MetricUnit}
    for spec in METRIC_NAMES:
        assert spec.unit in units, spec.name
        assert spec.description.endswith("."), spec.name


def test_alarm_hints_use_cloudformation_spellings() -> None:
    comparisons = {
        "GreaterThanOrEqualToThreshold",
        "GreaterThanThreshold",
        "LessThanThreshold",
        "LessThanOrEqualToThreshold",
    }
    hinted = [spec for spec in METRIC_NAMES if spec.alarm is not None]
    assert {spec.name for spec in hinted} == {"Healthy", "BackupAgeSeconds", "CertificateDaysLeft"}
    for spec in hinted:
        assert spec.alarm is not None
        assert spec.alarm.comparison in comparisons
        assert spec.alarm.statistic in {"Minimum", "Maximum", "Sum", "Average", "SampleCount"}
        assert spec.alarm.treat_missing_data in {"breaching", "notBreaching", "ignore", "missing"}
        assert spec.alarm.period_seconds % 60 == 0 and spec.alarm.evaluation_periods >= 1


def test_a_completed_recovery_counts_and_reports_its_downtime_and_duration() -> None:
    happening = Happening(
        "recovery-complete",
        AT,
        "Forgejo is back.",
        {"downtime_seconds": 31.2, "recovery_seconds": 95, "cause": "spot-interruption"},
    )
    assert values_for_happenings([happening]) == [
        ("RecoveryCount", 1.0),
        ("DowntimeSeconds", 31.2),
        ("RecoveryDurationSeconds", 95.0),
    ]


def test_failure_stuck_and_capacity_happenings_each_count_once() -> None:
    happenings = [
        Happening("recovery-failed", AT, "x"),
        Happening("recovery-stuck", AT, "x"),
        Happening("capacity-unavailable", AT, "x"),
        Happening("replacement-launched", AT, "x"),
        Happening("recovery-complete", AT, "x", {"downtime_seconds": True}),
    ]
    assert values_for_happenings(happenings) == [
        ("RecoveryFailed", 1.0),
        ("ControllerStuck", 1.0),
        ("CapacityUnavailable", 1.0),
        ("RecoveryCount", 1.0),
    ]


def test_emit_prints_one_emf_record_in_the_spotforge_namespace_with_only_the_service_dimension(
    capsys: pytest.CaptureFixture[str],
) -> None:
    record = emit([("Healthy", 1.0), ("BackupAgeSeconds", 120.0)], service="spotforge")
    lines = emf_lines(capsys.readouterr().out)
    assert len(lines) == 1
    emf = lines[0]
    assert record is not None and record["_aws"]["CloudWatchMetrics"] == emf["_aws"]["CloudWatchMetrics"]
    directive = emf["_aws"]["CloudWatchMetrics"][0]  # type: ignore[index]
    assert directive["Namespace"] == "Spotforge"
    assert directive["Dimensions"] == [["service"]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "Healthy": "Count",
        "BackupAgeSeconds": "Seconds",
    }
    assert emf["service"] == "spotforge"
    # Powertools writes each value as a list (EMF allows several values per metric).
    assert emf["Healthy"] == [1.0] and emf["BackupAgeSeconds"] == [120.0]


def test_emit_takes_the_service_name_from_the_powertools_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "spotforge-test")
    emit([("RecoveryCount", 1.0)])
    (emf,) = emf_lines(capsys.readouterr().out)
    assert emf["service"] == "spotforge-test"


def test_emit_with_nothing_to_say_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert emit([]) is None
    assert emf_lines(capsys.readouterr().out) == []


def test_a_metric_outside_the_list_is_refused_before_anything_is_printed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(UnknownMetricError, match="ColdStart"):
        emit([("Healthy", 1.0), ("ColdStart", 1.0)])
    assert emf_lines(capsys.readouterr().out) == []


def test_consecutive_emits_do_not_leak_metrics_into_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    emit([("RecoveryFailed", 1.0)])
    emit([("Healthy", 0.0)])
    first, second = emf_lines(capsys.readouterr().out)
    assert "Healthy" not in first and "RecoveryFailed" not in second
