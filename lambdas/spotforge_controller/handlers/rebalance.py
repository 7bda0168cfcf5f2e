"""Rebalance recommendation: back up now and tell the user; hand off early only when configured.

Recommendations are frequent and often not followed by an interruption, so the default is cheap:
a consistent backup through the node agent (SSM `spotforge-agent backup`) and the core's one
snapshot per node. With PROACTIVE_REBALANCE=true the core also opens a standby handoff.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..act import run_agent
from ..errors import ConflictError
from ..events import RebalanceRecommendation, parse_event
from ..model import Happening
from ..observe import read_nodes
from ..reconcile import Trigger
from ..runtime import Runtime
from . import common

NAME = "rebalance"
BUDGET_SECONDS = 50.0
PROACTIVE_BUDGET_SECONDS = 150.0
BACKUP_TIMEOUT_SECONDS = 600


def handler(event: object, context: object = None, *, runtime: Runtime | None = None) -> dict[str, Any]:
    common.start(event)
    parsed = parse_event(event)
    if not isinstance(parsed, RebalanceRecommendation):
        reason = parsed.reason if parsed.kind == "ignored" else f"not a rebalance event ({parsed.kind})"
        return common.finish(NAME, "ignored", reason=reason)
    rt = common.resolve_runtime(runtime)
    instance_id = parsed.instance_id
    node = next((n for n in read_nodes(rt) if n.instance_id == instance_id), None)
    if node is None:
        return common.finish(
            NAME, "ignored", reason=f"{instance_id} is not a node of this stack", instance_id=instance_id
        )
    if not node.alive:
        # A late recommendation for a node already gone: its backup cannot run and a snapshot
        # "for" it (now of the replacement's volume) plus an email would only mislead.
        return common.finish(
            NAME, "ignored", reason=f"{instance_id} is already {node.state}", instance_id=instance_id
        )

    backup_command: str | None = None
    backup_error: str | None = None
    try:
        backup_command = run_agent(rt, instance_id, "backup", BACKUP_TIMEOUT_SECONDS)
    except ConflictError as exc:
        # The node is already gone or not yet registered with SSM: the snapshot still covers it.
        backup_error = str(exc)

    budget = PROACTIVE_BUDGET_SECONDS if rt.config.proactive_rebalance else BUDGET_SECONDS
    trigger = Trigger("rebalance", instance_id, parsed.trigger_detail())
    result = common.reconcile_waiting_for_lease(rt, trigger, common.until(rt, context, budget))

    extra = {"event_id": parsed.event_id, "backup": backup_command or f"not started: {backup_error}"}
    happenings = [
        replace(h, data={**h.data, **extra}) if h.kind == "rebalance-snapshot" else h
        for h in result.happenings
    ]
    if not any(h.kind == "rebalance-snapshot" for h in happenings) and backup_command is not None:
        # The core snapshots once per node; on a repeat recommendation the backup is the news.
        message = f"Node {instance_id} may be interrupted soon; started a backup to S3."
        happenings.append(
            Happening("rebalance-snapshot", rt.clock.now(), message, {"instance_id": instance_id, **extra})
        )
    published = common.publish(rt, happenings)
    return common.finish(
        NAME,
        "reconciled" if result.lease_held else "busy",
        instance_id=instance_id,
        backup_command=backup_command,
        backup_error=backup_error,
        proactive=rt.config.proactive_rebalance,
        **common.summarize(result),
        **common.published_fields(published),
    )
