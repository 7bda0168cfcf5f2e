"""What the controller sees (Observed) and what it may do (Action): plain frozen data, no boto3.

The decision core works only on these types, so its tests are tables of values, and the boto3 layer
(observe.py, act.py) is the only code that knows AWS response shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from .config import Config

ALIVE_STATES = frozenset({"pending", "running"})
DEAD_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# Attachment states in which the volume still belongs to an instance.
HELD_ATTACHMENT_STATES = frozenset({"attaching", "attached", "detaching", "busy"})
SPOT_RECLAIM_REASONS = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
DRAIN_DONE_STATUSES = frozenset({"Success"})
DRAIN_FAILED_STATUSES = frozenset(
    {"Failed", "TimedOut", "Cancelled", "Cancelling", "Undeliverable", "Terminated", "DeliveryTimedOut"}
)

TAG_STACK = "spotforge:stack"
TAG_ROLE = "spotforge:role"
TAG_PHASE = "spotforge:phase"
TAG_INTERRUPTION = "spotforge:interruption"
TAG_LT_VERSION = "spotforge:lt-version"
TAG_LAUNCH_TOKEN = "spotforge:launch-token"
DATA_DEVICE = "/dev/sdf"
AGENT = "/opt/spotforge/bin/spotforge-agent"


def _empty() -> Mapping[str, object]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Node:
    instance_id: str
    state: str
    az: str
    launch_time: datetime
    state_reason: str | None = None
    instance_type: str = ""
    lifecycle: str = "on-demand"  # "spot" | "on-demand"
    phase: str | None = None
    interruption: datetime | None = None
    lt_version: int | None = None
    launch_token: str | None = None

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def gone(self) -> bool:
        return self.state in ("shutting-down", "terminated")


@dataclass(frozen=True)
class Attachment:
    instance_id: str
    state: str  # attaching | attached | detaching | detached | busy
    device: str = DATA_DEVICE


@dataclass(frozen=True)
class Volume:
    volume_id: str
    state: str  # creating | available | in-use | deleting | deleted | error
    az: str
    attachments: tuple[Attachment, ...] = ()

    @property
    def holder(self) -> Attachment | None:
        """The attachment that still ties the volume to an instance, if any."""
        for attachment in self.attachments:
            if attachment.state in HELD_ATTACHMENT_STATES:
                return attachment
        return None


@dataclass(frozen=True)
class Address:
    allocation_id: str
    public_ip: str
    instance_id: str | None = None
    association_id: str | None = None
    network_interface_id: str | None = None


@dataclass(frozen=True)
class Recovery:
    """The DynamoDB `recovery` item: memory of one replacement, so a crashed run can be finished."""

    id: str
    status: str  # open | closed
    cause: str  # spot-interruption | spot-reclaim | instance-lost | no-node | health | planned | rebalance
    opened_at: datetime
    old_instance_id: str | None = None
    interruption_at: datetime | None = None
    attempt: int = 1
    tried: tuple[str, ...] = ()  # launch choices tried in this attempt, e.g. "spot:t4g.small"
    capacity_exhausted_at: datetime | None = None
    replacement_id: str | None = None
    drain_instance_id: str | None = None
    drain_command_id: str | None = None
    drain_started_at: datetime | None = None
    drain_result: str | None = None
    detach_at: datetime | None = None  # when the controller last asked EC2 to detach the volume
    downtime_started_at: datetime | None = None
    stuck_reported: bool = False
    closed_at: datetime | None = None
    downtime_seconds: float | None = None
    timeline: tuple[tuple[str, str], ...] = ()

    @property
    def open(self) -> bool:
        return self.status == "open"


@dataclass(frozen=True)
class HealthRecord:
    """The DynamoDB `health` item: the streak of consecutive failed probes of the serving node."""

    failures: int = 0
    instance_id: str | None = None
    last_status: str | None = None
    last_at: datetime | None = None
    restarted_at: datetime | None = None
    cert_warned_at: datetime | None = None


@dataclass(frozen=True)
class Probe:
    url: str
    status: str  # pass | warn | fail | unreachable | invalid
    instance_id: str | None = None  # the node the EIP pointed at when probed
    http_status: int | None = None
    checks: Mapping[str, str] = field(default_factory=_empty)
    detail: str = ""
    cert_days_left: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "warn")


@dataclass(frozen=True)
class DrainStatus:
    command_id: str
    instance_id: str
    status: str  # SSM invocation status: Pending | InProgress | Delayed | Success | Failed | TimedOut | ...
    detail: str = ""

    @property
    def done(self) -> bool:
        return self.status in DRAIN_DONE_STATUSES

    @property
    def failed(self) -> bool:
        return self.status in DRAIN_FAILED_STATUSES


@dataclass(frozen=True)
class Observed:
    config: Config
    nodes: tuple[Node, ...]
    volume: Volume
    address: Address
    latest_lt_version: int
    recovery: Recovery | None = None
    health: HealthRecord = field(default_factory=HealthRecord)
    probe: Probe | None = None
    drain: DrainStatus | None = None

    def node(self, instance_id: str | None) -> Node | None:
        if instance_id is None:
            return None
        for candidate in self.nodes:
            if candidate.instance_id == instance_id:
                return candidate
        return None


@dataclass(frozen=True)
class Action:
    """One step the controller decided to take, with the reason a human can read in the log.

    kinds: open-recovery, update-recovery, launch, tag, drain, detach, attach, associate-address,
    terminate, restart, close-recovery, report, wait.
    """

    kind: str
    reason: str
    instance_id: str | None = None
    params: Mapping[str, object] = field(default_factory=_empty)

    def summary(self) -> str:
        """A compact, stable description, e.g. `detach i-1 force=False volume=vol-1`."""
        parts = [self.kind]
        if self.instance_id:
            parts.append(self.instance_id)
        parts.extend(f"{key}={self.params[key]}" for key in sorted(self.params))
        return " ".join(parts)


@dataclass(frozen=True)
class Happening:
    """Something worth telling the user or a metric; produced by the core.

    kinds: interruption-started, node-lost (unwarned loss), node-missing (no node at all, e.g.
    first deploy), replacement-planned, health-failed, replacement-launched, capacity-unavailable,
    drain-started, drain-failed, recovery-stuck, handoff-done, recovery-complete, recovery-failed,
    restart-sent, remediated, rebalance-snapshot, certificate-expiring, eip-reassociated.
    """

    kind: str
    at: datetime
    message: str  # one plain sentence
    data: Mapping[str, object] = field(default_factory=_empty)


@dataclass(frozen=True)
class ExecutedAction:
    action: Action
    outcome: str  # done | capacity | conflict | failed
    detail: str = ""
    at: datetime | None = None


# ---------------------------------------------------------------- DynamoDB documents
# Records are stored as one JSON string attribute `doc` (plus `id`/`status` for conditions), so
# the schema can grow without migrations and the table needs only its partition key.


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed


_RECOVERY_TIMES = (
    "opened_at",
    "interruption_at",
    "capacity_exhausted_at",
    "drain_started_at",
    "downtime_started_at",
    "detach_at",
    "closed_at",
)


def recovery_to_doc(rec: Recovery) -> dict[str, object]:
    doc: dict[str, object] = {}
    for name in Recovery.__dataclass_fields__:
        value = getattr(rec, name)
        if name in _RECOVERY_TIMES:
            doc[name] = _iso(value)
        elif name in ("tried",):
            doc[name] = list(value)
        elif name == "timeline":
            doc[name] = [list(step) for step in value]
        else:
            doc[name] = value
    return doc


def recovery_from_doc(doc: Mapping[str, object]) -> Recovery:
    known = Recovery.__dataclass_fields__
    values: dict[str, object] = {}
    for name, value in doc.items():
        if name not in known:
            continue
        if name in _RECOVERY_TIMES:
            values[name] = parse_time(value)
        elif name == "tried":
            values[name] = tuple(str(v) for v in value)  # type: ignore[union-attr]
        elif name == "timeline":
            values[name] = tuple((str(s[0]), str(s[1])) for s in value)  # type: ignore[union-attr,index]
        else:
            values[name] = value
    opened = values.get("opened_at")
    if not isinstance(opened, datetime):
        raise ValueError("recovery record has no opened_at")
    return Recovery(**values)  # type: ignore[arg-type]


def health_to_doc(health: HealthRecord) -> dict[str, object]:
    return {
        "failures": health.failures,
        "instance_id": health.instance_id,
        "last_status": health.last_status,
        "last_at": _iso(health.last_at),
        "restarted_at": _iso(health.restarted_at),
        "cert_warned_at": _iso(health.cert_warned_at),
    }


def health_from_doc(doc: Mapping[str, object]) -> HealthRecord:
    failures = doc.get("failures", 0)
    return HealthRecord(
        failures=int(failures) if isinstance(failures, int | float | str) else 0,
        instance_id=doc.get("instance_id") if isinstance(doc.get("instance_id"), str) else None,  # type: ignore[arg-type]
        last_status=doc.get("last_status") if isinstance(doc.get("last_status"), str) else None,  # type: ignore[arg-type]
        last_at=parse_time(doc.get("last_at")),
        restarted_at=parse_time(doc.get("restarted_at")),
        cert_warned_at=parse_time(doc.get("cert_warned_at")),
    )
