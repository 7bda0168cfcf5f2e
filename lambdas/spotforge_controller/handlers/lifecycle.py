"""CloudFormation custom resource for the node's life: first launch on deploy, teardown on destroy.

Contract: the CDK Provider framework (`custom_resources.Provider(on_event_handler=...)`, no
isComplete handler). `handler` returns `{"PhysicalResourceId": ..., "Data": {...}}` and the
framework answers CloudFormation, also when this raises (as FAILED with the message), so
CloudFormation is always answered.

- Create/Update: run the reconciler once (it launches the first node, or replaces the node when
  the launch template changed). Transient trouble does not fail the deploy: the scheduled
  reconciler converges. A missing setting or IAM permission does fail it, with the reason.
- Delete: terminate every instance tagged with this stack and role `node` (through the core's
  `destroy` trigger), wait until they are terminated (bounded), and keep the lease afterwards so
  no in-flight reconciler relaunches one. The volume, EIP and bucket are never touched.

The physical id is stable across updates: a new id would make CloudFormation send Delete for the
old one, which would terminate the serving node on every deploy.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, PermissionDeniedError
from ..events import CustomResourceRequest, parse_custom_resource
from ..lease import Lease
from ..model import ALIVE_STATES
from ..observe import read_nodes
from ..reconcile import Trigger
from ..runtime import Runtime
from . import common

NAME = "lifecycle"
DEPLOY_BUDGET_SECONDS = 60.0
DELETE_WAIT_SECONDS = 300.0
POLL_SECONDS = 5.0


# Anything not yet on its way out; `stopped` counts because a stopped node can be started again.
_NOT_DOWN = frozenset({*ALIVE_STATES, "stopping", "stopped"})


class TeardownError(RuntimeError):
    """Nodes still run after the bounded wait; Delete fails so the user sees it and retries."""


def handler(event: object, context: object = None, *, runtime: Runtime | None = None) -> dict[str, Any]:
    common.start(event)
    parsed = parse_custom_resource(event)
    if not isinstance(parsed, CustomResourceRequest):
        # CloudFormation never sends this; answering "done" keeps a bad request from wedging the stack.
        common.finish(NAME, "ignored", reason=parsed.reason)
        return {"PhysicalResourceId": _physical_id(event, None), "Data": {"Ignored": parsed.reason}}
    rt = common.resolve_runtime(runtime)
    physical_id = parsed.physical_resource_id or f"{rt.config.stack_name}-node-lifecycle"
    if parsed.request_type == "Delete":
        return _delete(rt, context, physical_id)
    return _deploy(rt, context, parsed, physical_id)


def _deploy(rt: Runtime, context: object, request: CustomResourceRequest, physical_id: str) -> dict[str, Any]:
    trigger = Trigger("deploy", None, {"request": request.request_type})
    try:
        result = common.reconcile_waiting_for_lease(
            rt, trigger, common.until(rt, context, DEPLOY_BUDGET_SECONDS)
        )
    except (ConfigError, PermissionDeniedError):
        common.logger.exception("deploy-time reconcile cannot work with this stack's settings")
        raise
    except Exception as exc:  # transient: the scheduled reconciler finishes the job
        common.logger.exception("deploy-time reconcile failed; the scheduled reconciler will retry")
        common.finish(NAME, "deferred", request=request.request_type, error=f"{type(exc).__name__}: {exc}")
        return {"PhysicalResourceId": physical_id, "Data": {"Reconciled": "false"}}
    # The core ends a run on a missing IAM permission with this happening: the deploy must fail
    # with it, since no later scheduled run can succeed either.
    failed = [h for h in result.happenings if h.kind == "recovery-failed" and h.data.get("permission")]
    published = common.publish(rt, result.happenings)
    common.finish(
        NAME,
        "reconciled" if result.lease_held else "busy",
        request=request.request_type,
        **common.summarize(result),
        **common.published_fields(published),
    )
    if failed:
        raise PermissionDeniedError(str(failed[0].data.get("permission", "unknown")), failed[0].message)
    return {
        "PhysicalResourceId": physical_id,
        "Data": {
            "Reconciled": "true" if result.lease_held else "false",
            "Settled": str(result.settled).lower(),
        },
    }


def _delete(rt: Runtime, context: object, physical_id: str) -> dict[str, Any]:
    deadline = common.until(rt, context, DELETE_WAIT_SECONDS)
    # Our own hold on the lease between destroy passes, never released at the end: a reconciler
    # started by a schedule CloudFormation has not deleted yet must not launch a node again.
    lease = Lease(rt)
    passes = 0
    nodes = read_nodes(rt)
    while True:
        live = [n.instance_id for n in nodes if n.state in _NOT_DOWN]
        if live or passes == 0:
            lease.release()
            result = common.reconcile_waiting_for_lease(rt, Trigger("destroy"), deadline)
            passes += 1
            lease.acquire()
            if not result.lease_held:
                raise TeardownError("another controller run held the lease until the delete ran out of time")
            nodes = read_nodes(rt)
            live = [n.instance_id for n in nodes if n.state in _NOT_DOWN]
        pending = [n.instance_id for n in nodes if n.state != "terminated"]
        if not pending:
            break
        if (deadline - rt.clock.now()).total_seconds() < POLL_SECONDS:
            if live:
                raise TeardownError(f"nodes still running after the delete wait: {', '.join(live)}")
            # Only shutting-down is left: EC2 finishes that without us.
            break
        rt.clock.sleep(POLL_SECONDS)
        lease.acquire()
        nodes = read_nodes(rt)
    terminated = sorted(n.instance_id for n in nodes)
    common.finish(NAME, "deleted", terminated=terminated, still_shutting_down=pending, destroy_passes=passes)
    return {"PhysicalResourceId": physical_id, "Data": {"Terminated": ",".join(terminated)}}


def _physical_id(event: object, fallback: str | None) -> str:
    if isinstance(event, dict):
        value = event.get("PhysicalResourceId")
        if isinstance(value, str) and value:
            return value
    return fallback or "spotforge-node-lifecycle"
