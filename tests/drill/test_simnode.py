"""The simulated node: its Platform (mount/unmount, is_mounted, never formatting data), its boot on
the virtual clock, and the real agent reached through the emulated SSM."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from drill_world import NodeWorld, make_fleet

import spotforge_agent as agent
from drill.forgejo_standin import read_row_ids
from drill.node import AgentClock, NodeTimings, VolumeDisks


def test_boot_tags_standby_after_the_modeled_bootstrap(world: NodeWorld) -> None:
    node = world.running_node()
    assert node.phase == "booting" and "spotforge:phase" not in world.tags(node.instance_id)
    running_at = node.first("running")
    assert running_at is not None
    world.clock.advance_to(running_at + _seconds(world.fleet.timings.boot_to_standby - 0.1))
    assert node.phase == "booting"
    world.clock.sleep(0.2)
    assert world.tags(node.instance_id)["spotforge:phase"] == "standby"
    assert node.mounted_volume is None and node.standin is None


def test_a_blank_volume_is_formatted_mounted_and_served_once_attached(world: NodeWorld) -> None:
    node = world.serving_node()
    assert world.tags(node.instance_id)["spotforge:phase"] == "serving"
    assert node.first(f"formatted {world.region.volume_id}") is not None
    assert node.mount_path.is_symlink()
    assert (node.mount_path / "forgejo" / "gitea" / "gitea.db").exists()
    acme = node.mount_path / "traefik" / "acme.json"
    assert acme.stat().st_mode & 0o777 == 0o600
    assert node.standin is not None and node.standin.health()[0] == 200
    assert world.emu.violations == []


def test_platform_mount_needs_the_volume_attached_and_unmount_releases_it(world: NodeWorld) -> None:
    node = world.running_node()
    platform = node.platform
    with pytest.raises(agent.DeviceError):
        platform.mount("/dev/sdf", str(node.mount_path))
    world.attach(node.instance_id)
    world.clock.sleep(world.emu.latency.attach + 0.1)
    assert platform.find_block_device(world.region.volume_id) == "/dev/sdf"
    platform.mount("/dev/sdf", str(node.mount_path))
    assert platform.is_mounted(str(node.mount_path))
    assert node.is_mounted(world.region.volume_id)
    assert not platform.is_mounted("/somewhere/else")
    platform.unmount(str(node.mount_path))
    assert not platform.is_mounted(str(node.mount_path))
    assert not node.is_mounted(world.region.volume_id)
    assert node.mount_path.is_dir() and not node.mount_path.is_symlink()


def test_unmount_is_refused_while_forgejo_still_runs(world: NodeWorld) -> None:
    node = world.serving_node()
    with pytest.raises(agent.BusyError):
        node.platform.unmount(str(node.mount_path))
    assert node.is_mounted(world.region.volume_id)


def test_a_volume_holding_bytes_without_a_filesystem_is_never_formatted(world: NodeWorld) -> None:
    precious = world.fleet.disks.folder(world.region.volume_id) / "precious"
    precious.write_text("data")
    node = world.running_node()
    world.attach(node.instance_id)
    world.clock.sleep(world.fleet.timings.boot_to_standby + 5)
    mount_runs = [r for r in node.runs if r.argv[:1] == ("mount-data",)]
    assert mount_runs and mount_runs[0].exit_code == agent.DeviceError.exit_code
    assert "refusing to format" in mount_runs[0].stderr
    assert precious.read_text() == "data"
    assert world.emu.violations == []


def test_a_volume_with_a_filesystem_and_data_is_mounted_without_formatting(world: NodeWorld) -> None:
    first = world.serving_node()
    row = first.standin.commit("keep me") if first.standin else None
    assert world.agent(first.instance_id, "drain --deadline 25")["Status"] == "Success"
    world.ec2.detach_volume(VolumeId=world.region.volume_id)
    world.clock.sleep(5)
    second = world.running_node()
    world.attach(second.instance_id)
    world.clock.sleep(world.fleet.timings.boot_to_standby + 30)
    assert second.phase == "serving"
    assert second.first(f"formatted {world.region.volume_id}") is None
    assert second.standin is not None and row in second.standin.row_ids()
    assert world.emu.violations == []


def test_formatting_a_volume_that_holds_data_is_recorded_as_a_violation(world: NodeWorld) -> None:
    node = world.serving_node()
    node.platform.make_filesystem("/dev/sdf")
    assert [v.kind for v in world.emu.violations] == ["format-over-data"]


def test_a_plain_detach_stays_busy_while_mounted_and_completes_after_the_drain(world: NodeWorld) -> None:
    node = world.serving_node()
    world.ec2.detach_volume(VolumeId=world.region.volume_id)
    world.clock.sleep(30)
    assert world.volume_state() == ("in-use", ["detaching"])
    invocation = world.agent(node.instance_id, "drain --deadline 25")
    assert invocation["Status"] == "Success", invocation["StandardErrorContent"]
    assert world.volume_state() == ("available", [])
    assert node.standin is not None and not node.standin.running
    assert world.emu.violations == []


def test_the_mount_stays_busy_until_the_modeled_drain_ends(world: NodeWorld) -> None:
    node = world.serving_node()
    world.ssm.send_command(
        InstanceIds=[node.instance_id],
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": ["/opt/spotforge/bin/spotforge-agent drain --deadline 25"]},
    )
    world.clock.sleep(world.emu.latency.ssm_command_delivery + 0.01)
    drain = node.runs[-1]
    assert drain.argv[0] == "drain" and drain.seconds > 1
    assert node.mounted_volume is None
    assert node.is_mounted(world.region.volume_id)  # still busy: the drain is modeled as running
    world.clock.advance_to(drain.ended)
    assert not node.is_mounted(world.region.volume_id)


def test_status_through_ssm_prints_the_agents_json(world: NodeWorld) -> None:
    node = world.serving_node()
    invocation = world.agent(node.instance_id, "status", wait=10)
    assert invocation["Status"] == "Success"
    status = json.loads(invocation["StandardOutputContent"])
    assert status["phase"] == "serving" and status["mounted"] is True
    assert status["instance_id"] == node.instance_id


def test_unknown_commands_and_usage_errors_fail_like_a_shell(world: NodeWorld) -> None:
    node = world.running_node()
    assert node.run_command(["rm", "-rf", "/"])[0] == 127
    code, _, err, _ = node.run_command(["/opt/spotforge/bin/spotforge-agent", "drain"])
    assert code == 2 and "deadline" in err
    code, _, err, _ = node.run_command(["/opt/spotforge/bin/spotforge-agent", "watch"])
    assert code == agent.ConfigError.exit_code and "never returns" in err
    assert node.run_command(["/opt/spotforge/bin/spotforge-agent", "watch", "--once"])[0] == 0


def test_a_blank_volume_is_restored_from_the_latest_backup(world: NodeWorld, tmp_path: Path) -> None:
    first = world.serving_node()
    assert first.standin is not None
    ids = [first.standin.commit(f"row {i}") for i in range(3)]
    assert world.agent(first.instance_id, "backup", wait=10)["Status"] == "Success"
    blank = world.ec2.create_volume(AvailabilityZone=world.region.volume_az, Size=20, VolumeType="gp3")[
        "VolumeId"
    ]
    fleet = make_fleet(world.emu, world.region, tmp_path / "second", volume_id=blank)
    try:
        instance_id = world.launch()
        world.clock.sleep(world.emu.latency.run_to_running + 1)
        world.attach(instance_id, blank)
        world.clock.sleep(fleet.timings.boot_to_standby + 30)
        node = fleet.nodes[instance_id]
        assert node.phase == "serving", node.log
        mount = next(r for r in node.runs if r.argv[:1] == ("mount-data",))
        assert json.loads(mount.stdout)["restored"]
        assert node.standin is not None and node.standin.row_ids() == ids
    finally:
        fleet.close()


def test_an_unwarned_loss_kills_forgejo_and_leaves_the_volume_as_a_crash_would(world: NodeWorld) -> None:
    node = world.serving_node()
    assert node.standin is not None
    ids = [node.standin.commit(f"row {i}") for i in range(10)]
    world.emu.lose(node.instance_id)
    world.clock.run_due()
    assert not node.alive and not node.standin.running
    folder = world.fleet.disks.folder(world.region.volume_id) / "forgejo"
    assert (folder / "gitea" / "gitea.db-wal").exists()
    world.clock.sleep(world.emu.latency.shutting_down_to_terminated + 1)
    assert world.volume_state() == ("available", [])
    assert read_row_ids(folder) == ids


def test_agent_clock_only_moves_by_charged_time() -> None:
    clock = AgentClock(datetime(2026, 1, 1, tzinfo=UTC))
    clock.sleep(2.5)
    assert clock.monotonic() == 2.5
    assert clock.now() == datetime(2026, 1, 1, 0, 0, 2, 500000, tzinfo=UTC)


def test_blkid_tells_blank_from_data_from_filesystem(tmp_path: Path) -> None:
    disks = VolumeDisks(tmp_path)
    assert disks.blkid("vol-1") == (2, "")
    (disks.folder("vol-1") / "x").write_text("y")
    assert disks.blkid("vol-1")[0] == 8
    disks.format("vol-2")
    code, fields = disks.blkid("vol-2")
    assert code == 0 and "TYPE=ext4" in fields
    assert agent.decide_format(code, fields).format is False


def test_timings_refuse_negative_values_and_sum_the_bootstrap() -> None:
    with pytest.raises(ValueError):
        NodeTimings(mount=-1)
    timings = NodeTimings()
    assert timings.boot_to_standby == pytest.approx(3.2 + 8 + 15 + 20)
    assert set(NodeTimings.sources()) >= {"userdata_start", "forgejo_start", "stop_workloads"}


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def test_the_agents_watch_signals_an_interruption_seen_in_imds(world: NodeWorld) -> None:
    node = world.serving_node()
    world.emu.drain_events()
    world.emu.interrupt(node.instance_id)
    world.clock.sleep(10)
    signals = [e for e in world.emu.drain_events() if e["source"] == "spotforge.node"]
    assert len(signals) == 1
    assert signals[0]["detail-type"] == "Spot Interruption Signal"
    assert signals[0]["detail"]["instance-id"] == node.instance_id
    assert "spotforge:interruption" in world.tags(node.instance_id)
    assert node.first("agent signaled the interruption") is not None


def test_without_a_controller_the_agent_drains_itself_before_the_spot_action(world: NodeWorld) -> None:
    node = world.serving_node()
    assert node.standin is not None
    ids = [node.standin.commit(f"row {i}") for i in range(5)]
    world.emu.interrupt(node.instance_id)
    world.clock.sleep(world.emu.latency.warning_to_action - 20)
    # Nobody sent a drain: the watch did it 25 s before the action, so nothing is mounted any more.
    assert node.mounted_volume is None and not node.standin.running
    world.clock.sleep(world.emu.latency.shutting_down_to_terminated + 30)
    assert world.volume_state() == ("available", [])
    assert read_row_ids(world.fleet.disks.folder(world.region.volume_id) / "forgejo") == ids
    assert world.emu.violations == []
