"""Config.from_env: every variable of docs/design.md, defaults, and errors that name the culprit."""

from __future__ import annotations

import dataclasses

import pytest

from spotforge_controller.config import Config
from spotforge_controller.errors import ConfigError

ENV = {
    "STACK_NAME": "spotforge",
    "LAUNCH_TEMPLATE_ID": "lt-0123",
    "ON_DEMAND_LAUNCH_TEMPLATE_ID": "lt-0456",
    "SUBNETS": '{"us-east-1a": "subnet-a1", "us-east-1b": "subnet-b1"}',
    "DATA_VOLUME_ID": "vol-0123",
    "EIP_ALLOCATION_ID": "eipalloc-0123",
    "BACKUP_BUCKET": "backups",
    "STATE_TABLE": "state",
    "TOPIC_ARN": "arn:aws:sns:us-east-1:123456789012:alerts",
    "INSTANCE_TYPES": "t4g.small, t4g.medium,c7g.medium",
    "ON_DEMAND_FALLBACK": "false",
}


def test_full_environment_is_read() -> None:
    config = Config.from_env({**ENV, "DOMAIN": "git.example.com", "HANDOFF_DEADLINE_SECONDS": "80"})
    assert config.stack_name == "spotforge"
    assert dict(config.subnets) == {"us-east-1a": "subnet-a1", "us-east-1b": "subnet-b1"}
    assert config.instance_types == ("t4g.small", "t4g.medium", "c7g.medium")
    assert config.on_demand_fallback is False
    assert config.domain == "git.example.com"
    assert config.handoff_deadline_seconds == 80.0
    assert config.subnet_for("us-east-1b") == "subnet-b1"
    assert config.subnet_for("us-east-1c") is None


def test_defaults_match_the_design() -> None:
    minimal = {k: v for k, v in ENV.items() if k not in ("INSTANCE_TYPES", "ON_DEMAND_FALLBACK")}
    config = Config.from_env(minimal)
    assert config.handoff_deadline_seconds == 85.0
    assert config.drain_timeout_seconds == 25
    assert config.proactive_rebalance is False
    assert config.health_failure_threshold == 3
    assert config.lease_seconds == 120.0
    assert config.domain is None
    assert config.instance_types == ("t4g.small",)
    assert config.on_demand_fallback is True


def test_config_is_frozen() -> None:
    config = Config.from_env(ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.stack_name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.subnets["us-east-1c"] = "subnet-c"  # type: ignore[index]


@pytest.mark.parametrize(
    "name",
    [
        "STACK_NAME",
        "LAUNCH_TEMPLATE_ID",
        "SUBNETS",
        "DATA_VOLUME_ID",
        "EIP_ALLOCATION_ID",
        "BACKUP_BUCKET",
        "STATE_TABLE",
        "TOPIC_ARN",
    ],
)
def test_missing_required_variable_is_named(name: str) -> None:
    env = {k: v for k, v in ENV.items() if k != name}
    with pytest.raises(ConfigError, match=name):
        Config.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("SUBNETS", "not json", id="subnets-not-json"),
        pytest.param("SUBNETS", '["subnet-a"]', id="subnets-not-an-object"),
        pytest.param("SUBNETS", '{"us-east-1a": "sg-1"}', id="subnets-value-not-a-subnet"),
        pytest.param("SUBNETS", "{}", id="subnets-empty"),
        pytest.param("INSTANCE_TYPES", " , ", id="instance-types-empty"),
        pytest.param("INSTANCE_TYPES", "t4g small", id="instance-types-malformed"),
        pytest.param("ON_DEMAND_FALLBACK", "maybe", id="boolean-not-true-or-false"),
        pytest.param("PROACTIVE_REBALANCE", "2", id="proactive-not-boolean"),
        pytest.param("HANDOFF_DEADLINE_SECONDS", "soon", id="deadline-not-a-number"),
        pytest.param("HANDOFF_DEADLINE_SECONDS", "130", id="deadline-after-the-termination"),
        pytest.param("DRAIN_TIMEOUT_SECONDS", "2.5", id="drain-timeout-not-an-integer"),
        pytest.param("HEALTH_FAILURE_THRESHOLD", "0", id="threshold-zero"),
        pytest.param("LEASE_SECONDS", "-1", id="lease-negative"),
    ],
)
def test_malformed_variable_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Config.from_env({**ENV, name: value})


def test_config_error_is_a_value_error_for_callers_that_only_know_builtins() -> None:
    assert issubclass(ConfigError, ValueError)


def test_runtime_from_environment_builds_clients_only_when_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotforge_controller.clock import SystemClock
    from spotforge_controller.runtime import Runtime

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    runtime = Runtime.from_environment()
    assert runtime.config.stack_name == "spotforge"
    assert isinstance(runtime.clock, SystemClock)
    assert runtime._clients == {}
    assert runtime.ec2 is runtime.ec2, "clients are cached"
    assert set(runtime._clients) == {"ec2"}


def test_on_demand_launches_use_the_template_without_market_options() -> None:
    config = Config.from_env({**ENV, "ON_DEMAND_FALLBACK": "true"})
    assert config.template_for("spot") == "lt-0123"
    assert config.template_for("on-demand") == "lt-0456"


def test_on_demand_fallback_needs_its_template() -> None:
    env = {k: v for k, v in ENV.items() if k != "ON_DEMAND_LAUNCH_TEMPLATE_ID"}
    with pytest.raises(ConfigError, match="ON_DEMAND_LAUNCH_TEMPLATE_ID"):
        Config.from_env({**env, "ON_DEMAND_FALLBACK": "true"})
    assert Config.from_env({**env, "ON_DEMAND_FALLBACK": "false"}).template_for("on-demand") == "lt-0123"
