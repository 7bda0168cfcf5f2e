"""mount-data: the format decision, real blkid/mkfs on a file image, and the mount/restore flow."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import spotforge_agent as agent

DEVICE = "/dev/nvme1n1"


@pytest.mark.parametrize(
    ("code", "output", "expected"),
    [
        (2, "", True),
        (2, "\n", True),
        (0, "DEVNAME=/dev/nvme1n1\nUUID=abc\nTYPE=ext4\n", False),
        (0, "DEVNAME=/dev/nvme1n1\nPTUUID=x\nPTTYPE=gpt\n", False),
        (0, "TYPE=xfs\n", False),
        (0, "", False),
        (2, "TYPE=ext4\n", False),
        (8, "", False),
        (4, "", False),
        (1, "", False),
    ],
)
def test_format_only_when_blkid_reports_nothing_at_all(code, output, expected):
    assert agent.decide_format(code, output).format is expected


def test_format_decision_names_what_the_device_holds():
    assert "gpt" in agent.decide_format(0, "PTTYPE=gpt\n").reason
    assert "ambivalent" in agent.decide_format(8, "").reason


needs_tools = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("blkid")), reason="mkfs.ext4/blkid not installed"
)


@needs_tools
def test_real_blkid_on_a_file_image_allows_formatting_only_while_blank(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (8 << 20))
    linux = agent.LinuxPlatform(imds=None)  # type: ignore[arg-type]
    code, output = linux.probe_filesystem(str(image))
    assert (code, output.strip()) == (2, "")
    assert agent.decide_format(code, output).format
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    code, output = linux.probe_filesystem(str(image))
    assert code == 0 and "TYPE=ext4" in output
    assert not agent.decide_format(code, output).format


@needs_tools
def test_real_blkid_sees_a_partition_table_and_it_is_never_formatted(tmp_path):
    image = tmp_path / "disk.img"
    raw = bytearray(8 << 20)
    # A minimal MBR: one Linux partition from sector 2048, and the 0x55AA boot signature.
    entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (8192).to_bytes(4, "little")
    raw[446:462] = entry
    raw[510:512] = b"\x55\xaa"
    image.write_bytes(bytes(raw))
    code, output = agent.LinuxPlatform(imds=None).probe_filesystem(str(image))  # type: ignore[arg-type]
    assert code == 0 and "PTTYPE=dos" in output
    assert not agent.decide_format(code, output).format


def test_blank_volume_is_formatted_mounted_and_restored_from_s3(ctx, platform, data_tree, h):
    before = h.tree_snapshot(data_tree.mount)
    agent.backup(ctx)
    h.wipe_mount(data_tree.mount)
    platform.mounted = False
    platform.devices = {h.VOLUME_ID: DEVICE}
    platform.probe = (2, "")

    result = agent.mount_data(ctx, wait_s=30)

    assert result.formatted and result.restored is not None
    assert platform.calls[:3] == ["probe", f"mkfs {DEVICE}", "probe"]
    assert f"mount {DEVICE}" in platform.calls
    assert h.tree_snapshot(data_tree.mount) == before


def test_volume_with_a_filesystem_is_never_formatted_even_when_empty(ctx, platform, h):
    platform.mounted = False
    platform.devices = {h.VOLUME_ID: DEVICE}
    platform.probe = (0, "TYPE=ext4\n")
    result = agent.mount_data(ctx, wait_s=30)
    assert not result.formatted and result.restored is None
    assert not [c for c in platform.calls if c.startswith("mkfs")]
    assert platform.mounted


def test_volume_with_data_is_mounted_and_not_restored_over(ctx, platform, data_tree, h):
    agent.backup(ctx)
    before = h.tree_snapshot(data_tree.mount)
    platform.mounted = False
    platform.devices = {h.VOLUME_ID: DEVICE}
    platform.probe = (0, "TYPE=ext4\n")
    result = agent.mount_data(ctx, wait_s=30)
    assert result.restored is None
    assert h.tree_snapshot(data_tree.mount) == before


def test_ambivalent_or_failed_probe_refuses_to_format_or_mount(ctx, platform, h):
    platform.mounted = False
    platform.devices = {h.VOLUME_ID: DEVICE}
    for probe in [(8, ""), (4, "")]:
        platform.probe = probe
        with pytest.raises(agent.DeviceError, match="refusing to format"):
            agent.mount_data(ctx, wait_s=30)
    assert not [c for c in platform.calls if c.startswith(("mkfs", "mount"))]


def test_missing_device_waits_then_names_the_volume(ctx, platform, clock, h):
    platform.mounted = False
    with pytest.raises(agent.DeviceError, match="volume vol-0123456789abcdef0 not attached"):
        agent.mount_data(ctx, wait_s=20)
    assert sum(clock.sleeps) >= 20
    assert platform.calls == []


def test_device_that_appears_while_waiting_is_used(ctx, platform, clock, h):
    platform.mounted = False
    platform.probe = (0, "TYPE=ext4\n")
    real_sleep = clock.sleep

    def attach_later(seconds: float) -> None:
        real_sleep(seconds)
        if sum(clock.sleeps) >= 5:
            platform.devices[h.VOLUME_ID] = DEVICE

    clock.sleep = attach_later  # type: ignore[method-assign]
    assert agent.mount_data(ctx, wait_s=60).device == DEVICE


def test_wrong_volume_id_is_rejected_before_touching_any_device(ctx, platform):
    with pytest.raises(agent.DeviceError, match="invalid volume id"):
        agent.wait_for_device(ctx, "vol-xyz", 10)
    with pytest.raises(agent.DeviceError, match="invalid volume id"):
        agent.wait_for_device(ctx, "0123456789abcdef0", 10)


def test_linux_platform_looks_up_the_nvme_by_id_link_without_the_hyphen(tmp_path, monkeypatch):
    assert agent.LinuxPlatform.BY_ID % "vol0abc" == "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc"
    target = tmp_path / "nvme1n1"
    target.write_text("")
    link = tmp_path / "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
    link.symlink_to(target)
    monkeypatch.setattr(agent.LinuxPlatform, "BY_ID", str(tmp_path / "nvme-Amazon_Elastic_Block_Store_%s"))
    linux = agent.LinuxPlatform(imds=None)  # type: ignore[arg-type]
    assert linux.find_block_device("vol-0123456789abcdef0") == str(target)
    assert linux.find_block_device("vol-0fffffffffffffff0") is None


def test_linux_platform_kills_containers_when_the_graceful_stop_fails():
    seen: list[list[str]] = []

    def run(argv, **kwargs):
        seen.append(argv)
        code = 1 if "scale" in argv else 0
        return subprocess.CompletedProcess(argv, code, "", "connection refused")

    agent.LinuxPlatform(imds=None, run=run).stop_workloads(20)  # type: ignore[arg-type]
    assert seen[-1] == ["/usr/local/bin/k3s-killall.sh"]


def test_linux_platform_restart_rolls_the_forgejo_deployment():
    seen: list[list[str]] = []

    def run(argv, **kwargs):
        seen.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    agent.LinuxPlatform(imds=None, run=run).restart_workloads()  # type: ignore[arg-type]
    assert seen == [
        ["/usr/local/bin/k3s", "kubectl", "-n", "forgejo", "rollout", "restart", "deployment/forgejo"]
    ]


def test_mount_data_rerun_after_an_s3_failure_restores_the_still_empty_volume(ctx, platform, data_tree, h):
    before = h.tree_snapshot(data_tree.mount)
    agent.backup(ctx)
    h.wipe_mount(data_tree.mount)
    platform.mounted = False
    platform.devices = {h.VOLUME_ID: DEVICE}
    platform.probe = (2, "")
    working_s3 = ctx.s3

    class Unreachable:
        def __getattr__(self, name):
            def fail(**kwargs):
                raise ConnectionError("S3 unreachable")

            return fail

    ctx.s3 = Unreachable()
    with pytest.raises(agent.StorageError):
        agent.mount_data(ctx, wait_s=30)
    assert platform.mounted and list(data_tree.mount.iterdir()) == []

    ctx.s3 = working_s3
    result = agent.mount_data(ctx, wait_s=30)
    assert result.already_mounted and result.restored is not None
    assert [c for c in platform.calls if c.startswith("mkfs")] == [f"mkfs {DEVICE}"]
    assert h.tree_snapshot(data_tree.mount) == before
