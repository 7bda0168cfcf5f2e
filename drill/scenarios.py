"""The offline drill: the real controller handlers and the real node agent against the strict
emulator, on a virtual clock, with Forgejo stand-ins serving on 127.0.0.1.

Pieces:
- `LambdaRunner`: every handler invocation is a "Lambda" on its own thread, as concurrent as real
  ones (the lease decides who acts), but only one thread runs at any moment and a handler's
  `clock.sleep()` hands control back until the virtual clock reaches its wake-up time. So the
  emulator stays single-threaded and no real time passes.
- `LoopbackNetwork`: routes the Elastic IP (or the domain) to the stand-in of the instance the EIP
  reaches now (`emu.address_target`), on 127.0.0.1; anything else fails like a refused connection.
- `Drill`: builds the region, deploys (lifecycle Create), runs a writer and a prober every virtual
  second, the schedule every virtual minute, delivers EventBridge events to the handlers the stack's
  rules target, and measures. `run_scenario("warned" | "unwarned")` is the whole thing.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# The controller is a Lambda asset under lambdas/, not an installed package.
_LAMBDAS_DIR = Path(__file__).resolve().parents[1] / "lambdas"
if str(_LAMBDAS_DIR) not in sys.path:
    sys.path.insert(0, str(_LAMBDAS_DIR))

from spotforge_controller.config import Config  # noqa: E402
from spotforge_controller.handlers import health, interruption, lifecycle, rebalance  # noqa: E402
from spotforge_controller.handlers import reconcile as reconcile_handler  # noqa: E402
from spotforge_controller.observe import read_recovery  # noqa: E402
from spotforge_controller.runtime import HttpResponse, Runtime  # noqa: E402

from .emulator import Emulator, LatencyModel, VirtualClock  # noqa: E402
from .node import NodeEnv, NodeFleet, NodeTimings, SimNode  # noqa: E402
from .region import Region, build_region, read_inbox  # noqa: E402

START = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
# Budgets from ARCHITECTURE.md section 7.
BUDGETS = {"warned": 60.0, "unwarned": 180.0}
# Lambda timeouts as infra_stack/controller.py sets them.
LAMBDA_TIMEOUTS = {"interruption": 240, "rebalance": 120, "reconcile": 120, "health": 90, "lifecycle": 600}
HANDLERS: dict[str, Callable[..., dict[str, Any]]] = {
    "interruption": interruption.handler,
    "rebalance": rebalance.handler,
    "reconcile": reconcile_handler.handler,
    "health": health.handler,
    "lifecycle": lifecycle.handler,
}
# infra_stack/controller.py LOSS_STATES: the state-change rule only forwards these.
LOSS_STATES = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
BATON_TIMEOUT_SECONDS = 60.0  # real seconds a Lambda thread may run before we call it stuck


class DrillError(Exception):
    """The drill itself could not run (not a failed invariant: those are reported)."""


class LambdaStuck(DrillError):
    """A handler thread neither slept nor returned within BATON_TIMEOUT_SECONDS of real time."""


class LambdaAbandoned(BaseException):
    """Raised inside a sleeping handler when the drill ends, so its thread unwinds. A
    BaseException: handlers that catch Exception to carry on must not swallow it."""


# ---------------------------------------------------------------------------------------------
# Concurrent Lambdas on one virtual clock
# ---------------------------------------------------------------------------------------------
@dataclass
class Invocation:
    """One handler run: what it got, when it ran (virtual), what it returned or raised."""

    function: str
    event: Any
    started: datetime
    seq: int
    ended: datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    wake: datetime | None = None
    go: threading.Event = field(default_factory=threading.Event, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.ended is not None


class LambdaContext:
    """The part of the Lambda context the handlers read, on the virtual clock."""

    def __init__(self, function: str, clock: VirtualClock, timeout_s: float, request_id: str) -> None:
        self.function_name = function
        self.aws_request_id = request_id
        self.memory_limit_in_mb = 256
        self.invoked_function_arn = f"arn:aws:lambda:us-east-1:123456789012:function:{function}"
        self._clock = clock
        self._deadline = clock.now() + timedelta(seconds=timeout_s)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - self._clock.now()).total_seconds() * 1000))


class LambdaRunner:
    """Runs invocations as threads that take turns; see the module docstring."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.invocations: list[Invocation] = []
        self._active: list[Invocation] = []
        self._yielded = threading.Event()
        self._local = threading.local()
        self._seq = 0
        self._closing = False

    def invoke(self, function: str, event: Any, runtime: Runtime) -> Invocation:
        """Start an invocation now; it first runs at the next `run_ready()`."""
        self._seq += 1
        inv = Invocation(function, event, self.clock.now(), self._seq, wake=self.clock.now())
        context = LambdaContext(function, self.clock, LAMBDA_TIMEOUTS[function], f"drill-{self._seq}")
        inv.thread = threading.Thread(
            target=self._body,
            args=(inv, context, runtime),
            name=f"lambda-{function}-{self._seq}",
            daemon=True,
        )
        self.invocations.append(inv)
        self._active.append(inv)
        inv.thread.start()
        return inv

    def _body(self, inv: Invocation, context: LambdaContext, runtime: Runtime) -> None:
        inv.go.wait()
        inv.go.clear()
        self._local.current = inv
        try:
            if self._closing:
                raise LambdaAbandoned()
            inv.result = HANDLERS[inv.function](inv.event, context, runtime=runtime)
        except LambdaAbandoned:
            inv.error = "abandoned: the drill ended while it ran"
        except BaseException as exc:  # a Lambda that raises: recorded, the drill reports it
            inv.error = f"{type(exc).__name__}: {exc}"
        finally:
            inv.ended = self.clock.now()
            self._yielded.set()

    def sleep(self, seconds: float) -> None:
        """A handler's sleep: park this thread until the virtual clock reaches the wake time."""
        inv: Invocation | None = getattr(self._local, "current", None)
        if inv is None:
            self.clock.sleep(seconds)  # the driver itself (e.g. reading state between runs)
            return
        inv.wake = self.clock.now() + timedelta(seconds=max(0.0, seconds))
        self._yielded.set()
        inv.go.wait()
        inv.go.clear()
        if self._closing:
            raise LambdaAbandoned()

    def close(self) -> None:
        """End of the drill: unwind every invocation still waiting for its turn."""
        self._closing = True
        for inv in list(self._active):
            self._yielded.clear()
            inv.go.set()
            if inv.thread is not None:
                inv.thread.join(timeout=BATON_TIMEOUT_SECONDS)
        self._active.clear()

    def next_wake(self) -> datetime | None:
        wakes = [i.wake for i in self._active if i.wake is not None and not i.done]
        return min(wakes) if wakes else None

    def busy(self) -> bool:
        return bool(self._active)

    def run_ready(self) -> None:
        """Give the turn to every invocation due now, earliest first, until all wait or are done."""
        while True:
            now = self.clock.now()
            ready = sorted(
                (i for i in self._active if i.wake is not None and i.wake <= now),
                key=lambda i: (i.wake, i.seq),
            )
            if not ready:
                return
            inv = ready[0]
            inv.wake = None
            self._yielded.clear()
            inv.go.set()
            if not self._yielded.wait(BATON_TIMEOUT_SECONDS):
                raise LambdaStuck(f"{inv.function} invocation {inv.seq} did not yield")
            if inv.done:
                self._active.remove(inv)
                if inv.thread is not None:
                    inv.thread.join(timeout=5)


