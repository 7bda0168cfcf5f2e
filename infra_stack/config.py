"""spotforge settings: read once from CDK context, validated, frozen.

Every setting can come from `cdk.json` (`context`) or the command line (`-c key=value`, always a
string), so each parser accepts the string form too. A bad value stops `cdk synth` with one line
that names the key, the value and what is expected (ConfigError), never a stack trace.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A user error in the settings; the message is meant to be printed as is."""


# Graviton families carry a "g" right after the generation digit (t4g, m7gd, c7gn, r8g, im4gn, is4gen);
# a1 is the first-generation Graviton.
_ARM64_TYPE = re.compile(r"^(a1|[a-z]+\d+g[a-z]*)\.[a-z0-9]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_K3S_VERSION = re.compile(r"^v\d+\.\d+\.\d+\+k3s\d+$")
_FORGEJO_VERSION = re.compile(r"^\d+(\.\d+){0,2}$")
_STACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
_HOSTED_ZONE_ID = re.compile(r"^Z[A-Z0-9]{1,31}$")


@dataclass(frozen=True)
class SpotforgeConfig:
    stack_name: str = "spotforge"
    domain: str | None = None
    acme_email: str | None = None
    alert_email: str | None = None
    admin_cidr: str | None = None
    instance_types: tuple[str, ...] = ("t4g.small", "t4g.medium", "m6g.medium", "m7g.medium")
    on_demand_fallback: bool = True
    forgejo_version: str = "15"
    k3s_version: str = "v1.33.5+k3s1"
    data_volume_gib: int = 20
    backup_retention_days: int = 30
    backup_interval_minutes: int = 5
    hosted_zone_id: str | None = None
    hosted_zone_name: str | None = None
    retain_elastic_ip: bool = True
    handoff_deadline_seconds: int = 85
    drain_timeout_seconds: int = 25
    proactive_rebalance: bool = False
    health_failure_threshold: int = 3
    snapshot_retention_days: int = 7
    powertools_layer_version: str = "latest"

    @property
    def has_domain(self) -> bool:
        return self.domain is not None

    @property
    def admin_password_parameter(self) -> str:
        return f"/spotforge/{self.stack_name}/admin-password"


_KEY_SPELLING = {"data_volume_gib": "dataVolumeGiB"}


def _camel(name: str) -> str:
    if name in _KEY_SPELLING:
        return _KEY_SPELLING[name]
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _optional_str(check: Callable[[str], bool], expected: str) -> Callable[[str, Any], str | None]:
    def parse(key: str, value: Any) -> str | None:
        if value is None or value == "":
            return None
        text = str(value).strip()
        if not check(text):
            raise _bad(key, value, expected)
        return text

    return parse


def _required_str(check: Callable[[str], bool], expected: str) -> Callable[[str, Any], str]:
    optional = _optional_str(check, expected)

    def parse(key: str, value: Any) -> str:
        text = optional(key, value)
        if text is None:
            raise _bad(key, value, expected)
        return text

    return parse


def _int_between(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        if isinstance(value, bool):
            raise _bad(key, value, f"a whole number from {low} to {high}")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise _bad(key, value, f"a whole number from {low} to {high}") from None
        if not low <= number <= high:
            raise _bad(key, value, f"a whole number from {low} to {high}")
        return number

    return parse


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise _bad(key, value, "true or false")


def _cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    return True


def _instance_types(key: str, value: Any) -> tuple[str, ...]:
    expected = "a non-empty list of arm64 (Graviton) instance types such as t4g.small"
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        items = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
    if not isinstance(items, list | tuple) or not items:
        raise _bad(key, value, expected)
    types = tuple(str(item).strip() for item in items)
    for instance_type in types:
        if not _ARM64_TYPE.match(instance_type):
            raise ConfigError(
                f"setting '{key}': '{instance_type}' is not an arm64 instance type; expected {expected} "
                "(the node image is the arm64 Amazon Linux 2023 AMI)"
            )
    if len(set(types)) != len(types):
        raise _bad(key, value, "a list without duplicates")
    return types


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"setting '{key}': {value!r} is not valid; expected {expected}")


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "stack_name": _required_str(
        lambda s: bool(_STACK_NAME.match(s)), "a CloudFormation stack name (letters, digits, hyphens)"
    ),
    "domain": _optional_str(
        lambda s: bool(_DOMAIN.match(s)), "a lower-case DNS name such as git.example.com"
    ),
    "acme_email": _optional_str(lambda s: bool(_EMAIL.match(s)), "an email address such as me@example.com"),
    "alert_email": _optional_str(lambda s: bool(_EMAIL.match(s)), "an email address such as me@example.com"),
    "admin_cidr": _optional_str(_cidr, "a CIDR block such as 203.0.113.7/32 (host bits zero)"),
    "instance_types": _instance_types,
    "on_demand_fallback": _bool,
    "forgejo_version": _required_str(
        lambda s: bool(_FORGEJO_VERSION.match(s)), "a Forgejo image tag such as 15 or 15.0.9"
    ),
    "k3s_version": _required_str(
        lambda s: bool(_K3S_VERSION.match(s)), "a pinned k3s release such as v1.33.5+k3s1"
    ),
    "data_volume_gib": _int_between(8, 16384),
    "backup_retention_days": _int_between(1, 3650),
    "backup_interval_minutes": _int_between(1, 1440),
    "hosted_zone_id": _optional_str(
        lambda s: bool(_HOSTED_ZONE_ID.match(s)), "a Route 53 hosted zone id (Z...)"
    ),
    "hosted_zone_name": _optional_str(lambda s: bool(_DOMAIN.match(s)), "the hosted zone's DNS name"),
    "retain_elastic_ip": _bool,
    "handoff_deadline_seconds": _int_between(30, 110),
    "drain_timeout_seconds": _int_between(5, 60),
    "proactive_rebalance": _bool,
    "health_failure_threshold": _int_between(1, 30),
    "snapshot_retention_days": _int_between(1, 90),
    "powertools_layer_version": _required_str(
        lambda s: s == "latest" or bool(re.match(r"^3\.\d+\.\d+$", s)),
        "latest or a Powertools 3.x version such as 3.37.0",
    ),
}

