"""The simulated node: an emulated instance that boots like the real bootstrap, on the virtual clock,
and runs the REAL node agent (`userdata/agent/spotforge_agent.py`) through a `Platform` of its own.

- Disks: every EBS volume is a folder (`VolumeDisks`); the data volume's folder outlives nodes, it
  IS the volume. A "filesystem" is a superblock file next to the folder's contents, so `blkid`
  (probe_filesystem) and `mkfs` (make_filesystem) have something real to look at.
- Mount: the node's mount point (`<node>/srv/spotforge`) becomes a symlink to the volume's folder,
  only while the volume is attached to this instance.
- Boot (bootstrap.sh order): user data starts, packages, k3s install, image pull overlapping k3s
  start; then `set-phase standby`. Once standby and the data volume attached: the agent's
  `mount_data` (formats only when blank, restores from S3 when blank and a backup exists), the
  volume layout, Forgejo (the stand-in HTTP server) and `set-phase serving`; then the backup timer.
- SSM: `spotforge-agent <args>` lines run the agent's own CLI parser and `run_command` against a
  context whose clock advances by modeled durations (NodeTimings), and the emulator learns the
  command's duration from that clock.
- Shutdown: the stand-in dies as a killed process does (database not closed).

Durations come from NodeTimings; each names its row in research/aws-latencies.md or says UNSOURCED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .forgejo_standin import ForgejoStandin

# The agent ships as a standalone script (userdata/agent), not as an installed package.
_AGENT_DIR = Path(__file__).resolve().parents[1] / "userdata" / "agent"
if str(_AGENT_DIR) not in sys.path:
    sys.path.insert(0, str(_AGENT_DIR))

import spotforge_agent as agent  # noqa: E402

if TYPE_CHECKING:
    from .emulator import Emulator

AGENT_NAME = "spotforge-agent"
DATA_MOUNT_NAME = Path("srv") / "spotforge"

TIMING_SOURCES: dict[str, str] = {
    "userdata_start": "2a running->SSH ready 3.2 s (brevdev/ec2-coldboot-research, AL2023); 2f: t4g is UNSOURCED",
    "packages": "UNSOURCED estimate: dnf install of the agent's packages, 8 s",
    "k3s_install": "6c UNSOURCED estimate 10-25 s; 15 s",
    "cluster_ready": "6b UNSOURCED estimate: k3s node Ready 15-30 s after start; 20 s",
    "image_pull": "6f UNSOURCED (derived from 6e): ~100 MB image 5-20 s from Codeberg; 10 s, overlapping k3s start",
    "device_appears": "3d UNSOURCED estimate <1 s after 'attached'; 0.5 s",
    "mount": "UNSOURCED estimate: blkid + mount, 0.5 s",
    "mkfs": "UNSOURCED estimate: mkfs.ext4 of a 20 GB gp3 volume (lazy init), 2 s",
    "layout_and_apply": "UNSOURCED estimate: volume layout + kubectl apply, 2 s",
    "forgejo_start": "6g UNSOURCED estimate 2-10 s from start to /api/healthz 200; 5 s",
    "admin_user": "UNSOURCED estimate: kubectl exec + SSM GetParameter, 2 s",
    "stop_workloads": "UNSOURCED estimate: kubectl scale to 0 and wait for the pods to go, 3 s",
    "agent_start": "1i UNSOURCED estimate: Python start + boto3 import, 0.3 s",
    "s3_request": "UNSOURCED estimate: 0.05 s per in-region S3 request",
    "s3_bytes_per_second": "UNSOURCED estimate: 50 MB/s to S3 from a t4g.small",
    "sync": "UNSOURCED estimate: 0.3 s",
    "unmount": "UNSOURCED estimate: 0.2 s",
    "mount_retry": "bootstrap.sh: mount_data retries every 10 s",
}


@dataclass(frozen=True)
class NodeTimings:
    """Seconds of virtual time for the node's own steps; see TIMING_SOURCES."""

    userdata_start: float = 3.2
    packages: float = 8.0
    k3s_install: float = 15.0
    cluster_ready: float = 20.0
    image_pull: float = 10.0
    device_appears: float = 0.5
    mount: float = 0.5
    mkfs: float = 2.0
    layout_and_apply: float = 2.0
    forgejo_start: float = 5.0
    admin_user: float = 2.0
    stop_workloads: float = 3.0
    agent_start: float = 0.3
    s3_request: float = 0.05
    s3_bytes_per_second: float = 50e6
    sync: float = 0.3
    unmount: float = 0.2
    mount_retry: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"timing {f.name} must not be negative")
        if self.s3_bytes_per_second <= 0:
            raise ValueError("s3_bytes_per_second must be positive")

    @property
    def boot_to_standby(self) -> float:
        """From `running` to the standby tag: bootstrap.sh pulls the image while k3s starts."""
        return (
            self.userdata_start + self.packages + self.k3s_install + max(self.cluster_ready, self.image_pull)
        )

    def replace(self, **changes: float) -> NodeTimings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def instant(cls) -> NodeTimings:
        """Every step at once (tests of logic, not of timing)."""
        zero = {f.name: 0.0 for f in dataclasses.fields(cls) if f.name != "s3_bytes_per_second"}
        return cls(**zero)

    @staticmethod
    def sources() -> dict[str, str]:
        return dict(TIMING_SOURCES)


