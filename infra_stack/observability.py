"""CloudWatch alarms (to the alerts topic) and one dashboard, built from the controller's metric list.

Budget: CloudWatch's always-free tier is 10 custom metrics, 10 alarms and 3 dashboards. The metric
names live in one place (`spotforge_controller.metrics.METRIC_NAMES`); this module refuses to synth
if that list or the alarms here outgrow the free tier.
"""

from __future__ import annotations

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from constructs import Construct

from infra_stack.config import SpotforgeConfig
from spotforge_controller.metrics import MAX_CUSTOM_METRICS, METRIC_NAMES, NAMESPACE, MetricSpec

SERVICE = "spotforge"
MAX_ALARMS = 10
_MISSING = {
    "breaching": cloudwatch.TreatMissingData.BREACHING,
    "notBreaching": cloudwatch.TreatMissingData.NOT_BREACHING,
    "ignore": cloudwatch.TreatMissingData.IGNORE,
    "missing": cloudwatch.TreatMissingData.MISSING,
}


class Observability(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: SpotforgeConfig,
        topic: sns.ITopic,
        functions: tuple[lambda_.IFunction, ...],
    ) -> None:
        super().__init__(scope, construct_id)
        if len(METRIC_NAMES) > MAX_CUSTOM_METRICS:
            raise ValueError(
                f"{len(METRIC_NAMES)} custom metrics exceed the free tier of {MAX_CUSTOM_METRICS}"
            )
        self.config = config
        action = cw_actions.SnsAction(topic)
        self.alarms: list[cloudwatch.Alarm] = []

        for spec in METRIC_NAMES:
            if spec.alarm is None or (spec.name == "CertificateDaysLeft" and not config.domain):
                continue
            self.alarms.append(self._hinted_alarm(spec))

        attention = cloudwatch.MathExpression(
            expression="FILL(failed, 0) + FILL(stuck, 0) + FILL(capacity, 0)",
            using_metrics={
                "failed": self.metric("RecoveryFailed", "Sum"),
                "stuck": self.metric("ControllerStuck", "Sum"),
                "capacity": self.metric("CapacityUnavailable", "Sum"),
            },
            period=Duration.minutes(5),
            label="Recoveries that need attention",
        )
        self.alarms.append(
            attention.create_alarm(
                self,
                "RecoveryNeedsAttention",
                alarm_description="A recovery failed, is stuck, or found no capacity; the notification email "
                "says what the controller tried.",
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
        )
        errors = cloudwatch.MathExpression(
            expression=" + ".join(f"FILL(e{i}, 0)" for i in range(len(functions))),
            using_metrics={
                f"e{i}": fn.metric_errors(period=Duration.minutes(5), statistic="Sum")
                for i, fn in enumerate(functions)
            },
            period=Duration.minutes(5),
            label="Controller function errors",
        )
        self.alarms.append(
            errors.create_alarm(
                self,
                "ControllerErrors",
                alarm_description="A controller Lambda failed; see its log group for the structured error.",
                threshold=1,
                evaluation_periods=1,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
        )
        if len(self.alarms) > MAX_ALARMS:
            raise ValueError(f"{len(self.alarms)} alarms exceed the free tier of {MAX_ALARMS}")
        for alarm in self.alarms:
            alarm.add_alarm_action(action)
            alarm.add_ok_action(action)

        self.dashboard = cloudwatch.Dashboard(
            self, "Dashboard", dashboard_name=f"{config.stack_name}-forge", default_interval=Duration.days(7)
        )
        self.dashboard.add_widgets(
            cloudwatch.AlarmStatusWidget(title="Alarms", alarms=self.alarms, width=24, height=3),
        )
        self.dashboard.add_widgets(
            self._graph("Forgejo healthy (1 = pass)", ["Healthy"], "Minimum"),
            self._graph("Recoveries", ["RecoveryCount", "RecoveryFailed", "CapacityUnavailable"], "Sum"),
            self._graph(
                "Downtime and recovery time (s)", ["DowntimeSeconds", "RecoveryDurationSeconds"], "Maximum"
            ),
        )
        self.dashboard.add_widgets(
            self._graph("Newest backup age (s)", ["BackupAgeSeconds"], "Maximum"),
            self._graph("TLS certificate days left", ["CertificateDaysLeft"], "Minimum"),
            cloudwatch.GraphWidget(title="Controller errors", left=[errors], width=8),
        )

    def metric(self, name: str, statistic: str, period: Duration | None = None) -> cloudwatch.Metric:
        return cloudwatch.Metric(
            namespace=NAMESPACE,
            metric_name=name,
            dimensions_map={"service": SERVICE},
            statistic=statistic,
            period=period or Duration.minutes(5),
        )

    def _hinted_alarm(self, spec: MetricSpec) -> cloudwatch.Alarm:
        hint = spec.alarm
        assert hint is not None
        threshold = hint.threshold
        if spec.name == "BackupAgeSeconds":
            # Stale means several missed runs of the node's backup timer, however often it runs.
            threshold = max(3 * self.config.backup_interval_minutes * 60, 1800)
        return cloudwatch.Alarm(
            self,
            f"{spec.name}Alarm",
            metric=self.metric(spec.name, hint.statistic, Duration.seconds(hint.period_seconds)),
            alarm_description=hint.summary,
            threshold=threshold,
            evaluation_periods=hint.evaluation_periods,
            comparison_operator=_comparison(hint.comparison),
            treat_missing_data=_MISSING[hint.treat_missing_data],
        )

    def _graph(self, title: str, names: list[str], statistic: str) -> cloudwatch.GraphWidget:
        return cloudwatch.GraphWidget(
            title=title, left=[self.metric(name, statistic) for name in names], width=8
        )


def _comparison(name: str) -> cloudwatch.ComparisonOperator:
    """CloudFormation's ComparisonOperator spelling (GreaterThanThreshold) as the CDK enum member."""
    mapping = {
        "GreaterThanThreshold": "GREATER_THAN_THRESHOLD",
        "GreaterThanOrEqualToThreshold": "GREATER_THAN_OR_EQUAL_TO_THRESHOLD",
        "LessThanThreshold": "LESS_THAN_THRESHOLD",
        "LessThanOrEqualToThreshold": "LESS_THAN_OR_EQUAL_TO_THRESHOLD",
    }
    return getattr(cloudwatch.ComparisonOperator, mapping[name])
