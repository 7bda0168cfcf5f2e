"""Settings validation: every bad value stops synth with one message naming key, value and expectation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infra_stack.config import SETTING_KEYS, ConfigError, load_config
from tests.infra.conftest import PROJECT, default_context


def test_cdk_json_defaults_make_a_valid_config() -> None:
    config = load_config(default_context())
    assert config.instance_types[0] == "t4g.small"
    assert config.data_volume_gib == 20
    assert config.backup_retention_days == 30
    assert config.backup_interval_minutes == 5
    assert config.forgejo_version == "15"
    assert config.domain is None and config.admin_cidr is None


def test_every_setting_has_a_default_in_cdk_json() -> None:
    assert set(SETTING_KEYS) <= set(default_context())


def test_command_line_strings_are_parsed_into_types() -> None:
    config = load_config(
        {
            **default_context(),
            "onDemandFallback": "false",
            "dataVolumeGiB": "40",
            "instanceTypes": "t4g.small,c7g.medium",
            "adminCidr": "203.0.113.7/32",
        }
    )
    assert config.on_demand_fallback is False
    assert config.data_volume_gib == 40
    assert config.instance_types == ("t4g.small", "c7g.medium")
    assert config.admin_cidr == "203.0.113.7/32"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("adminCidr", "203.0.113.300/32", "CIDR"),
        ("adminCidr", "203.0.113.7/24", "host bits zero"),
        ("instanceTypes", ["t3.small"], "not an arm64 instance type"),
        ("instanceTypes", "m5.large", "not an arm64 instance type"),
        ("instanceTypes", [], "non-empty list"),
        ("instanceTypes", ["t4g.small", "t4g.small"], "without duplicates"),
        ("alertEmail", "me.example.com", "email address"),
        ("acmeEmail", "me@", "email address"),
        ("backupRetentionDays", 0, "whole number from 1"),
        ("backupRetentionDays", "thirty", "whole number"),
        ("backupIntervalMinutes", -5, "whole number from 1"),
        ("dataVolumeGiB", 4, "whole number from 8"),
        ("onDemandFallback", "maybe", "true or false"),
        ("k3sVersion", "latest", "pinned k3s release"),
        ("forgejoVersion", "latest", "Forgejo image tag"),
        ("domain", "Not A Domain", "DNS name"),
        ("hostedZoneId", "abc", "hosted zone id"),
        ("stackName", "1bad", "stack name"),
    ],
)
def test_bad_value_is_rejected_with_key_value_and_expectation(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({**default_context(), key: value})
    message = str(caught.value)
    assert f"'{key}'" in message
    assert expected in message
    bad_part = value[0] if isinstance(value, list) and value and key == "instanceTypes" else value
    if bad_part not in ([], None):
        assert str(bad_part) in message


def test_unknown_key_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="'domian': unknown key"):
        load_config({**default_context(), "domian": "git.example.com"})


def test_cdk_own_context_keys_are_not_unknown_settings() -> None:
    load_config(
        {
            **default_context(),
            "@aws-cdk/core:newStyleStackSynthesis": True,
            "aws:cdk:version-reporting": False,
        }
    )


def test_domain_needs_an_acme_email() -> None:
    with pytest.raises(ConfigError, match="'acmeEmail'"):
        load_config({**default_context(), "domain": "git.example.com"})


def test_hosted_zone_must_contain_the_domain() -> None:
    with pytest.raises(ConfigError, match=r"inside hosted zone example\.org"):
        load_config(
            {
                **default_context(),
                "domain": "git.example.com",
                "acmeEmail": "me@example.com",
                "hostedZoneId": "Z123ABC",
                "hostedZoneName": "example.org",
            }
        )


def test_drain_must_fit_before_the_spot_termination() -> None:
    with pytest.raises(ConfigError, match="'handoffDeadlineSeconds'"):
        load_config({**default_context(), "handoffDeadlineSeconds": 100, "drainTimeoutSeconds": 30})


def test_synth_prints_one_line_and_no_traceback_for_a_bad_setting() -> None:
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=PROJECT,
        env={"CDK_CONTEXT_JSON": '{"adminCidr": "not-a-cidr"}', "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "setting 'adminCidr': 'not-a-cidr' is not valid; expected a CIDR block" in result.stderr
