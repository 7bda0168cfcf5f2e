"""Settings from the environment, the command line, status, and running on Python 3.9."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spotforge_agent as agent

AGENT = Path(agent.__file__)
PY39 = os.environ.get("SPOTFORGE_PY39", "/root/.pyenv/versions/3.9.18/bin/python")

ENV = {
    "SPOTFORGE_STACK": "spotforge",
    "SPOTFORGE_REGION": "us-east-1",
    "SPOTFORGE_BUCKET": "bucket",
    "SPOTFORGE_BACKUP_PREFIX": "backups/",
    "SPOTFORGE_VOLUME_ID": "vol-0123456789abcdef0",
    "SPOTFORGE_MOUNT": "/srv/spotforge",
    "SPOTFORGE_DOMAIN": "",
    "SPOTFORGE_BACKUP_INTERVAL_MINUTES": "5",
}


def test_settings_come_from_the_node_env_names():
    settings = agent.Settings.from_env(ENV)
    assert settings.bucket == "bucket" and settings.mount == "/srv/spotforge"
    assert settings.backup_interval_minutes == 5 and settings.domain == ""
    with pytest.raises(dataclasses_frozen_error()):
        settings.bucket = "other"  # type: ignore[misc]


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "name", ["SPOTFORGE_STACK", "SPOTFORGE_REGION", "SPOTFORGE_BUCKET", "SPOTFORGE_VOLUME_ID"]
)
def test_a_missing_setting_is_one_error_naming_the_variable(name):
    env = dict(ENV)
    del env[name]
    with pytest.raises(agent.ConfigError, match=f"missing setting {name}"):
        agent.Settings.from_env(env)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SPOTFORGE_VOLUME_ID", "vol-nothex"),
        ("SPOTFORGE_VOLUME_ID", "i-0123456789abcdef0"),
        ("SPOTFORGE_BACKUP_INTERVAL_MINUTES", "five"),
        ("SPOTFORGE_MOUNT", "relative/path"),
        ("SPOTFORGE_BACKUP_PREFIX", "no-slash"),
    ],
)
def test_a_malformed_setting_is_rejected_by_name(name, value):
    with pytest.raises(agent.ConfigError, match=name):
        agent.Settings.from_env(dict(ENV, **{name: value}))


def test_parse_time_accepts_iso_with_z_offsets_and_backup_stamps():
    expected = dt.datetime(2026, 12, 4, 15, 0, tzinfo=dt.UTC)
    assert agent.parse_time("2026-12-04T15:00:00Z") == expected
    assert agent.parse_time("2026-12-04T16:00:00+01:00") == expected
    assert agent.parse_time("2026-12-04T15:00:00") == expected
    assert agent.parse_time("20261204T150000.000000Z") == expected
    with pytest.raises(agent.ConfigError, match="invalid time"):
        agent.parse_time("yesterday")


def _run(args: list[str], env: dict[str, str] | None = None, python: str = sys.executable):
    return subprocess.run(
        [python, str(AGENT), *args],
        capture_output=True,
        text=True,
        env=dict(env if env is not None else {}, PATH=os.environ.get("PATH", "")),
        timeout=60,
    )


def test_unknown_subcommand_is_one_line_on_stderr_and_exit_2():
    done = _run(["frobnicate"])
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_missing_env_file_settings_fail_with_one_line_naming_the_variable():
    done = _run(["status"], env={})
    assert done.returncode == agent.ConfigError.exit_code
    assert done.stderr.strip() == (
        "spotforge-agent: status: missing setting SPOTFORGE_STACK (expected in /etc/spotforge/node.env)"
    )


def test_status_reports_phase_mount_and_last_backup(ctx, data_tree, monkeypatch, capsys):
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    assert agent.main(["status"], env={}) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {
        "phase": "booting",
        "mounted": True,
        "mount": ctx.settings.mount,
        "last_backup": None,
        "instance_id": "i-0123456789abcdef0",
    }
    agent.set_phase(ctx, "serving")
    agent.backup(ctx)
    assert agent.main(["status"], env={}) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["phase"] == "serving"
    assert second["last_backup"]["key"].startswith("backups/index/")


def test_set_phase_refuses_unknown_phases_and_tags_known_ones(ctx, platform):
    with pytest.raises(agent.ConfigError, match="unknown phase"):
        agent.set_phase(ctx, "sleeping")
    agent.set_phase(ctx, "standby")
    assert platform.phase_tags == ["standby"]


def test_restart_asks_the_platform_to_restart_forgejo(ctx, platform, monkeypatch):
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    assert agent.main(["restart"], env={}) == 0
    assert platform.calls == ["restart_workloads"]


def test_cli_restore_with_a_bad_time_is_a_one_line_error(ctx, monkeypatch, capsys):
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    assert agent.main(["restore", "--at", "soon"], env={}) == agent.ConfigError.exit_code
    assert capsys.readouterr().err.strip().startswith("spotforge-agent: restore: invalid time 'soon'")


needs_py39 = pytest.mark.skipif(
    not shutil.which(PY39) and not os.path.exists(PY39), reason="no Python 3.9 here"
)

PY39_CHECKS = r"""
import sqlite3, sys, tempfile, os
sys.path.insert(0, sys.argv[1])
assert sys.version_info[:2] == (3, 9), sys.version
import spotforge_agent as a
assert "boto3" not in sys.modules, "boto3 must be imported lazily"
assert a.decide_format(2, "").format and not a.decide_format(0, "TYPE=ext4").format
a.parse_time("2026-12-04T15:00:00Z")
d = tempfile.mkdtemp()
src = os.path.join(d, "g.db")
c = sqlite3.connect(src); c.execute("PRAGMA journal_mode=WAL"); c.execute("CREATE TABLE t(x)")
c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)]); c.commit()
for method in ("auto", "backup", "vacuum"):
    info = a.snapshot_sqlite(src, os.path.join(d, "s.db"), method)
    assert info["page_count"] > 0
assert a.db_fingerprint(src)["file"] is not None
print("py39 ok")
"""


@needs_py39
def test_the_agent_runs_on_python_3_9_without_boto3():
    done = subprocess.run(
        [PY39, "-c", PY39_CHECKS, str(AGENT.parent)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "py39 ok"
    helped = _run(["--help"], python=PY39)
    assert helped.returncode == 0 and "drain" in helped.stdout and "mount-data" in helped.stdout