@dataclass(frozen=True)
class NodeEnv:
    """What the user data writes to /etc/spotforge/node.env (docs/design.md), as the node needs it."""

    stack: str
    region: str
    bucket: str
    volume_id: str
    backup_prefix: str = "backups/"
    backup_interval_minutes: int = 5


class VolumeDisks:
    """volume id -> folder. `<root>/<vol>/fs` holds the filesystem's contents and
    `<root>/<vol>/superblock` marks that a filesystem exists (what blkid would find)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, volume_id: str) -> Path:
        path = self.root / volume_id / "fs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _superblock(self, volume_id: str) -> Path:
        return self.root / volume_id / "superblock"

    def has_filesystem(self, volume_id: str) -> bool:
        return self._superblock(volume_id).exists()

    def holds_data(self, volume_id: str) -> bool:
        """Anything a format would destroy: a filesystem, or any bytes in the folder."""
        return self.has_filesystem(volume_id) or any(self.folder(volume_id).iterdir())

    def format(self, volume_id: str) -> None:
        """mkfs: whatever was there is gone, an empty filesystem with lost+found remains."""
        folder = self.folder(volume_id)
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / "lost+found").mkdir(mode=0o700)
        self._superblock(volume_id).write_text(f"TYPE=ext4\nLABEL=spotforge-data\nUUID={volume_id}-fs\n")

    def blkid(self, volume_id: str) -> tuple[int, str]:
        """`blkid -p -o export` on the volume: 0 + fields, 2 = nothing found, 8 = ambivalent."""
        if self.has_filesystem(volume_id):
            return 0, self._superblock(volume_id).read_text()
        if any(self.folder(volume_id).iterdir()):
            return 8, ""  # bytes without a recognisable filesystem
        return 2, ""


class AgentClock(agent.Clock):
    """The agent's clock during one command: starts at the virtual now and advances only by the
    modeled durations the platform charges, so the command's length is known when it returns."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.elapsed = 0.0

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.elapsed += max(0.0, seconds)


@dataclass(frozen=True)
class AgentRun:
    """One agent command on a node: when it started (virtual), its modeled length and result."""

    argv: tuple[str, ...]
    started: datetime
    seconds: float
    exit_code: int
    stdout: str
    stderr: str
    via: str  # "ssm" | "boot" | "timer"

    @property
    def ended(self) -> datetime:
        return self.started + timedelta(seconds=self.seconds)


class SimImds(agent.ImdsClient):
    """IMDS as the emulator knows it (spot/instance-action and the rebalance notice; None where
    IMDS answers 404). Answered in-process: nothing goes to 169.254.169.254."""

    def __init__(self, node: SimNode) -> None:
        super().__init__("http://169.254.169.254", AgentClock(node.emu.clock.now()))
        self.node = node

    def get(self, path: str) -> str | None:
        node, path = self.node, path.strip("/")
        if path == "meta-data/instance-id":
            return node.instance_id
        if path == "meta-data/placement/region":
            return node.env.region
        if path == "meta-data/spot/instance-action":
            doc = node.emu.imds_instance_action(node.instance_id)
        elif path == "meta-data/events/recommendations/rebalance":
            doc = node.emu.imds_rebalance(node.instance_id)
        else:
            return None
        return json.dumps(doc) if doc else None


