"""Decision tables for the pure core: one observed world in, the exact next steps out."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from spotforge_controller.config import Config
from spotforge_controller.decide import client_token, decide, next_health
from spotforge_controller.model import (
    Address,
    Attachment,
    DrainStatus,
    HealthRecord,
    Node,
    Observed,
    Probe,
    Recovery,
    Volume,
)

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
CONFIG = Config(
    stack_name="sf",
    launch_template_id="lt-1",
    subnets={"us-east-1a": "subnet-a", "us-east-1b": "subnet-b"},
    data_volume_id="vol-1",
    eip_allocation_id="eipalloc-1",
    backup_bucket="bucket",
    state_table="table",
    topic_arn="arn:aws:sns:us-east-1:123456789012:t",
    instance_types=("t4g.small", "t4g.medium"),
    on_demand_fallback=True,
)
RID = "spot-interruption:i-old"


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def node(
    instance_id: str = "i-old",
    state: str = "running",
    phase: str | None = "serving",
    lt: int | None = 3,
    interruption: datetime | None = None,
    reason: str | None = None,
    token: str | None = None,
    age: float = 3600,
) -> Node:
    return Node(
        instance_id=instance_id,
        state=state,
        az="us-east-1a",
        launch_time=ago(age),
        state_reason=reason,
        instance_type="t4g.small",
        lifecycle="spot",
        phase=phase,
        interruption=interruption,
        lt_version=lt,
        launch_token=token,
    )


def world(
    *nodes: Node,
    holder: str | None = "i-old",
    attachment: str = "attached",
    volume_state: str | None = None,
    eip: str | None = "i-old",
    lt: int = 3,
    recovery: Recovery | None = None,
    health: HealthRecord | None = None,
    probe: Probe | None = None,
    drain: DrainStatus | None = None,
    config: Config = CONFIG,
) -> Observed:
    attachments = (Attachment(holder, attachment, "/dev/sdf"),) if holder else ()
    return Observed(
        config=config,
        nodes=nodes,
        volume=Volume(
            "vol-1", volume_state or ("in-use" if holder else "available"), "us-east-1a", attachments
        ),
        address=Address("eipalloc-1", "203.0.113.10", instance_id=eip),
        latest_lt_version=lt,
        recovery=recovery,
        health=health or HealthRecord(),
        probe=probe,
        drain=drain,
    )


def rec(**fields: object) -> Recovery:
    base = Recovery(
        id=RID,
        status="open",
        cause="spot-interruption",
        opened_at=ago(10),
        old_instance_id="i-old",
        interruption_at=ago(10),
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def probe(status: str, instance_id: str = "i-new") -> Probe:
    return Probe(
        url="http://203.0.113.10/api/healthz", status=status, instance_id=instance_id, http_status=200
    )


WARNED = node(interruption=ago(10))
NEW_BOOTING = node("i-new", state="pending", phase="booting", age=8)
NEW_RUNNING = node("i-new", phase="booting", age=30)
NEW_STANDBY = node("i-new", phase="standby", age=60)
NEW_SERVING = node("i-new", phase="serving", age=90)
TOKEN_1 = client_token(RID, 1, "spot:t4g.small")
LAUNCH_SPOT_SMALL = (
    f"launch az=us-east-1a choice=spot:t4g.small instance_type=t4g.small lt_version=3 market=spot"
    f" subnet=subnet-a token={TOKEN_1}"
)
ALL_TRIED = ("spot:t4g.small", "spot:t4g.medium", "on-demand:t4g.small", "on-demand:t4g.medium")

STEADY = [
    pytest.param(world(node()), [], id="healthy-serving-node-is-settled"),
    pytest.param(
        world(node(), eip="i-foreign"),
        ["associate-address i-old allocation=eipalloc-1"],
        id="eip-on-another-instance-is-moved-back",
    ),
    pytest.param(
        world(node(), eip=None),
        ["associate-address i-old allocation=eipalloc-1"],
        id="unassociated-eip-is-associated",
    ),
    pytest.param(
        world(node(), health=HealthRecord(failures=3, instance_id="i-old")),
        ["restart i-old"],
        id="failed-streak-at-threshold-restarts-forgejo",
    ),
    pytest.param(
        world(node(), health=HealthRecord(failures=4, instance_id="i-old", restarted_at=ago(60))),
        [],
        id="restart-already-sent-is-not-repeated",
    ),
    pytest.param(
        world(node(), health=HealthRecord(failures=5, instance_id="i-other")),
        [],
        id="streak-of-another-instance-is-ignored",
    ),
    pytest.param(
        world(node(), health=HealthRecord(failures=6, instance_id="i-old", restarted_at=ago(60))),
        ["open-recovery i-old cause=health old=i-old"],
        id="failed-streak-at-twice-threshold-replaces-the-node",
    ),
    pytest.param(
        world(node(lt=2)),
        ["open-recovery i-old cause=planned old=i-old"],
        id="older-launch-template-version-plans-a-replacement",
    ),
    pytest.param(
        world(WARNED),
        [f"open-recovery i-old cause=spot-interruption interruption_at={ago(10).isoformat()} old=i-old"],
        id="spot-warning-opens-a-recovery",
    ),
    pytest.param(
        world(node(state="terminated", reason="Server.SpotInstanceTermination"), eip=None),
        ["open-recovery i-old cause=spot-reclaim old=i-old"],
        id="unwarned-spot-reclaim-opens-a-recovery",
    ),
    pytest.param(
        world(node(state="stopped", reason="Client.UserInitiatedShutdown")),
        ["open-recovery i-old cause=instance-lost old=i-old"],
        id="user-stopped-node-opens-a-recovery",
    ),
    pytest.param(
        world(node(state="terminated", reason="Client.UserInitiatedShutdown"), holder=None, eip=None),
        ["open-recovery i-old cause=instance-lost old=i-old"],
        id="terminated-node-that-released-the-volume-opens-a-recovery",
    ),
    pytest.param(
        world(holder=None, eip=None), ["open-recovery cause=no-node"], id="no-node-at-all-opens-a-recovery"
    ),
    pytest.param(world(holder="i-foreign", eip=None), [], id="volume-on-a-foreign-instance-is-left-alone"),
    pytest.param(
        world(node(), node("i-stray", phase="booting", age=5)),
        ["terminate i-stray"],
        id="stray-node-without-a-recovery-is-terminated",
    ),
    pytest.param(
        world(node(), node("i-gone", state="terminated", age=7200)),
        [],
        id="terminated-old-node-needs-nothing",
    ),
    pytest.param(
        world(node(phase="drained")),
        ["open-recovery i-old cause=resume old=i-old"],
        id="drained-node-without-recovery-resumes-a-handoff",
    ),
]

RECOVERING = [
    pytest.param(
        world(WARNED, recovery=rec()), [LAUNCH_SPOT_SMALL], id="warning-launches-spot-in-the-volume-az"
    ),
    pytest.param(
        world(WARNED, recovery=rec(tried=("spot:t4g.small",))),
        [
            "launch az=us-east-1a choice=spot:t4g.medium instance_type=t4g.medium lt_version=3 market=spot"
            f" subnet=subnet-a token={client_token(RID, 1, 'spot:t4g.medium')}"
        ],
        id="capacity-failure-moves-to-the-next-type",
    ),
    pytest.param(
        world(WARNED, recovery=rec(tried=("spot:t4g.small", "spot:t4g.medium"))),
        [
            "launch az=us-east-1a choice=on-demand:t4g.small instance_type=t4g.small lt_version=3"
            f" market=on-demand subnet=subnet-a token={client_token(RID, 1, 'on-demand:t4g.small')}"
        ],
        id="spot-exhausted-falls-back-to-on-demand",
    ),
    pytest.param(
        world(
            WARNED,
            recovery=rec(tried=("spot:t4g.small", "spot:t4g.medium")),
            config=replace(CONFIG, on_demand_fallback=False),
        ),
        ["report happening=capacity-unavailable"],
        id="spot-exhausted-without-fallback-reports-capacity",
    ),
    pytest.param(
        world(WARNED, recovery=rec(tried=ALL_TRIED)),
        ["report happening=capacity-unavailable"],
        id="all-choices-exhausted-reports-capacity-unavailable",
    ),
    pytest.param(
        world(WARNED, recovery=rec(tried=ALL_TRIED, capacity_exhausted_at=ago(30), interruption_at=ago(5))),
        ["wait seconds=2.0"],
        id="exhausted-capacity-waits-before-retrying",
    ),
    pytest.param(
        world(
            node(),
            recovery=rec(
                cause="planned", interruption_at=None, tried=ALL_TRIED, capacity_exhausted_at=ago(150)
            ),
        ),
        ["update-recovery attempt=2 capacity_exhausted_at=None step=capacity-retry tried=()"],
        id="exhausted-capacity-retries-after-the-pause",
    ),
    pytest.param(
        world(WARNED, NEW_BOOTING, recovery=rec(replacement_id="i-new")),
        ["wait seconds=2.0"],
        id="old-node-keeps-serving-while-the-replacement-boots",
    ),
    pytest.param(
        world(WARNED, NEW_STANDBY, recovery=rec(replacement_id="i-new")),
        ["drain i-old deadline=25"],
        id="standby-replacement-starts-the-handoff",
    ),
    pytest.param(
        world(
            node(interruption=ago(90)),
            NEW_RUNNING,
            recovery=rec(replacement_id="i-new", interruption_at=ago(90)),
        ),
        ["drain i-old deadline=25"],
        id="deadline-starts-the-handoff-without-standby",
    ),
    pytest.param(
        world(
            node(interruption=ago(90)),
            recovery=rec(interruption_at=ago(90), tried=ALL_TRIED, capacity_exhausted_at=ago(20)),
        ),
        ["drain i-old deadline=25"],
        id="deadline-drains-even-with-no-replacement-at-all",
    ),
    pytest.param(
        world(
            WARNED,
            NEW_STANDBY,
            recovery=rec(replacement_id="i-new", drain_instance_id="i-old", drain_command_id="c-1"),
            drain=DrainStatus("c-1", "i-old", "InProgress"),
        ),
        ["wait seconds=1.0"],
        id="running-drain-is-awaited",
    ),
    pytest.param(
        world(
            node(phase="draining", interruption=ago(10)),
            NEW_STANDBY,
            recovery=rec(replacement_id="i-new", drain_instance_id="i-old", drain_command_id="c-1"),
            drain=DrainStatus("c-1", "i-old", "Success"),
        ),
        ["tag i-old phase=drained", "detach i-old force=False volume=vol-1"],
        id="successful-drain-detaches-cleanly",
    ),
    pytest.param(
        world(
            node(phase="draining", interruption=ago(10)),
            NEW_STANDBY,
            recovery=rec(replacement_id="i-new", drain_instance_id="i-old", drain_command_id="c-1"),
            drain=DrainStatus("c-1", "i-old", "Failed", "sqlite backup failed"),
        ),
        ["report i-old happening=drain-failed", "detach i-old force=False volume=vol-1"],
        id="failed-drain-on-a-warned-node-is-reported-and-detached-plainly-never-forced",
    ),
    pytest.param(
        world(
            node(phase="draining", interruption=ago(10)),
            NEW_STANDBY,
            recovery=rec(
                replacement_id="i-new",
                drain_instance_id="i-old",
                drain_command_id="c-1",
                stuck_reported=True,
                detach_at=ago(5),
            ),
            drain=DrainStatus("c-1", "i-old", "TimedOut"),
        ),
        ["wait seconds=2.0"],
        id="failed-drain-with-its-plain-detach-sent-waits-for-the-spot-termination",
    ),
    pytest.param(
        world(
            node(phase="draining", interruption=ago(200)),
            NEW_STANDBY,
            recovery=rec(
                replacement_id="i-new",
                interruption_at=ago(200),
                drain_instance_id="i-old",
                drain_command_id="c-1",
                stuck_reported=True,
                detach_at=ago(100),
            ),
            drain=DrainStatus("c-1", "i-old", "Failed"),
        ),
        ["terminate i-old"],
        id="warned-node-still-running-long-after-the-warning-is-terminated",
    ),
    pytest.param(
        world(
            node(state="terminated"),
            NEW_SERVING,
            holder="i-new",
            eip="i-new",
            recovery=rec(replacement_id="i-new", opened_at=ago(1000)),
            probe=probe("fail"),
        ),
        ["report i-new happening=recovery-stuck"],
        id="replacement-that-never-passes-health-is-reported-stuck",
    ),
    pytest.param(
        world(
            node(phase="draining", lt=2),
            NEW_STANDBY,
            recovery=rec(
                cause="planned",
                interruption_at=None,
                replacement_id="i-new",
                drain_instance_id="i-old",
                drain_command_id="c-1",
            ),
            drain=DrainStatus("c-1", "i-old", "Failed"),
        ),
        ["report i-old happening=drain-failed", "detach i-old force=False volume=vol-1", "terminate i-old"],
        id="failed-drain-on-a-planned-replacement-terminates-the-old-node",
    ),
    pytest.param(
        world(
            node(phase="drained", interruption=ago(20)),
            NEW_STANDBY,
            attachment="detaching",
            recovery=rec(replacement_id="i-new", drain_instance_id="i-old", drain_command_id="c-1"),
            drain=DrainStatus("c-1", "i-old", "Success"),
        ),
        ["wait seconds=1.0"],
        id="detaching-volume-is-awaited",
    ),
    pytest.param(
        world(
            node(state="shutting-down", interruption=ago(20)),
            NEW_STANDBY,
            holder=None,
            recovery=rec(replacement_id="i-new"),
        ),
        ["attach i-new device=/dev/sdf volume=vol-1", "associate-address i-new allocation=eipalloc-1"],
        id="free-volume-and-eip-go-to-the-running-replacement-together",
    ),
    pytest.param(
        world(
            node(state="terminated"), NEW_BOOTING, holder=None, eip=None, recovery=rec(replacement_id="i-new")
        ),
        ["wait seconds=2.0"],
        id="free-volume-waits-for-a-pending-replacement",
    ),
    pytest.param(
        world(
            node(state="terminated"),
            NEW_SERVING,
            holder="i-new",
            eip="i-old",
            recovery=rec(replacement_id="i-new"),
        ),
        ["associate-address i-new allocation=eipalloc-1"],
        id="eip-follows-the-volume",
    ),
    pytest.param(
        world(
            node(state="terminated"),
            NEW_SERVING,
            holder="i-new",
            eip="i-new",
            recovery=rec(replacement_id="i-new"),
            probe=probe("fail"),
        ),
        ["wait seconds=1.0"],
        id="failing-health-is-awaited-not-trusted",
    ),
    pytest.param(
        world(
            node(phase="drained"),
            NEW_SERVING,
            holder="i-new",
            eip="i-new",
            recovery=rec(replacement_id="i-new", drain_started_at=ago(40), downtime_started_at=ago(40)),
            probe=probe("pass"),
        ),
        ["terminate i-old", "close-recovery downtime_seconds=40.0 serving=i-new total_seconds=10.0"],
        id="health-pass-terminates-the-old-node-and-closes",
    ),
    pytest.param(
        world(
            node(state="terminated", reason="Server.SpotInstanceTermination"),
            NEW_RUNNING,
            recovery=rec(
                cause="spot-reclaim", interruption_at=None, replacement_id="i-new", opened_at=ago(10)
            ),
        ),
        ["wait seconds=2.0"],
        id="volume-on-a-dead-node-waits-for-release",
    ),
    pytest.param(
        world(
            node(state="terminated", reason="Server.SpotInstanceTermination"),
            NEW_RUNNING,
            recovery=rec(
                cause="spot-reclaim", interruption_at=None, replacement_id="i-new", opened_at=ago(90)
            ),
        ),
        ["detach i-old force=True volume=vol-1"],
        id="volume-stuck-on-a-dead-node-is-force-detached",
    ),
    pytest.param(
        world(
            node(state="shutting-down", reason="Server.SpotInstanceTermination"),
            NEW_RUNNING,
            attachment="detaching",
            recovery=rec(
                cause="spot-reclaim",
                interruption_at=None,
                replacement_id="i-new",
                opened_at=ago(300),
                detach_at=ago(5),
            ),
        ),
        ["wait seconds=1.0"],
        id="forced-detach-in-progress-is-not-repeated",
    ),
    pytest.param(
        world(
            node(state="shutting-down", reason="Server.SpotInstanceTermination"),
            NEW_RUNNING,
            attachment="detaching",
            recovery=rec(
                cause="spot-reclaim",
                interruption_at=None,
                replacement_id="i-new",
                opened_at=ago(300),
                detach_at=ago(70),
            ),
        ),
        ["detach i-old force=True volume=vol-1"],
        id="detach-stuck-after-a-minute-is-forced-again",
    ),
    pytest.param(
        world(
            node(state="stopped", reason="Client.UserInitiatedShutdown"),
            NEW_RUNNING,
            recovery=rec(cause="instance-lost", interruption_at=None, replacement_id="i-new"),
        ),
        ["detach i-old force=False volume=vol-1"],
        id="volume-on-a-stopped-node-is-detached-normally",
    ),
    pytest.param(
        world(WARNED, node("i-new", state="terminated"), recovery=rec(replacement_id="i-new")),
        ["update-recovery attempt=2 replacement_id=None step=replacement-lost"],
        id="lost-replacement-starts-a-new-attempt",
    ),
    pytest.param(
        world(
            WARNED, node("i-new", phase="booting", interruption=ago(1)), recovery=rec(replacement_id="i-new")
        ),
        ["update-recovery attempt=2 replacement_id=None step=replacement-interrupted", "terminate i-new"],
        id="interrupted-replacement-is-replaced",
    ),
    pytest.param(
        world(WARNED, node("i-crash", phase="booting", token=TOKEN_1, age=5), recovery=rec()),
        ["update-recovery replacement_id=i-crash step=replacement-adopted"],
        id="replacement-launched-before-a-crash-is-adopted",
    ),
    pytest.param(
        world(
            node(lt=2),
            NEW_BOOTING,
            recovery=rec(cause="planned", interruption_at=None, replacement_id="i-new"),
        ),
        ["wait seconds=2.0"],
        id="planned-replacement-waits-for-standby-without-a-deadline",
    ),
    pytest.param(
        world(
            node(lt=2),
            NEW_STANDBY,
            recovery=rec(cause="planned", interruption_at=None, replacement_id="i-new"),
        ),
        ["drain i-old deadline=25"],
        id="planned-replacement-hands-off-at-standby",
    ),
    pytest.param(
        world(
            node(),
            NEW_BOOTING,
            recovery=rec(cause="health", interruption_at=None, replacement_id="i-new"),
        ),
        ["drain i-old deadline=25"],
        id="unhealthy-node-is-drained-at-once",
    ),
    pytest.param(
        world(WARNED, recovery=rec(), config=replace(CONFIG, subnets={"us-east-1b": "subnet-b"})),
        ["report happening=recovery-stuck"],
        id="missing-subnet-for-the-volume-az-is-reported",
    ),
    pytest.param(
        world(NEW_BOOTING, holder="i-foreign", eip=None, recovery=rec(replacement_id="i-new")),
        ["report i-foreign happening=recovery-stuck"],
        id="volume-on-a-foreign-instance-during-recovery-is-reported-once",
    ),
]


def summaries(observed: Observed) -> list[str]:
    actions = decide(observed, NOW)
    for action in actions:
        assert action.reason.strip(), f"{action.kind} has no reason"
    return [a.summary() for a in actions]


@pytest.mark.parametrize(("observed", "expected"), STEADY)
def test_steady_state_decisions(observed: Observed, expected: list[str]) -> None:
    assert summaries(observed) == expected


@pytest.mark.parametrize(("observed", "expected"), RECOVERING)
def test_recovery_decisions(observed: Observed, expected: list[str]) -> None:
    assert summaries(observed) == expected


def test_client_token_is_stable_and_distinct_per_attempt_and_choice() -> None:
    assert client_token(RID, 1, "spot:t4g.small") == client_token(RID, 1, "spot:t4g.small")
    assert client_token(RID, 1, "spot:t4g.small") != client_token(RID, 2, "spot:t4g.small")
    assert client_token(RID, 1, "spot:t4g.small") != client_token(RID, 1, "spot:t4g.medium")
    assert len(client_token(RID, 1, "spot:t4g.small")) <= 64


def test_waiting_for_the_deadline_never_oversleeps_it() -> None:
    observed = world(
        node(interruption=ago(84.5)),
        NEW_RUNNING,
        recovery=rec(replacement_id="i-new", interruption_at=ago(84.5)),
    )
    (action,) = decide(observed, NOW)
    assert action.kind == "wait"
    assert float(action.params["seconds"]) == pytest.approx(0.5)  # type: ignore[arg-type]


# Every combination of holder, node states, phases and drain outcomes: the invariants hold in all.
_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
_PHASES = ("booting", "standby", "serving", "draining", "drained")
_DRAINS = (None, "InProgress", "Success", "Failed")


def _worlds() -> list[Observed]:
    worlds = []
    for old_state, new_state, old_phase, new_phase, holder, attachment, drain in itertools.product(
        _STATES,
        ("pending", "running", "terminated"),
        _PHASES,
        ("booting", "standby"),
        ("i-old", "i-new", None),
        ("attached", "detaching"),
        _DRAINS,
    ):
        recovery = rec(replacement_id="i-new", opened_at=ago(120))
        drain_status = None
        if drain is not None:
            recovery = replace(recovery, drain_instance_id="i-old", drain_command_id="c-1")
            drain_status = DrainStatus("c-1", "i-old", drain)
        worlds.append(
            world(
                node(state=old_state, phase=old_phase, interruption=ago(100)),
                node("i-new", state=new_state, phase=new_phase, age=50),
                holder=holder,
                attachment=attachment,
                recovery=recovery,
                drain=drain_status,
            )
        )
    return worlds


def test_no_world_leads_to_an_unsafe_volume_step() -> None:
    for observed in _worlds():
        actions = decide(observed, NOW)
        alive = {n.instance_id for n in observed.nodes if n.alive}
        holder = observed.volume.holder
        for action in actions:
            assert action.reason
            if action.kind == "detach" and action.params["force"]:
                assert action.instance_id not in alive, f"force-detach from a live node in {observed}"
            if action.kind == "detach" and action.instance_id in alive:
                # A plain detach of a still-mounted volume only leaves it busy in AWS; it is
                # still sent only once the drain has ended, one way or the other.
                assert observed.drain is not None and (observed.drain.done or observed.drain.failed), (
                    "detach from a live node only after its drain ended"
                )
            if action.kind == "attach":
                assert holder is None, "attach while the volume is still held"
            if action.kind == "launch":
                assert action.params["az"] == observed.volume.az


def test_healthy_probe_resets_the_streak_and_reports_remediation_after_a_restart() -> None:
    health = HealthRecord(failures=4, instance_id="i-old", restarted_at=ago(60))
    record, notes = next_health(health, probe("pass", "i-old"), NOW, 3)
    assert record.failures == 0
    assert record.restarted_at is None
    assert [kind for kind, _ in notes] == ["remediated"]


def test_failed_probe_counts_up_and_reports_once_at_the_threshold() -> None:
    health = HealthRecord()
    kinds = []
    for _ in range(4):
        health, notes = next_health(health, probe("fail", "i-old"), NOW, 3)
        kinds.extend(kind for kind, _ in notes)
    assert health.failures == 4
    assert kinds == ["health-failed"]


def test_streak_restarts_when_the_serving_node_changes() -> None:
    health = HealthRecord(failures=5, instance_id="i-old", restarted_at=ago(60))
    record, _ = next_health(health, probe("unreachable", "i-new"), NOW, 3)
    assert (record.failures, record.instance_id, record.restarted_at) == (1, "i-new", None)


def test_expiring_certificate_is_reported_at_most_daily() -> None:
    expiring = replace(probe("pass", "i-old"), cert_days_left=5.0)
    record, notes = next_health(HealthRecord(instance_id="i-old"), expiring, NOW, 3)
    assert [kind for kind, _ in notes] == ["certificate-expiring"]
    again, notes = next_health(record, expiring, NOW + timedelta(hours=1), 3)
    assert notes == []
    _, notes = next_health(again, expiring, NOW + timedelta(days=1, minutes=1), 3)
    assert [kind for kind, _ in notes] == ["certificate-expiring"]