# Context keys that belong to the CDK itself (feature flags, CLI bookkeeping), not to spotforge.
_FOREIGN_KEY = re.compile(r"^(@aws-cdk/|aws:|aws-cdk:|cdk[-:]|acknowledged-issue-numbers$|cli-telemetry$)")

SETTING_KEYS: tuple[str, ...] = tuple(_camel(f.name) for f in fields(SpotforgeConfig))


def load_config(context: Mapping[str, Any]) -> SpotforgeConfig:
    """Build the settings from a CDK context mapping (cdk.json defaults merged with `-c` values)."""
    known = {_camel(name): name for name in _PARSERS}
    unknown = sorted(k for k in context if k not in known and not _FOREIGN_KEY.match(k))
    if unknown:
        raise ConfigError(f"setting '{unknown[0]}': unknown key; expected one of {', '.join(sorted(known))}")
    values = {
        field: _PARSERS[field](key, context[key])
        for key, field in known.items()
        if context.get(key) is not None
    }
    config = SpotforgeConfig(**values)
    _cross_check(config)
    return config


def _cross_check(config: SpotforgeConfig) -> None:
    if config.domain and not config.acme_email:
        raise ConfigError(
            "setting 'acmeEmail': None is not valid; expected an email address for Let's Encrypt when "
            f"'domain' is set ({config.domain})"
        )
    if bool(config.hosted_zone_id) != bool(config.hosted_zone_name):
        raise ConfigError(
            "setting 'hostedZoneId': hostedZoneId and hostedZoneName must be given together; expected both or neither"
        )
    if config.hosted_zone_id and not config.domain:
        raise ConfigError(
            "setting 'domain': None is not valid; expected a domain when a hosted zone is given"
        )
    if (
        config.hosted_zone_name
        and config.domain
        and not (
            config.domain == config.hosted_zone_name or config.domain.endswith("." + config.hosted_zone_name)
        )
    ):
        raise ConfigError(
            f"setting 'domain': {config.domain!r} is not valid; expected a name inside hosted zone "
            f"{config.hosted_zone_name}"
        )
    if config.drain_timeout_seconds >= config.handoff_deadline_seconds:
        raise ConfigError(
            f"setting 'drainTimeoutSeconds': {config.drain_timeout_seconds} is not valid; expected less than "
            f"handoffDeadlineSeconds ({config.handoff_deadline_seconds})"
        )
    if 120 - config.handoff_deadline_seconds < config.drain_timeout_seconds:
        raise ConfigError(
            f"setting 'handoffDeadlineSeconds': {config.handoff_deadline_seconds} is not valid; expected the drain "
            f"({config.drain_timeout_seconds} s) to fit before the spot termination at 120 s"
        )
