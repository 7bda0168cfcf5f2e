"""Controller settings, read once from the Lambda environment (names fixed in docs/design.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ConfigError

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no", ""})
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")


@dataclass(frozen=True)
class Config:
    stack_name: str
    launch_template_id: str  # carries the spot market options
    subnets: Mapping[str, str]  # AZ -> public subnet id
    data_volume_id: str
    eip_allocation_id: str
    backup_bucket: str
    state_table: str
    topic_arn: str
    instance_types: tuple[str, ...] = ("t4g.small",)
    on_demand_fallback: bool = True
    handoff_deadline_seconds: float = 85.0
    drain_timeout_seconds: int = 25
    proactive_rebalance: bool = False
    domain: str | None = None
    health_failure_threshold: int = 3
    lease_seconds: float = 120.0
    # Same node, no market options: RunInstances cannot unset a template's spot options.
    on_demand_launch_template_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Build the config; raise ConfigError naming the first missing or malformed variable."""
        subnets = _subnets(_required(env, "SUBNETS"))
        types = tuple(t.strip() for t in env.get("INSTANCE_TYPES", "t4g.small").split(",") if t.strip())
        if not types:
            raise ConfigError("INSTANCE_TYPES must list at least one instance type")
        for instance_type in types:
            if not _INSTANCE_TYPE.match(instance_type):
                raise ConfigError(f"INSTANCE_TYPES has a malformed instance type: {instance_type!r}")
        domain = env.get("DOMAIN", "").strip() or None
        on_demand_fallback = _bool(env, "ON_DEMAND_FALLBACK", True)
        on_demand_template = env.get("ON_DEMAND_LAUNCH_TEMPLATE_ID", "").strip() or None
        config = cls(
            stack_name=_required(env, "STACK_NAME"),
            launch_template_id=_required(env, "LAUNCH_TEMPLATE_ID"),
            subnets=subnets,
            data_volume_id=_required(env, "DATA_VOLUME_ID"),
            eip_allocation_id=_required(env, "EIP_ALLOCATION_ID"),
            backup_bucket=_required(env, "BACKUP_BUCKET"),
            state_table=_required(env, "STATE_TABLE"),
            topic_arn=_required(env, "TOPIC_ARN"),
            instance_types=types,
            on_demand_fallback=on_demand_fallback,
            on_demand_launch_template_id=on_demand_template,
            handoff_deadline_seconds=_number(env, "HANDOFF_DEADLINE_SECONDS", 85.0, 0.0, 115.0),
            drain_timeout_seconds=int(_number(env, "DRAIN_TIMEOUT_SECONDS", 25, 1, 110, integer=True)),
            proactive_rebalance=_bool(env, "PROACTIVE_REBALANCE", False),
            domain=domain,
            health_failure_threshold=int(_number(env, "HEALTH_FAILURE_THRESHOLD", 3, 1, 1000, integer=True)),
            lease_seconds=_number(env, "LEASE_SECONDS", 120.0, 5.0, 3600.0),
        )
        if on_demand_fallback and on_demand_template is None:
            raise ConfigError(
                "ON_DEMAND_LAUNCH_TEMPLATE_ID is required but missing or empty (ON_DEMAND_FALLBACK is true)"
            )
        return config

    def template_for(self, market: str) -> str:
        """The launch template for a market; both templates get the same data on every deploy, so
        their version numbers move in lockstep."""
        if market == "spot" or self.on_demand_launch_template_id is None:
            return self.launch_template_id
        return self.on_demand_launch_template_id

    def subnet_for(self, az: str) -> str | None:
        return self.subnets.get(az)


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is required but missing or empty")
    return value


def _subnets(raw: str) -> Mapping[str, str]:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"SUBNETS must be a JSON object of AZ to subnet id: {exc.msg}") from exc
    if not isinstance(parsed, dict) or not parsed:
        raise ConfigError("SUBNETS must be a non-empty JSON object of AZ to subnet id")
    for az, subnet in parsed.items():
        if not isinstance(subnet, str) or not subnet.startswith("subnet-"):
            raise ConfigError(f"SUBNETS[{az!r}] must be a subnet id, got {subnet!r}")
    # A read-only view keeps the frozen config honest.
    return MappingProxyType(dict(parsed))


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    if name not in env:
        return default
    value = env[name].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False if value else default
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def _number(
    env: Mapping[str, str], name: str, default: float, low: float, high: float, *, integer: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as exc:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from exc
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value
