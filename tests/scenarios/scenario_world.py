"""A test world for the controller's scenario tests: the drill's emulated region, simulated nodes,
Forgejo stand-ins and cooperative Lambdas (drill/scenarios.py `Drill`), with the hooks a test needs
on top: hold, repeat or reorder EventBridge events before they reach the handlers; record every
mutating AWS call the controller makes; run with non-default controller settings; and check the
invariants of ARCHITECTURE.md section 5 at the end of every scenario.

Nothing here reimplements the region, the node or the Lambda runner: they are imported from drill/.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from drill.emulator import DirectoryNode, LatencyModel
from drill.node import NodeTimings, SimNode
from drill.region import read_inbox
from drill.scenarios import Drill, Invocation, lifecycle_create, rule_target
from spotforge_controller.config import Config
from spotforge_controller.runtime import Runtime

# Operations that only read: anything else the controller sends to EC2 or SSM changes the world.
_READ_PREFIXES = ("Describe", "Get", "List")
DEPLOY_LIMIT_S = 600.0


@dataclass(frozen=True)
class AwsCall:
    """One EC2/SSM call the controller made (attempted: the emulator may still refuse it)."""

    at: datetime
    service: str
    operation: str
    params: Mapping[str, Any]
    who: str  # the Lambda thread that made it, e.g. "lambda-interruption-7"
    target_state: str | None = None  # state of params["InstanceId"] when the call was made

    @property
    def mutating(self) -> bool:
        return not self.operation.startswith(_READ_PREFIXES)


def scheduled_event(world: Drill, tag: str = "manual") -> dict[str, Any]:
    """The one-minute schedule's event, as EventBridge sends it."""
    emu = world.emu
    return {
        "version": "0",
        "id": f"{tag}-{world.elapsed():.0f}",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": emu.account_id,
        "time": world.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": emu.region,
        "resources": [f"arn:aws:events:{emu.region}:{emu.account_id}:rule/{world.region.stack}-schedule"],
        "detail": {},
    }


