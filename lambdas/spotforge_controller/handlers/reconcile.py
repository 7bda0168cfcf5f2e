"""The reconciler: instance state changes and the one-minute schedule, with a ~50 s budget.

State-change events are only hints that something moved; the scheduled run is what makes the
controller converge even when every event is lost.
"""

from __future__ import annotations

from typing import Any

from ..events import Scheduled, StateChange, parse_event
from ..reconcile import Trigger, reconcile
from ..runtime import Runtime
from . import common

NAME = "reconcile"
BUDGET_SECONDS = 50.0


def handler(event: object, context: object = None, *, runtime: Runtime | None = None) -> dict[str, Any]:
    common.start(event)
    parsed = parse_event(event)
    if not isinstance(parsed, StateChange | Scheduled):
        reason = (
            parsed.reason if parsed.kind == "ignored" else f"not a state change or schedule ({parsed.kind})"
        )
        return common.finish(NAME, "ignored", reason=reason)
    rt = common.resolve_runtime(runtime)
    fields: dict[str, Any] = {}
    if isinstance(parsed, StateChange):
        if not common.is_our_node(rt, parsed.instance_id):
            return common.finish(
                NAME,
                "ignored",
                reason=f"{parsed.instance_id} is not a node of this stack",
                instance_id=parsed.instance_id,
                state=parsed.state,
            )
        trigger = Trigger("state-change", parsed.instance_id, parsed.trigger_detail())
        fields = {"instance_id": parsed.instance_id, "state": parsed.state}
    else:
        trigger = Trigger("schedule", None, parsed.trigger_detail())
    # No waiting for a busy lease: whoever holds it is already converging the same state.
    result = reconcile(rt, trigger, until=common.until(rt, context, BUDGET_SECONDS))
    published = common.publish(rt, result.happenings)
    return common.finish(
        NAME,
        "reconciled" if result.lease_held else "busy",
        trigger=trigger.kind,
        **fields,
        **common.summarize(result),
        **common.published_fields(published),
    )
