"""Strict AWS emulator for spotforge: moto in-process, AWS's rules added with botocore hooks,
asynchronous state changes on a virtual clock, latencies from a sourced table.

Usage::

    from datetime import UTC, datetime
    from drill.emulator import Emulator, LatencyModel, VirtualClock

    with Emulator(region="us-east-1",
                  clock=VirtualClock(datetime(2026, 11, 20, 8, 0, tzinfo=UTC)),
                  latency=LatencyModel.default()) as emu:
        ec2 = emu.session.client("ec2")       # every client from emu.session is strict
        ...
        emu.clock.sleep(5)                    # virtual time; due transitions run in order

API (all on `Emulator`):

- `Emulator(region="us-east-1", clock=None, latency=None, account_id="123456789012")`; a context
  manager (`start()`/`stop()` also work) that starts and stops moto's `mock_aws`.
- `session: boto3.Session`: clients made from it enforce the rules (clients made elsewhere see
  plain moto).
- `clock: VirtualClock`: `now() -> datetime` (UTC), `sleep(seconds)`, `advance_to(when)`,
  `run_due()`, `call_later(delay, fn, label="") -> ScheduledCall`, `call_at(when, fn, label="")`,
  `pending() -> list[(datetime, label)]`. Every API call through the session first runs the
  callbacks already due.
- `latency: LatencyModel`: frozen table of seconds, `LatencyModel.default()` (typical figures),
  `LatencyModel.instant()`, `.replace(**changes)`, `LatencyModel.sources()`.
- `faults: Faults`: `capacity(instance_type=None, az=None, market=None,
  code="InsufficientInstanceCapacity") -> CapacityRule` (also SpotMaxPriceTooLow,
  MaxSpotInstanceCountExceeded, Unsupported), `restore_capacity(rule=None)`,
  `fail(operation, code, times=1, message=None, service=None)` (times=None: until cleared),
  `throttle(operation, times=1, service="ec2")`, `clear()`.
- `set_node_factory(factory)`: `factory(instance_id, emu) -> node`, called when an instance becomes
  running. A node needs `run_command(argv: list[str]) -> (exit_code, stdout, stderr,
  duration_seconds | None)` (None: the command hangs) and may have `is_mounted(volume_id)`,
  `on_volume_attached(volume_id, device)`, `on_volume_detached(volume_id)`, `on_shutdown()`,
  `on_boot()` (a stopped instance started again keeps its node).
  Without a factory, `DirectoryNode` (a temp folder as disk; answers `status`) is used.
- `node(instance_id)`: the node object of an instance (None before it runs).
- `market_of(instance_id) -> "spot" | "on-demand"`.
- `interrupt(instance_id, action="terminate"|"stop"|"hibernate") -> dict`: emits a rebalance
  recommendation and the warning event (returned), sets the IMDS documents, and 120 s later
  terminates (or stops) with Server.SpotInstanceTermination / Server.SpotInstanceShutdown.
- `lose(instance_id)`: unwarned spot reclaim.
- `imds_instance_action(instance_id) -> dict | None`, `imds_rebalance(instance_id) -> dict | None`
  (None where IMDS answers 404).
- `address_target(public_ip) -> instance_id | None`: where the network routes the EIP now.
- `events: list[dict]`: EventBridge events delivered so far (after `latency.event_delivery`);
  `drain_events() -> list[dict]` pops them.
- `violations: list[Violation]` (`time`, `kind`, `detail`): broken invariants
  (`force-detach-mounted`, `data-volume-deleted`, or what a node reports through
  `record_violation(kind, detail)`).
- `ec2_backend`: moto's EC2 backend for this account and region.
"""

from .clock import ScheduledCall, VirtualClock
from .core import DATA_ROLE_TAG, Emulator, Violation
from .errors import AwsRefusal, EmulatorError, UnknownInstanceError
from .faults import CAPACITY_CODES, CapacityRule, Faults
from .latency import SOURCES, LatencyModel
from .node import DirectoryNode, NodeResult

__all__ = [
    "CAPACITY_CODES",
    "DATA_ROLE_TAG",
    "SOURCES",
    "AwsRefusal",
    "CapacityRule",
    "DirectoryNode",
    "Emulator",
    "EmulatorError",
    "Faults",
    "LatencyModel",
    "NodeResult",
    "ScheduledCall",
    "UnknownInstanceError",
    "Violation",
    "VirtualClock",
]