class ScenarioWorld(Drill):
    """The drill's world with test hooks; a context manager like `Drill`.

    - `hold_events`: when true, delivered events wait in `held` instead of reaching the handlers;
      `deliver(event)` hands one to the function its rule targets (any number of times).
    - `schedule`: when false, the one-minute schedule does not fire (a test drives it).
    - `calls`: every EC2/SSM call the controller's Runtime made, in order.
    - `env`: overrides of the controller's Lambda environment (docs/design.md names).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        latency: LatencyModel | None = None,
        timings: NodeTimings | None = None,
        env: Mapping[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed, latency=latency, timings=timings, workdir=workdir)
        self.workdir = Path(workdir)
        self.env_overrides = dict(env or {})
        self.calls: list[AwsCall] = []
        self.seen_events: list[dict[str, Any]] = []
        self.held: list[dict[str, Any]] = []
        self.hold_events = False
        self.schedule = True
        self.foreign: set[str] = set()

    # --- set-up -----------------------------------------------------------------------------------
    def _open(self) -> None:
        super()._open()
        base = self.runtime
        self.config = Config.from_env(self.region.controller_env(**self.env_overrides))
        self.runtime = Runtime(
            config=self.config,
            session=base.session,
            clock=base.clock,
            http_get=base.http_get,
            cert_expiry=base.cert_expiry,
        )
        for service in ("ec2", "ssm"):
            self.runtime.client(service).meta.events.register(
                f"before-parameter-build.{service}", self._record
            )
        # One strict client for the test's own reads: making a boto3 client costs ~20 ms.
        self.ec2 = self.emu.session.client("ec2")
        self._foreign_node = DirectoryNode.factory(self.workdir / "foreign-nodes")
        self.emu.set_node_factory(self._node_for)

    def _node_for(self, instance_id: str, emu: Any) -> Any:
        # Someone else's instance does not run our bootstrap or agent: a bare node.
        if instance_id in self.foreign:
            return self._foreign_node(instance_id, emu)
        return self.fleet.factory(instance_id, emu)

    def launch_foreign(self, spot: bool = True) -> str:
        """Someone else's instance in the volume's AZ, with none of our tags; waits until running."""
        extra: dict[str, Any] = {}
        if spot:
            extra["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time"},
            }
        reply = self.ec2.run_instances(
            ImageId="ami-12c6146b",
            InstanceType="t4g.small",
            MinCount=1,
            MaxCount=1,
            SubnetId=self.region.subnets[self.region.volume_az],
            TagSpecifications=[
                {"ResourceType": "instance", "Tags": [{"Key": "team", "Value": "someone-else"}]}
            ],
            **extra,
        )
        instance_id = str(reply["Instances"][0]["InstanceId"])
        self.foreign.add(instance_id)
        self.run_until_state(instance_id, "running")
        return instance_id

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        service = model.service_model.endpoint_prefix
        who = threading.current_thread().name
        target = params.get("InstanceId")
        state = self._peek_state(target) if isinstance(target, str) else None
        self.calls.append(AwsCall(self.clock.now(), service, model.name, dict(params), who, state))

    def _peek_state(self, instance_id: str) -> str | None:
        # moto's backend directly: an API call from inside a botocore hook would recurse into it.
        instance = self.emu.ec2_backend.get_instance_by_id(instance_id)
        return str(instance.state) if instance is not None else None

    # --- events and the schedule ------------------------------------------------------------------
    def _dispatch_events(self) -> bool:
        dispatched = False
        for event in self.emu.drain_events():
            self.seen_events.append(event)
            if self.hold_events:
                self.held.append(event)
            else:
                dispatched = self.deliver(event) is not None or dispatched
        return dispatched

    def deliver(self, event: dict[str, Any]) -> Invocation | None:
        """EventBridge: start the function the stack's rule targets (None when no rule matches)."""
        target = rule_target(event)
        return self.invoke(target, event) if target is not None else None

    def _scheduled(self) -> None:
        if self.schedule:
            super()._scheduled()

    # --- the story ---------------------------------------------------------------------------------
    def deploy(self) -> SimNode:
        """CloudFormation Create through the lifecycle function, until one node serves and passes."""
        deploy = self.invoke("lifecycle", lifecycle_create(self.region))
        assert self.run(DEPLOY_LIMIT_S, until=lambda: deploy.done and self.fully_settled()), self.explain()
        assert deploy.error is None, deploy.error
        node = self.serving_node()
        assert node is not None
        return node

    def recover(self, not_on: str | None = None, limit: float = 600.0) -> SimNode:
        """Run until a node (other than `not_on`) serves, passes, is tagged serving, and no
        recovery is open."""
        assert self.run(limit, until=lambda: self.fully_settled(not_on)), self.explain()
        node = self.serving_node()
        assert node is not None
        return node

    def fully_settled(self, not_on: str | None = None) -> bool:
        node = self.serving_node()
        return node is not None and node.phase == "serving" and self.settled(not_on=not_on)

    def state(self, instance_id: str) -> str:
        return str(self.instance(instance_id)["State"]["Name"])

    def run_until_state(self, instance_id: str, state: str, limit: float = 300.0) -> None:
        assert self.run(limit, until=lambda: self.state(instance_id) == state), self.explain()

    def held_event(self, detail_type: str, limit: float = 30.0) -> dict[str, Any]:
        """Wait (virtually) for an event of this detail-type to be held back, and return it."""

        def find() -> dict[str, Any] | None:
            return next((e for e in self.held if e.get("detail-type") == detail_type), None)

        assert self.run(limit, until=lambda: find() is not None), self.explain()
        found = find()
        assert found is not None
        return found

    def handler_errors(self) -> list[str]:
        return [f"{i.function}#{i.seq}: {i.error}" for i in self.runner.invocations if i.error]

    def results(self, function: str) -> list[dict[str, Any]]:
        return [i.result for i in self.runner.invocations if i.function == function and i.result]

    def mutating_calls(self, since: datetime | None = None) -> list[AwsCall]:
        return [c for c in self.calls if c.mutating and (since is None or c.at >= since)]

    def instance(self, instance_id: str) -> dict[str, Any]:
        reply = self.ec2.describe_instances(InstanceIds=[instance_id])
        return dict(reply["Reservations"][0]["Instances"][0])

    def instances(self) -> dict[str, dict[str, Any]]:
        reservations = self.ec2.describe_instances()["Reservations"]
        return {i["InstanceId"]: i for r in reservations for i in r["Instances"]}

    def tags(self, instance_id: str) -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in self.instance(instance_id).get("Tags", [])}

    def inbox(self) -> list[dict[str, Any]]:
        """SNS messages delivered to the email stand-in so far (and removes them from the queue)."""
        return read_inbox(self.emu, self.region)

    def downtime_since(self, t0: datetime) -> float | None:
        """The drill probe's view: first failed probe at/after t0 to the next pass (0: none failed)."""
        after = [(t, ok) for t, ok, _ in self.probes if t >= t0]
        first_fail = next((t for t, ok in after if not ok), None)
        if first_fail is None:
            return 0.0
        back = next((t for t, ok in after if ok and t > first_fail), None)
        return (back - first_fail).total_seconds() if back is not None else None

    def explain(self) -> str:
        """What a failed wait saw: the recovery record, nodes, the last handler results."""
        rec = self.recovery()
        lines = [f"t={self.elapsed():.0f}s violations={self.emu.violations}"]
        if rec is not None:
            lines.append(f"recovery {rec.id} {rec.status}: {rec.timeline[-6:]}")
        for instance_id, node in self.fleet.nodes.items():
            lines.append(f"{instance_id}: phase={node.phase} alive={node.alive} log={node.log[-4:]}")
        for inv in self.runner.invocations[-6:]:
            lines.append(
                f"{inv.function}#{inv.seq}: {inv.error or json.dumps(inv.result, default=str)[:400]}"
            )
        return "\n".join(lines)