class CooperativeClock:
    """The controller's Clock: virtual now, and sleeps that yield to the other Lambdas."""

    def __init__(self, clock: VirtualClock, runner: LambdaRunner) -> None:
        self._clock = clock
        self._runner = runner

    def now(self) -> datetime:
        return self._clock.now()

    def sleep(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("cannot sleep a negative time")
        self._runner.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# The network: the EIP (or domain) reaches a stand-in on loopback, nothing else is reachable
# ---------------------------------------------------------------------------------------------
class NoRoute(OSError):
    """Like a refused or timed-out connection: nothing serves at that address right now."""


class LoopbackNetwork:
    def __init__(self, emu: Emulator, fleet: NodeFleet, public_ip: str, domain: str | None = None) -> None:
        self.emu = emu
        self.fleet = fleet
        self.public_ip = public_ip
        self.domain = domain
        # No proxies, ever: a proxy from the environment would carry the request off this machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def node_behind(self, host: str) -> SimNode | None:
        if host not in (self.public_ip, self.domain):
            return None
        target = self.emu.address_target(self.public_ip)
        return self.fleet.nodes.get(target) if target else None

    def _loopback_url(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        node = self.node_behind(parts.hostname or "")
        if node is None:
            raise NoRoute(f"connection to {parts.hostname} failed: no route (nothing serves there now)")
        standin = node.standin
        if standin is None or not standin.running:
            raise NoRoute(
                f"connection to {parts.hostname} refused (Forgejo is not running on {node.instance_id})"
            )
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return f"http://127.0.0.1:{standin.port}{path}"

    def _open(self, request: urllib.request.Request, timeout: float) -> HttpResponse:
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return HttpResponse(status=response.status, body=response.read(65536))
        except urllib.error.HTTPError as exc:
            return HttpResponse(status=exc.code, body=exc.read(65536) if exc.fp else b"")
        except urllib.error.URLError as exc:
            raise NoRoute(str(exc.reason)) from exc

    def http_get(self, url: str, timeout: float, host: str | None = None) -> HttpResponse:
        """runtime.http_get for the controller: same contract as runtime.urllib_http_get."""
        if host is not None and host != self.domain:
            raise NoRoute(f"no route for Host {host}")
        request = urllib.request.Request(
            self._loopback_url(url), headers={"User-Agent": "spotforge-controller"}
        )
        return self._open(request, timeout)

    def probe(self) -> tuple[bool, str]:
        """The drill's own check through the EIP: healthy only on HTTP 200 with status pass."""
        try:
            response = self.http_get(f"http://{self.public_ip}/api/healthz", 5.0)
        except OSError as exc:
            return False, f"unreachable: {exc}"
        try:
            status = json.loads(response.body).get("status")
        except (ValueError, AttributeError):
            status = None
        return response.status == 200 and status == "pass", f"HTTP {response.status} {status}"

    def commit(self, payload: str) -> int | None:
        """A user's write through the EIP; the row id once committed, None when it failed."""
        try:
            url = self._loopback_url(f"http://{self.public_ip}/api/drill/commit")
        except OSError:
            return None
        request = urllib.request.Request(url, data=payload.encode(), method="POST")
        try:
            response = self._open(request, 5.0)
        except OSError:
            return None
        if response.status != 201:
            return None
        return int(json.loads(response.body)["id"])


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Rpo:
    committed: int  # rows acknowledged to the writer in the whole run
    committed_before_cut: int  # acknowledged before the drain began (warned) / the loss (unwarned)
    missing: int  # acknowledged rows absent from the serving database afterwards
    missing_before_backup: int  # of those, rows older than the last backup before the cut
    last_backup_at: float | None  # seconds relative to the disruption (negative: before it)
    failed_writes: int


@dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    seed: int
    passed: bool
    downtime_s: float | None
    budget_s: float
    controller_downtime_s: float | None
    rpo: Rpo
    timeline: tuple[tuple[float, str], ...]
    checks: tuple[Check, ...]
    notifications: tuple[str, ...]
    handler_errors: tuple[str, ...]
    virtual_seconds: float
    real_seconds: float
    old_instance: str
    new_instance: str | None
    new_market: str | None = None  # "spot t4g.small", "on-demand t4g.medium"...

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "passed": self.passed,
            "downtime_seconds": self.downtime_s,
            "budget_seconds": self.budget_s,
            "controller_downtime_seconds": self.controller_downtime_s,
            "rpo": self.rpo.__dict__,
            "timeline": [{"t": t, "event": what} for t, what in self.timeline],
            "checks": [c.__dict__ for c in self.checks],
            "notifications": list(self.notifications),
            "handler_errors": list(self.handler_errors),
            "virtual_seconds": self.virtual_seconds,
            "real_seconds": self.real_seconds,
            "old_instance": self.old_instance,
            "new_instance": self.new_instance,
            "new_market": self.new_market,
            "model": "modeled on documented latencies (drill/emulator/latency.py, drill/node.py NodeTimings)",
        }


# ---------------------------------------------------------------------------------------------
# The drill
# ---------------------------------------------------------------------------------------------
class Drill:
    """One emulated region with the stack deployed; use as a context manager."""

    def __init__(
        self,
        seed: int = 0,
        latency: LatencyModel | None = None,
        timings: NodeTimings | None = None,
        start: datetime = START,
        workdir: Path | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.latency = latency or LatencyModel.default()
        self.timings = timings or NodeTimings()
        self.start = start
        self._workdir = workdir
        self._tmp: str | None = None
        self.log = io.StringIO()  # controller (Powertools) log lines and EMF records
        self.probes: list[tuple[datetime, bool, str]] = []
        self.committed: list[tuple[int, datetime]] = []
        self.failed_writes = 0
        self.writing = False
        self.samples_bad: list[str] = []
        self.eip_seen: list[tuple[datetime, str | None]] = []
        self._stack = contextlib.ExitStack()

    # --- set-up ---------------------------------------------------------------------------------
    def __enter__(self) -> Drill:
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        root = self._workdir
        if root is None:
            self._tmp = tempfile.mkdtemp(prefix="spotforge-drill-")
            root = Path(self._tmp)
            self._stack.callback(shutil.rmtree, self._tmp, True)
        self.clock = VirtualClock(self.start)
        self.emu = Emulator(region="us-east-1", clock=self.clock, latency=self.latency)
        self._stack.enter_context(self.emu)
        self.region: Region = build_region(self.emu)
        env = NodeEnv(self.region.stack, self.region.region, self.region.bucket, self.region.volume_id)
        self.fleet = NodeFleet(self.emu, root, env, self.timings, standin_now=self.clock.now)
        self._stack.callback(self.fleet.close)
        self.fleet.install()
        self.runner = LambdaRunner(self.clock)
        self._stack.callback(self.runner.close)
        self.network = LoopbackNetwork(self.emu, self.fleet, self.region.public_ip)
        config = Config.from_env(self.region.controller_env())
        self.runtime = Runtime(
            config=config,
            session=self.emu.session,
            clock=CooperativeClock(self.clock, self.runner),
            http_get=self.network.http_get,
            cert_expiry=_no_certificate,
        )
        self._next_tick = self.clock.now() + timedelta(seconds=1)
        self._next_schedule = self.clock.now() + timedelta(seconds=60)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # --- the loop ---------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return (self.clock.now() - self.start).total_seconds()

    def run(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Advance the world up to `seconds` of virtual time; stop early once `until()` holds
        (checked every virtual second). Returns whether `until` was met."""
        end = self.clock.now() + timedelta(seconds=seconds)
        with contextlib.redirect_stdout(self.log):
            while True:
                self.runner.run_ready()
                if self._dispatch_events():
                    continue
                now = self.clock.now()
                if now >= end:
                    return False
                candidates = [end, self._next_tick, self._next_schedule]
                wake = self.runner.next_wake()
                if wake is not None:
                    candidates.append(wake)
                pending = self.clock.pending()
                if pending:
                    candidates.append(pending[0][0])
                self.clock.advance_to(max(now, min(candidates)))
                if self.clock.now() >= self._next_schedule:
                    self._next_schedule += timedelta(seconds=60)
                    self._scheduled()
                if self.clock.now() >= self._next_tick:
                    self._next_tick += timedelta(seconds=1)
                    self._tick()
                    if until is not None and until():
                        return True

    def invoke(self, function: str, event: Any) -> Invocation:
        return self.runner.invoke(function, event, self.runtime)

    def invoke_and_wait(self, function: str, event: Any, limit: float = 900.0) -> Invocation:
        inv = self.invoke(function, event)
        self.run(limit, until=lambda: inv.done)
        if not inv.done:
            raise DrillError(f"{function} did not finish within {limit:.0f} virtual seconds")
        return inv

    def _scheduled(self) -> None:
        event = {
            "version": "0",
            "id": f"sched-{self.elapsed():.0f}",
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": self.emu.account_id,
            "time": self.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": self.emu.region,
            "resources": [
                f"arn:aws:events:{self.emu.region}:{self.emu.account_id}:rule/{self.region.stack}-schedule"
            ],
            "detail": {},
        }
        self.invoke("reconcile", event)
        self.invoke("health", dict(event, id=event["id"] + "-health"))

    def _dispatch_events(self) -> bool:
        """EventBridge: each delivered event goes to the function the stack's rules target."""
        dispatched = False
        for event in self.emu.drain_events():
            target = rule_target(event)
            if target is not None:
                self.invoke(target, event)
                dispatched = True
        return dispatched

    def _tick(self) -> None:
        """Every virtual second: the drill's own probe, the writer, invariant samples."""
        now = self.clock.now()
        ok, detail = self.network.probe()
        self.probes.append((now, ok, detail))
        if self.writing:
            row = self.network.commit(f"row at {now.isoformat()} #{self.rng.randrange(1 << 30)}")
            if row is None:
                self.failed_writes += 1
            else:
                self.committed.append((row, now))
        self.eip_seen.append((now, self.emu.address_target(self.region.public_ip)))
        holders = [n.instance_id for n in self.fleet.nodes.values() if self.region.volume_id in n.attached]
        mounters = [n.instance_id for n in self.fleet.mounting_data()]
        servers = [n.instance_id for n in self.fleet.serving()]
        for what, ids in (("attached to", holders), ("mounted by", mounters), ("served by", servers)):
            if len(ids) > 1:
                self.samples_bad.append(f"t={self.elapsed():.0f}s data volume {what} {', '.join(ids)}")

    # --- observations -------------------------------------------------------------------------------
    def env_backup_seconds(self) -> float:
        return self.fleet.env.backup_interval_minutes * 60.0

    def recovery(self) -> Any:
        return read_recovery(self.runtime)

    def serving_node(self) -> SimNode | None:
        serving = self.fleet.serving()
        return serving[0] if len(serving) == 1 else None

    def settled(self, not_on: str | None = None) -> bool:
        """One node serves, the EIP reaches it, the last probe passed, no recovery is open."""
        node = self.serving_node()
        if node is None or node.instance_id == not_on or not self.probes or not self.probes[-1][1]:
            return False
        if self.emu.address_target(self.region.public_ip) != node.instance_id:
            return False
        rec = self.recovery()
        return rec is None or not rec.open

    def instance(self, instance_id: str) -> dict[str, Any]:
        ec2 = self.emu.session.client("ec2")
        return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]

    def world_snapshot(self) -> dict[str, Any]:
        """What a reconcile could change: instances and their tags, the volume, the address."""
        ec2 = self.emu.session.client("ec2")
        instances = sorted(
            (
                i["InstanceId"],
                i["State"]["Name"],
                tuple(sorted((t["Key"], t["Value"]) for t in i.get("Tags", []))),
            )
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
        )
        volume = ec2.describe_volumes(VolumeIds=[self.region.volume_id])["Volumes"][0]
        address = ec2.describe_addresses(AllocationIds=[self.region.allocation_id])["Addresses"][0]
        return {
            "instances": instances,
            "volume": (
                volume["State"],
                [(a["InstanceId"], a["State"]) for a in volume.get("Attachments", [])],
            ),
            "address": address.get("InstanceId"),
        }


def rule_target(event: Mapping[str, Any]) -> str | None:
    """The function the stack's EventBridge rules send an event to (infra_stack/controller.py _rules)."""
    source, kind = event.get("source"), event.get("detail-type")
    if (source, kind) in (
        ("aws.ec2", "EC2 Spot Instance Interruption Warning"),
        ("spotforge.node", "Spot Interruption Signal"),
    ):
        return "interruption"
    if (source, kind) == ("aws.ec2", "EC2 Instance Rebalance Recommendation"):
        return "rebalance"
    if (source, kind) == ("aws.ec2", "EC2 Instance State-change Notification"):
        detail = event.get("detail")
        return "reconcile" if isinstance(detail, Mapping) and detail.get("state") in LOSS_STATES else None
    return None


def _no_certificate(hostname: str, timeout: float) -> datetime:
    # The drill serves plain HTTP on the EIP (no DOMAIN): there is no certificate to read.
    raise OSError(f"no TLS endpoint for {hostname} in the drill")


def lifecycle_create(region: Region) -> dict[str, Any]:
    """The CloudFormation Create request the CDK Provider framework hands the lifecycle function."""
    return {
        "RequestType": "Create",
        "RequestId": "drill-create-1",
        "StackId": f"arn:aws:cloudformation:{region.region}:123456789012:stack/{region.stack}/drill",
        "LogicalResourceId": "FirstNodeAndCleanup",
        "ResourceType": "Custom::SpotforgeLifecycle",
        "ResourceProperties": {"SpotTemplateVersion": "1", "OnDemandTemplateVersion": "1"},
    }


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------
DEPLOY_LIMIT_S = 600.0
RECOVERY_LIMIT_S = 600.0
AFTER_RECOVERY_S = 90.0


def run_scenario(
    scenario: str,
    seed: int = 0,
    latency: LatencyModel | None = None,
    timings: NodeTimings | None = None,
    log_path: Path | None = None,
    prepare: Callable[[Drill], None] | None = None,
    steady_seconds: float | None = None,
) -> ScenarioResult:
    """First deploy, steady writes past one backup, then the disruption and the recovery.
    `prepare(drill)` runs just before the disruption (e.g. to inject capacity faults);
    `steady_seconds` replaces the default steady phase (past the first backup plus a seeded
    0-60 s) when the scenario does not need a backup before the disruption."""
    if scenario not in BUDGETS:
        raise DrillError(f"unknown scenario {scenario!r}: expected one of {', '.join(BUDGETS)}")
    wall = time.monotonic()
    with Drill(seed=seed, latency=latency, timings=timings) as drill:
        try:
            return _scenario(drill, scenario, wall, prepare, steady_seconds)
        finally:
            if log_path is not None:
                log_path.write_text(drill.log.getvalue())


def _scenario(
    drill: Drill,
    scenario: str,
    wall: float,
    prepare: Callable[[Drill], None] | None = None,
    steady_seconds: float | None = None,
) -> ScenarioResult:
    checks: list[Check] = []
    # 1. First deploy: CloudFormation Create runs the lifecycle function.
    deploy = drill.invoke("lifecycle", lifecycle_create(drill.region))
    deployed = drill.run(DEPLOY_LIMIT_S, until=lambda: deploy.done and drill.settled())
    checks.append(
        Check("first deploy serves and passes its health check", deployed, f"at t={drill.elapsed():.0f}s")
    )
    old = drill.serving_node()
    if not deployed or old is None:
        raise DrillError(f"the first deploy did not settle: {deploy.error or deploy.result}")
    # 2. Users write; run past the first backup (the timer fires 5 min after serving), then a
    #    seeded extra so the disruption lands at a different phase of the schedule each seed.
    drill.writing = True
    jitter = drill.rng.uniform(0, 60)
    if steady_seconds is None:
        steady_seconds = drill.timings.admin_user + drill.env_backup_seconds() + 15 + jitter
    drill.run(steady_seconds)
    last_backup = _last_backup_time(old)
    # 3. The disruption.
    if prepare is not None:
        prepare(drill)
    t0 = drill.clock.now()
    if scenario == "warned":
        drill.emu.interrupt(old.instance_id)
    else:
        drill.emu.lose(old.instance_id)
    recovered = drill.run(RECOVERY_LIMIT_S, until=lambda: drill.settled(not_on=old.instance_id))
    checks.append(
        Check("a new node serves and passes its health check", recovered, f"at T+{_since(drill, t0):.0f}s")
    )
    drill.run(AFTER_RECOVERY_S)
    drill.writing = False
    new = drill.serving_node()

    # 4. Measure.
    downtime = _downtime(drill.probes, t0)
    budget = BUDGETS[scenario]
    checks.append(
        Check(
            f"downtime within the {scenario} budget (<= {budget:.0f} s)",
            downtime is not None and downtime <= budget,
            f"{downtime:.0f} s" if downtime is not None else "never recovered",
        )
    )
    cut = _drain_start(old) if scenario == "warned" else t0
    rpo = _rpo(drill, new, cut or t0, last_backup, t0)
    if scenario == "warned":
        checks.append(Check("no committed row lost (RPO 0)", rpo.missing == 0, f"{rpo.missing} missing"))
    else:
        checks.append(
            Check(
                "rows lost are only those newer than the last backup",
                rpo.missing_before_backup == 0,
                f"{rpo.missing} missing, {rpo.missing_before_backup} older than the last backup",
            )
        )
    checks.extend(_invariants(drill, new))
    errors = tuple(f"{i.function}#{i.seq}: {i.error}" for i in drill.runner.invocations if i.error)
    checks.append(Check("no handler raised", not errors, "; ".join(errors)))
    rec = drill.recovery()
    subjects = tuple(str(m.get("Subject", "")) for m in read_inbox(drill.emu, drill.region))
    timeline = _timeline(drill, old, new, t0, scenario)
    return ScenarioResult(
        scenario=scenario,
        seed=drill.seed,
        passed=all(c.ok for c in checks),
        downtime_s=downtime,
        budget_s=budget,
        controller_downtime_s=rec.downtime_seconds if rec is not None else None,
        rpo=rpo,
        timeline=timeline,
        checks=tuple(checks),
        notifications=subjects,
        handler_errors=errors,
        virtual_seconds=round(drill.elapsed(), 1),
        real_seconds=round(time.monotonic() - wall, 2),
        old_instance=old.instance_id,
        new_instance=new.instance_id if new else None,
        new_market=_market(drill, new.instance_id) if new else None,
    )


def _market(drill: Drill, instance_id: str) -> str:
    instance = drill.instance(instance_id)
    return f"{drill.emu.market_of(instance_id)} {instance.get('InstanceType', '?')}"


def _since(drill: Drill, t0: datetime) -> float:
    return (drill.clock.now() - t0).total_seconds()


def _last_backup_time(node: SimNode) -> datetime | None:
    done = [r for r in node.runs if r.argv[:1] == ("backup",) and r.exit_code == 0]
    return done[-1].started if done else None


def _drain_start(node: SimNode) -> datetime | None:
    return next((r.started for r in node.runs if r.argv[:1] == ("drain",)), None)


def _downtime(probes: list[tuple[datetime, bool, str]], t0: datetime) -> float | None:
    """First failed probe at or after t0 to the first pass after it; 0 when nothing failed."""
    after = [(t, ok) for t, ok, _ in probes if t >= t0]
    first_fail = next((t for t, ok in after if not ok), None)
    if first_fail is None:
        return 0.0
    back = next((t for t, ok in after if ok and t > first_fail), None)
    return (back - first_fail).total_seconds() if back is not None else None


def _rpo(drill: Drill, new: SimNode | None, cut: datetime, last_backup: datetime | None, t0: datetime) -> Rpo:
    present: set[int] = set()
    if new is not None and new.standin is not None and new.standin.running:
        present = set(new.standin.row_ids())
    before_cut = [(row, t) for row, t in drill.committed if t < cut]
    missing = [(row, t) for row, t in drill.committed if row not in present]
    old_missing = [r for r, t in missing if last_backup is None or t < last_backup]
    return Rpo(
        committed=len(drill.committed),
        committed_before_cut=len(before_cut),
        missing=len(missing),
        missing_before_backup=len(old_missing),
        last_backup_at=round((last_backup - t0).total_seconds(), 1) if last_backup else None,
        failed_writes=drill.failed_writes,
    )


def _invariants(drill: Drill, new: SimNode | None) -> list[Check]:
    checks = [
        Check(
            "no emulator violations",
            not drill.emu.violations,
            "; ".join(f"{v.kind}: {v.detail}" for v in drill.emu.violations),
        ),
        Check(
            "data volume attached to / mounted by / served from at most one node at every second",
            not drill.samples_bad,
            "; ".join(drill.samples_bad[:3]),
        ),
    ]
    serving = drill.fleet.serving()
    checks.append(
        Check("exactly one serving node", len(serving) == 1, ", ".join(n.instance_id for n in serving))
    )
    if new is not None:
        tags = {t["Key"]: t["Value"] for t in drill.instance(new.instance_id).get("Tags", [])}
        state = drill.instance(new.instance_id)["State"]["Name"]
        checks.append(
            Check(
                "the serving node is running and tagged serving",
                state == "running" and tags.get("spotforge:phase") == "serving",
                f"{state}, phase={tags.get('spotforge:phase')}",
            )
        )
        address = drill.world_snapshot()["address"]
        routed = drill.emu.address_target(drill.region.public_ip)
        checks.append(
            Check(
                "the Elastic IP is on the serving node",
                address == new.instance_id and routed == new.instance_id,
                f"associated with {address}, routes to {routed}",
            )
        )
    # Level-triggered: once settled, reconciling again must change nothing.
    drill.invoke_and_wait("reconcile", _manual_schedule(drill))
    before = drill.world_snapshot()
    second = drill.invoke_and_wait("reconcile", _manual_schedule(drill))
    after = drill.world_snapshot()
    actions = (second.result or {}).get("actions", [])
    checks.append(
        Check(
            "a second reconcile makes no changes",
            second.error is None and not actions and before == after,
            second.error or (f"actions: {actions}" if actions else "no actions"),
        )
    )
    return checks


def _manual_schedule(drill: Drill) -> dict[str, Any]:
    return {
        "version": "0",
        "id": f"drill-check-{drill.elapsed():.0f}",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": drill.emu.account_id,
        "time": drill.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": drill.emu.region,
        "resources": [f"arn:aws:events:{drill.emu.region}:{drill.emu.account_id}:rule/drill-check"],
        "detail": {},
    }


def _timeline(
    drill: Drill, old: SimNode, new: SimNode | None, t0: datetime, scenario: str
) -> tuple[tuple[float, str], ...]:
    def rel(moment: datetime | None) -> float | None:
        return round((moment - t0).total_seconds(), 1) if moment is not None else None

    volume = drill.region.volume_id
    items: list[tuple[float | None, str]] = [
        (0.0, "spot interruption warning" if scenario == "warned" else "node lost without warning"),
    ]
    if new is not None:
        launched = drill.instance(new.instance_id).get("LaunchTime")
        if isinstance(launched, datetime):
            launched = launched.replace(tzinfo=UTC) if launched.tzinfo is None else launched
        items += [
            (rel(launched), f"replacement {new.instance_id} launched"),
            (rel(new.first("running")), "replacement running"),
            (rel(new.first("phase standby")), "replacement standby"),
        ]
    items.append((rel(old.first("agent signaled the interruption")), "node agent signaled it (IMDS watch)"))
    drain = next((r for r in old.runs if r.argv[:1] == ("drain",)), None)
    if drain is not None:
        items += [
            (rel(drain.started), "drain start (old node)"),
            (rel(drain.ended), f"drain end (exit {drain.exit_code})"),
        ]
    items.append((rel(old.first(f"detached {volume}")), "volume detached from the old node"))
    if new is not None:
        items.append((rel(new.first(f"attached {volume}")), "volume attached to the replacement"))
        moved = next((t for t, target in drill.eip_seen if t >= t0 and target == new.instance_id), None)
        items += [
            (rel(moved), "EIP routes to the replacement"),
            (rel(new.first("forgejo up")), "Forgejo up on the replacement"),
            (rel(new.first("phase serving")), "replacement tagged serving"),
        ]
    fail = next((t for t, ok, _ in drill.probes if t >= t0 and not ok), None)
    if fail is not None:
        items.append((rel(fail), "first failed probe"))
        back = next((t for t, ok, _ in drill.probes if t > fail and ok), None)
        items.append((rel(back), "health pass (drill probe)"))
    rec = drill.recovery()
    if rec is not None and rec.closed_at is not None:
        items.append((rel(rec.closed_at), "controller closed the recovery"))
    items.append((rel(old.first("shutdown")), "old node shut down"))
    known = [(t, what) for t, what in items if t is not None]
    return tuple(sorted(known, key=lambda item: item[0]))
