"""Spot interruption fast path: the AWS two-minute warning and the node agent's own signal.

Records the warning on our node (first writer wins), then runs the reconciler with a budget long
enough to carry the handoff through the two-minute window. Foreign instances are ignored: the
rule cannot filter by tag, so every spot warning in the region arrives here.
"""

from __future__ import annotations

from typing import Any

from ..act import mark_interruption
from ..events import SpotInterruption, parse_event
from ..reconcile import Trigger
from ..runtime import Runtime
from . import common

NAME = "interruption"
BUDGET_SECONDS = 150.0


def handler(event: object, context: object = None, *, runtime: Runtime | None = None) -> dict[str, Any]:
    common.start(event)
    parsed = parse_event(event)
    if not isinstance(parsed, SpotInterruption):
        reason = parsed.reason if parsed.kind == "ignored" else f"not an interruption event ({parsed.kind})"
        return common.finish(NAME, "ignored", reason=reason)
    rt = common.resolve_runtime(runtime)
    now = rt.clock.now()
    if not mark_interruption(rt, parsed.instance_id, parsed.warned_at or now):
        return common.finish(
            NAME,
            "ignored",
            reason=f"{parsed.instance_id} is not a node of this stack",
            instance_id=parsed.instance_id,
        )
    trigger = Trigger("interruption", parsed.instance_id, parsed.trigger_detail())
    result = common.reconcile_waiting_for_lease(rt, trigger, common.until(rt, context, BUDGET_SECONDS))
    published = common.publish(rt, result.happenings)
    return common.finish(
        NAME,
        "reconciled" if result.lease_held else "busy",
        instance_id=parsed.instance_id,
        origin=parsed.origin,
        **common.summarize(result),
        **common.published_fields(published),
    )