def missing_rows(world: ScenarioWorld, node: SimNode) -> list[object]:
    """Rows the writer saw committed that the node's Forgejo database does not hold (RPO)."""
    assert node.standin is not None, f"{node.instance_id} runs no Forgejo"
    present = set(node.standin.row_ids())
    return [row for row, _ in world.committed if row not in present]


def assert_invariants(world: ScenarioWorld, *, allow_errors: bool = False) -> SimNode:
    """ARCHITECTURE.md section 5 at the end of a scenario; returns the serving node.

    The volume was attached to, mounted by and served from at most one node at every sampled
    second and never deleted or formatted over (`emu.violations`); exactly one healthy serving node
    holds it with the EIP associated and routed to it; and once settled, a reconcile followed by a
    second one leaves the second with no action, no mutating AWS call and no new instance.
    """
    assert world.emu.violations == [], world.emu.violations
    assert world.samples_bad == [], world.samples_bad[:3]
    if not allow_errors:
        assert world.handler_errors() == []
    serving = world.fleet.serving()
    assert len(serving) == 1, [n.instance_id for n in serving]
    node = serving[0]
    instance = world.instance(node.instance_id)
    assert instance["State"]["Name"] == "running"
    assert world.tags(node.instance_id).get("spotforge:phase") == "serving"
    ec2 = world.ec2
    volume = ec2.describe_volumes(VolumeIds=[world.region.volume_id])["Volumes"][0]
    holders = [a["InstanceId"] for a in volume.get("Attachments", []) if a["State"] != "detached"]
    assert holders == [node.instance_id], volume
    assert world.fleet.mounting_data() == [node]
    address = ec2.describe_addresses(AllocationIds=[world.region.allocation_id])["Addresses"][0]
    assert address.get("InstanceId") == node.instance_id
    assert world.emu.address_target(world.region.public_ip) == node.instance_id
    ok, detail = world.network.probe()
    assert ok, detail
    alive = [
        i
        for i, d in world.instances().items()
        if d["State"]["Name"] in ("pending", "running")
        and world.tags(i).get("spotforge:stack") == world.region.stack
    ]
    assert alive == [node.instance_id], alive

    # Level-triggered: settle once more, then a second run must find nothing to do.
    first = world.invoke_and_wait("reconcile", scheduled_event(world, "check-1"))
    assert first.error is None, first.error
    before = world.world_snapshot()
    count = len(world.instances())
    mark = world.clock.now()
    second = world.invoke_and_wait("reconcile", scheduled_event(world, "check-2"))
    assert second.error is None, second.error
    assert second.result is not None and second.result["lease_held"], second.result
    assert second.result["actions"] == [], second.result
    assert world.mutating_calls(since=mark) == []
    assert world.world_snapshot() == before
    assert len(world.instances()) == count
    return node


_S3_WRITES = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")


def fail_s3_writes(node: SimNode, code: str = "InternalError") -> None:
    """Make every S3 write from this node's agent fail with `code`.

    The emulator's injected faults reach only EC2 and SSM (its hooks are registered for those
    services), so the node's own S3 client gets the refusal here.
    """

    def refuse(model: Any, **_: Any) -> None:
        error = {"Error": {"Code": code, "Message": f"Injected fault: {code}"}}
        raise ClientError(error, model.name)

    for operation in _S3_WRITES:
        node.s3.meta.events.register(f"before-call.s3.{operation}", refuse)