class SimEventBus:
    """The agent's EventBridge client: PutEvents on the default bus, delivered into `emu.events`
    after the model's delivery latency, in the envelope EventBridge gives custom events."""

    def __init__(self, node: SimNode) -> None:
        self.node = node

    def put_events(self, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        emu = self.node.emu
        answers = []
        for entry in Entries:
            event = {
                "version": "0",
                "id": str(uuid.uuid4()),
                "detail-type": entry["DetailType"],
                "source": entry["Source"],
                "account": emu.account_id,
                "time": emu.clock.now().strftime("%Y-%m-%dT%H:%M:%SZ"),
                "region": emu.region,
                "resources": list(entry.get("Resources", [])),
                "detail": json.loads(entry.get("Detail") or "{}"),
            }
            emu.clock.call_later(
                emu.latency.event_delivery,
                lambda event=event: emu.events.append(event),
                f"deliver {event['detail-type']}",
            )
            answers.append({"EventId": event["id"]})
        return {"FailedEntryCount": 0, "Entries": answers}


class SimPlatform(agent.Platform):
    """The agent's host operations on the simulated node."""

    def __init__(self, node: SimNode) -> None:
        self.node = node
        self.clock: AgentClock | None = None

    def charge(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.sleep(seconds)

    # --- workloads -------------------------------------------------------------------------
    def stop_workloads(self, timeout_s: float) -> None:
        self.node.stop_forgejo()
        self.charge(min(self.node.timings.stop_workloads, max(timeout_s, 0.0)))

    def start_workloads(self) -> None:
        self.node.start_forgejo()
        self.charge(self.node.timings.forgejo_start)

    def restart_workloads(self) -> None:
        self.stop_workloads(30.0)
        self.start_workloads()

    # --- mounts and devices -------------------------------------------------------------------
    def is_mounted(self, path: str) -> bool:
        return self.node.mounted_volume is not None and Path(path) == self.node.mount_path

    def mount(self, device: str, path: str) -> None:
        node = self.node
        volume_id = node.volume_for_device(device)
        if volume_id is None:
            raise agent.DeviceError(f"mount: {device} does not exist")
        if Path(path) != node.mount_path:
            raise agent.DeviceError(f"mount: the simulated node mounts only at {node.mount_path}")
        if node.mounted_volume is not None:
            raise agent.BusyError(f"mount: {path} is already mounted")
        if node.mount_path.is_symlink() or any(node.mount_path.iterdir()):
            raise agent.DeviceError(f"mount: {path} is not an empty directory")
        node.mount_path.rmdir()
        node.mount_path.symlink_to(node.disks.folder(volume_id), target_is_directory=True)
        node.mounted_volume = volume_id
        node.note(f"mounted {volume_id}")
        self.charge(node.timings.mount)

    def unmount(self, path: str) -> None:
        node = self.node
        if node.mounted_volume is None or Path(path) != node.mount_path:
            return
        if node.standin is not None and node.standin.running:
            raise agent.BusyError(f"umount: {path}: target is busy (Forgejo still runs)")
        node.release_mount(graceful=True)
        self.charge(node.timings.unmount)

    def sync(self) -> None:
        self.charge(self.node.timings.sync)

    def find_block_device(self, volume_id: str) -> str | None:
        return self.node.attached.get(volume_id)

    def probe_filesystem(self, device: str) -> tuple[int, str]:
        volume_id = self.node.volume_for_device(device)
        if volume_id is None:
            return 2, ""  # blkid: no such device identified
        code, fields = self.node.disks.blkid(volume_id)
        return code, (f"DEVNAME={device}\n" + fields) if code == 0 else fields

    def make_filesystem(self, device: str) -> None:
        node = self.node
        volume_id = node.volume_for_device(device)
        if volume_id is None:
            raise agent.DeviceError(f"mkfs: {device} does not exist")
        if node.disks.holds_data(volume_id):
            # mkfs would destroy it: the invariant the product must never break.
            node.emu.record_violation(
                "format-over-data", f"{node.instance_id} formatted {volume_id}, which held data"
            )
        node.disks.format(volume_id)
        node.note(f"formatted {volume_id}")
        self.charge(node.timings.mkfs)

    # --- identity and tags ------------------------------------------------------------------
    def instance_identity(self) -> dict[str, str]:
        return {"instance-id": self.node.instance_id, "region": self.node.env.region}

    def set_phase_tag(self, phase: str) -> None:
        self.node.ec2.create_tags(
            Resources=[self.node.instance_id], Tags=[{"Key": "spotforge:phase", "Value": phase}]
        )
        self.node.phase = phase
        self.node.note(f"phase {phase}")


class SimNode:
    """One emulated instance; see the module docstring. Made by `NodeFleet.factory`."""

    def __init__(
        self,
        instance_id: str,
        emu: Emulator,
        env: NodeEnv,
        disks: VolumeDisks,
        root: Path,
        timings: NodeTimings,
        standin_now: Callable[[], datetime] | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.emu = emu
        self.env = env
        self.disks = disks
        self.timings = timings
        self.root = Path(root) / instance_id
        self.mount_path = self.root / DATA_MOUNT_NAME
        self.mount_path.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.root / "var" / "lib" / "spotforge"
        self._standin_now = standin_now
        self.attached: dict[str, str] = {}
        self.mounted_volume: str | None = None
        self.standin: ForgejoStandin | None = None
        self.phase = "booting"
        self.alive = True
        self.standby_reached = False
        self.log: list[tuple[datetime, str]] = []
        self.runs: list[AgentRun] = []
        self.platform = SimPlatform(self)
        self._mounting = False
        self._watching = False
        self._timers: list[Any] = []
        self._busy_until: dict[str, datetime] = {}
        self._ec2: Any = None
        self._s3: Any = None
        self.note("running")
        self._boot()

    # --- clients (made from the emulator's session: strict EC2, moto S3) ---------------------
    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = self.emu.session.client("ec2")
        return self._ec2

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = self.emu.session.client("s3")
            self._s3.meta.events.register("before-parameter-build.s3", self._charge_s3)
        return self._s3

    def _charge_s3(self, params: dict[str, Any], **_: Any) -> None:
        body = params.get("Body")
        size = len(body) if isinstance(body, bytes | bytearray) else 0
        self.platform.charge(self.timings.s3_request + size / self.timings.s3_bytes_per_second)

    # --- bookkeeping ----------------------------------------------------------------------------
    def note(self, what: str) -> None:
        self.log.append((self.emu.clock.now(), what))

    def first(self, what: str) -> datetime | None:
        return next((t for t, w in self.log if w == what), None)

    def _later(self, seconds: float, fn: Callable[[], None], label: str) -> None:
        self._timers.append(self.emu.clock.call_later(seconds, fn, f"{label} {self.instance_id}"))

    def volume_for_device(self, device: str) -> str | None:
        return next((v for v, d in self.attached.items() if d == device), None)

    def context(self, clock: AgentClock) -> agent.Context:
        settings = agent.Settings(
            stack=self.env.stack,
            region=self.env.region,
            bucket=self.env.bucket,
            volume_id=self.env.volume_id,
            mount=str(self.mount_path),
            backup_prefix=self.env.backup_prefix,
            backup_interval_minutes=self.env.backup_interval_minutes,
            state_dir=str(self.state_dir),
        )
        settings.validate()
        return agent.Context(
            settings=settings,
            s3=self.s3,
            platform=self.platform,
            clock=clock,
            ec2=self.ec2,
            events=SimEventBus(self),
            lock_timeout_s=5.0,
        )

    # --- the agent ------------------------------------------------------------------------------
    def run_agent(self, args: list[str], via: str) -> AgentRun:
        """Run `spotforge-agent <args>` as the CLI would: one stderr line and the error class's
        exit code on failure. Effects happen now; the run's modeled length is returned."""
        clock = AgentClock(self.emu.clock.now())
        self.platform.clock = clock
        was_mounted = self.mounted_volume
        before = agent.StateStore(str(self.state_dir)).load()
        out, err = io.StringIO(), io.StringIO()
        code = 0
        try:
            # stderr too: the agent's log lines belong to the command's output, as on a real node.
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                parsed = agent.build_parser().parse_args(args)
                if parsed.command == "watch" and not parsed.once:
                    # Without --once it polls forever; the node runs it as its watch service.
                    raise agent.ConfigError(
                        "watch without --once never returns; the node runs it as a service"
                    )
                code = agent.run_command(parsed, self.context(clock), SimImds(self))
        except SystemExit as exc:  # argparse: usage errors
            code = int(exc.code or 2)
        except agent.AgentError as exc:
            command = args[0] if args else "?"
            err.write(
                f"{AGENT_NAME}: {command}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n"
            )
            code = exc.exit_code
        except Exception as exc:  # the CLI's last resort: one line, exit 1
            err.write(f"{AGENT_NAME}: unexpected {type(exc).__name__}: {exc}\n")
            code = 1
        finally:
            self.platform.clock = None
        run = AgentRun(
            tuple(args),
            clock.start,
            self.timings.agent_start + clock.elapsed,
            code,
            out.getvalue(),
            err.getvalue(),
            via,
        )
        if was_mounted is not None and self.mounted_volume is None:
            # The unmount is the last step of the modeled run: until it ends, the kernel still
            # holds the volume, so a detach stays busy (research 3e).
            self._busy_until[was_mounted] = run.ended
        if via == "watch":
            after = agent.StateStore(str(self.state_dir)).load()
            if after.get("interruption_signaled") != before.get("interruption_signaled"):
                self.note("agent signaled the interruption")
            if code == 0 and not run.stderr and after == before:
                return run  # a quiet poll: nothing worth a line in the node's log
        self.runs.append(run)
        self.note(f"agent {' '.join(args)} -> {code}")
        return run

    def run_command(self, argv: list[str]) -> tuple[int, str, str, float | None]:
        """SSM Run Command (AWS-RunShellScript), one command line."""
        if not argv or os.path.basename(argv[0]) != AGENT_NAME:
            name = argv[0] if argv else ""
            return 127, "", f"{name}: command not found\n", 0.01
        run = self.run_agent(list(argv[1:]), "ssm")
        return run.exit_code, run.stdout, run.stderr, run.seconds

    # --- boot ------------------------------------------------------------------------------------
    def _boot(self) -> None:
        self.standby_reached = False
        self._later(self.timings.boot_to_standby, self._reach_standby, "standby")

    def _reach_standby(self) -> None:
        if not self.alive:
            return
        run = self.run_agent(["set-phase", "standby"], "boot")
        if run.exit_code != 0:
            self.note(f"standby tag failed: {run.stderr.strip()}")
        self.standby_reached = True
        self._maybe_mount()

    def _maybe_mount(self) -> None:
        if not (self.alive and self.standby_reached and self.env.volume_id in self.attached):
            return
        if self._mounting or self.mounted_volume is not None:
            return
        self._mounting = True
        run = self.run_agent(["mount-data", "--wait", "0"], "boot")
        if run.exit_code != 0 or self.mounted_volume is None:
            self._mounting = False
            self._later(self.timings.mount_retry, self._maybe_mount, "mount retry")
            return
        self._layout()
        delay = self.timings.device_appears + run.seconds + self.timings.layout_and_apply
        self._later(delay + self.timings.forgejo_start, self._forgejo_up, "forgejo up")

    def _layout(self) -> None:
        """bootstrap.sh prepare_volume_dirs: forgejo/ and traefik/acme.json (0600)."""
        (self.mount_path / "forgejo").mkdir(exist_ok=True)
        traefik = self.mount_path / "traefik"
        traefik.mkdir(mode=0o700, exist_ok=True)
        acme = traefik / "acme.json"
        if not acme.exists():
            acme.touch()
        acme.chmod(0o600)

    def _forgejo_up(self) -> None:
        self._mounting = False
        if not self.alive or self.mounted_volume is None:
            return
        self.start_forgejo()
        self._later(self.timings.admin_user, self._serving, "serving")

    def _serving(self) -> None:
        if not self.alive or self.standin is None or not self.standin.running:
            return
        run = self.run_agent(["set-phase", "serving"], "boot")
        if run.exit_code != 0:
            self.note(f"serving tag failed: {run.stderr.strip()}")
        interval = self.env.backup_interval_minutes * 60.0
        self._later(interval, self._backup_timer, "backup timer")
        if not self._watching:
            self._watching = True
            self._later(agent.WATCH_INTERVAL_S, self._watch_service, "watch")

    def _watch_service(self) -> None:
        """spotforge-agent-watch.service: `watch` polls IMDS every WATCH_INTERVAL_S."""
        if not self.alive:
            return
        self.run_agent(["watch", "--once"], "watch")
        self._later(agent.WATCH_INTERVAL_S, self._watch_service, "watch")

    def _backup_timer(self) -> None:
        if not self.alive:
            return
        if self.mounted_volume is not None and self.phase == "serving":
            self.run_agent(["backup"], "timer")
        self._later(self.env.backup_interval_minutes * 60.0, self._backup_timer, "backup timer")

    # --- Forgejo -----------------------------------------------------------------------------------
    def start_forgejo(self) -> None:
        if self.mounted_volume is None:
            raise agent.WorkloadError("forgejo: the data volume is not mounted (pod would not start)")
        if self.standin is not None and self.standin.running:
            return
        self.standin = ForgejoStandin(self.mount_path / "forgejo", now=self._standin_now)
        self.standin.start()
        self.note("forgejo up")

    def stop_forgejo(self) -> None:
        if self.standin is not None and self.standin.running:
            self.standin.stop()
            self.note("forgejo stopped")

    def release_mount(self, graceful: bool) -> None:
        if self.mounted_volume is None:
            return
        if self.standin is not None and self.standin.running:
            self.standin.crash()
            self.note("forgejo crashed")
        volume_id, self.mounted_volume = self.mounted_volume, None
        if self.mount_path.is_symlink():
            self.mount_path.unlink()
        self.mount_path.mkdir(parents=True, exist_ok=True)
        self.note(f"unmounted {volume_id}" if graceful else f"lost mount of {volume_id}")

    # --- emulator hooks ---------------------------------------------------------------------------
    def is_mounted(self, volume_id: str) -> bool:
        if self.mounted_volume == volume_id:
            return True
        until = self._busy_until.get(volume_id)
        return until is not None and self.emu.clock.now() < until

    def on_volume_attached(self, volume_id: str, device: str) -> None:
        self.attached[volume_id] = device
        self.note(f"attached {volume_id}")
        if volume_id == self.env.volume_id:
            self._maybe_mount()

    def on_volume_detached(self, volume_id: str) -> None:
        self.attached.pop(volume_id, None)
        self._busy_until.pop(volume_id, None)
        if self.mounted_volume == volume_id:
            self.release_mount(graceful=False)
        self.note(f"detached {volume_id}")

    def on_shutdown(self) -> None:
        self.alive = False
        self._watching = False
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self.standin is not None and self.standin.running:
            # Whatever happens to the instance, the process dies without closing its database.
            self.standin.crash()
            self.note("forgejo crashed")
        self.note("shutdown")

    def on_boot(self) -> None:
        self.alive = True
        self.phase = "booting"
        self.note("running")
        self._boot()


@dataclass
class NodeFleet:
    """The drill's nodes and disks: install with `emu.set_node_factory(fleet.factory)`."""

    emu: Emulator
    root: Path
    env: NodeEnv
    timings: NodeTimings = field(default_factory=NodeTimings)
    standin_now: Callable[[], datetime] | None = None
    nodes: dict[str, SimNode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.disks = VolumeDisks(Path(self.root) / "volumes")

    def factory(self, instance_id: str, emu: Emulator) -> SimNode:
        node = SimNode(
            instance_id, emu, self.env, self.disks, Path(self.root) / "nodes", self.timings, self.standin_now
        )
        self.nodes[instance_id] = node
        return node

    def install(self) -> None:
        self.emu.set_node_factory(self.factory)

    def serving(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive and n.standin is not None and n.standin.running]

    def mounting_data(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.mounted_volume == self.env.volume_id]

    def close(self) -> None:
        for node in self.nodes.values():
            if node.standin is not None and node.standin.running:
                node.standin.stop()
