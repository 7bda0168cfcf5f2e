"""What every entry point shares: the logger, the lazily built Runtime, budgets, and publishing.

The Runtime is built on the first invocation, not at import, so a missing variable fails the
invocation with one clear error (and a later invocation tries again after a fix) instead of
breaking the module import. boto3 clients inside it are created on first use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger

from .. import metrics, notify
from ..errors import ConfigError
from ..model import Happening
from ..observe import read_nodes
from ..reconcile import ReconcileResult, Trigger, reconcile
from ..runtime import Runtime

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "spotforge"
# Seconds kept back from the Lambda timeout so the result is still published and logged.
TIMEOUT_MARGIN_SECONDS = 10.0
LEASE_RETRY_SECONDS = 2.0


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time (Lambda's stdout, or a test's capture)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


logger = Logger(service=SERVICE, stream=_CurrentStdout())  # type: ignore[arg-type]

_runtime: Runtime | None = None


def start(event: object) -> None:
    """Begin an invocation's log context: correlation id = the event id (EventBridge or CFN)."""
    event_id = None
    if isinstance(event, Mapping):
        raw = event.get("id") or event.get("RequestId")
        event_id = raw if isinstance(raw, str) else None
    logger.set_correlation_id(event_id)


def resolve_runtime(runtime: Runtime | None) -> Runtime:
    global _runtime
    if runtime is not None:
        return runtime
    if _runtime is None:
        try:
            _runtime = Runtime.from_environment()
        except ConfigError as exc:
            logger.error("configuration error", extra={"error": str(exc)})
            raise
    return _runtime


def until(runtime: Runtime, context: object, seconds: float) -> datetime:
    """The end of this run's time budget: `seconds` from now, cut short by the Lambda timeout."""
    limit = seconds
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining):
        limit = min(limit, remaining() / 1000.0 - TIMEOUT_MARGIN_SECONDS)
    return runtime.clock.now() + timedelta(seconds=max(0.0, limit))


def is_our_node(runtime: Runtime, instance_id: str) -> bool:
    # Rules cannot filter on tags, so every instance in the region reaches us: only act on ours.
    return any(node.instance_id == instance_id for node in read_nodes(runtime))


@dataclass(frozen=True)
class Published:
    notified: tuple[str, ...]  # subjects sent
    metrics: tuple[tuple[str, float], ...]
    error: str | None = None


def notify_settings(runtime: Runtime) -> notify.NotifySettings:
    config = runtime.config
    return notify.NotifySettings(
        stack_name=config.stack_name,
        topic_arn=config.topic_arn,
        on_demand_fallback=config.on_demand_fallback,
        health_failure_threshold=config.health_failure_threshold,
        domain=config.domain,
    )


def publish(
    runtime: Runtime,
    happenings: Iterable[Happening],
    extra_metrics: Sequence[tuple[str, float]] = (),
) -> Published:
    """Send the notifications and metrics a run's happenings call for.

    A failed publish is logged and reported, not raised: the AWS work is already done, and
    failing the invocation would make EventBridge retry it.
    """
    happenings = tuple(happenings)
    values = [*metrics.values_for_happenings(happenings), *extra_metrics]
    error = None
    sent: list[notify.Message] = []
    try:
        sent = notify.send(
            runtime.sns,
            runtime.dynamodb,
            runtime.config.state_table,
            notify_settings(runtime),
            happenings,
            runtime.clock.now(),
        )
    except Exception as exc:  # any SNS/DynamoDB failure: logged with its traceback, run continues
        logger.exception("notification failed")
        error = f"{type(exc).__name__}: {exc}"
    metrics.emit(values, service=SERVICE)
    return Published(tuple(m.subject for m in sent), tuple(values), error)


def summarize(result: ReconcileResult) -> dict[str, Any]:
    return {
        "settled": result.settled,
        "lease_held": result.lease_held,
        "actions": [
            f"{executed.action.summary()} -> {executed.outcome}"
            + (f" ({executed.detail})" if executed.outcome != "done" and executed.detail else "")
            for executed in result.actions
        ],
        "happenings": [h.kind for h in result.happenings],
    }


def finish(handler: str, outcome: str, **fields: Any) -> dict[str, Any]:
    """Log the invocation's one result line and return the same facts as the Lambda's result."""
    line = {"handler": handler, "outcome": outcome, **fields}
    logger.info(f"{handler}: {outcome}", extra=line)
    return line


def published_fields(published: Published) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "notified": list(published.notified),
        "metrics": {name: value for name, value in published.metrics},
    }
    if published.error:
        fields["publish_error"] = published.error
    return fields


def reconcile_waiting_for_lease(runtime: Runtime, trigger: Trigger, deadline: datetime) -> ReconcileResult:
    """Reconcile; when another run holds the lease, wait for it on the clock (within the budget).

    Used by the time-critical paths: a scheduled run may hold the lease when a warning arrives,
    and it stops at its own budget, so waiting for it is shorter than waiting for the next one.
    """
    while True:
        result = reconcile(runtime, trigger, until=deadline)
        left = (deadline - runtime.clock.now()).total_seconds()
        if result.lease_held or left < LEASE_RETRY_SECONDS:
            return result
        runtime.clock.sleep(LEASE_RETRY_SECONDS)
