"""drain: ordering, idempotency, the deadline, and the CLI's one-line errors."""

from __future__ import annotations

import json

import pytest

import spotforge_agent as agent


def test_drain_stops_workloads_backs_up_syncs_and_unmounts_in_that_order(ctx, s3, data_tree, platform, h):
    result = agent.drain(ctx, 25)
    assert not result.already_drained
    assert result.backup is not None and not result.backup.skipped
    assert (
        platform.calls.index("stop_workloads")
        < platform.calls.index("sync")
        < platform.calls.index("unmount")
    )
    assert not platform.mounted
    assert agent.status(ctx)["phase"] == "drained"
    assert h.s3_keys(s3, "backups/index/")


def test_final_snapshot_contains_a_write_made_just_before_the_drain(ctx, data_tree, platform, h):
    import sqlite3

    agent.backup(ctx)

    def last_write(timeout_s: float) -> None:
        # the workload's final commit lands while it is being stopped
        conn = sqlite3.connect(data_tree.db)
        conn.execute("INSERT INTO user (name, email, created) VALUES ('last', 'l@example.com', 9)")
        conn.commit()
        conn.close()

    platform.on_stop = last_write
    agent.drain(ctx, 25)
    rows = h.db_rows(data_tree.db)
    h.wipe_mount(data_tree.mount)
    platform.mounted = True
    ctx.state.update(phase="standby")
    agent.restore(ctx)
    assert h.db_rows(data_tree.db) == rows
    assert any(r[1] == "last" for r in rows["user"])


def test_second_drain_on_a_drained_node_exits_zero_quickly_and_does_nothing(ctx, data_tree, platform, s3, h):
    agent.drain(ctx, 25)
    calls = list(platform.calls)
    keys = h.s3_keys(s3)
    again = agent.drain(ctx, 25)
    assert again.already_drained and again.seconds == 0.0
    assert platform.calls == calls
    assert h.s3_keys(s3) == keys


def test_drain_past_the_deadline_fails_but_still_unmounts_and_leaves_no_partial_backup(
    ctx, data_tree, platform, s3, h, clock
):
    platform.on_stop = lambda timeout_s: clock.advance(timeout_s + 1)
    with pytest.raises(agent.DeadlineExceeded, match="deadline passed during stopping workloads"):
        agent.drain(ctx, 25)
    assert not platform.mounted
    assert platform.calls[-2:] == ["sync", "unmount"]
    assert h.s3_keys(s3) == []
    assert agent.status(ctx)["phase"] == "draining"
    # nothing is half uploaded either
    assert s3.list_multipart_uploads(Bucket=h.BUCKET).get("Uploads", []) == []


def test_deadline_during_the_db_upload_stops_before_the_manifest_and_leaves_only_whole_chunks(
    ctx, data_tree, platform, s3, h, monkeypatch, clock
):
    import gzip
    import hashlib
    import sqlite3

    monkeypatch.setattr(agent, "CHUNK_BYTES", 64 * 1024)
    conn = sqlite3.connect(data_tree.db)
    conn.execute("CREATE TABLE blob (id INTEGER PRIMARY KEY, data BLOB)")
    conn.executemany("INSERT INTO blob (data) VALUES (randomblob(65536))", [()] * 200)
    conn.commit()
    conn.close()
    real_s3 = agent._s3

    def slow_s3(c, operation, key, **kwargs):
        if operation == "put_object" and "/chunks/" in key:
            clock.advance(5)  # each chunk "takes" 5 s of the 25 s budget
        return real_s3(c, operation, key, **kwargs)

    monkeypatch.setattr(agent, "_s3", slow_s3)
    with pytest.raises(agent.DeadlineExceeded, match="DB upload"):
        agent.drain(ctx, 25)
    assert not platform.mounted
    keys = h.s3_keys(s3)
    assert [k for k in keys if "/db/" in k or "/index/" in k] == []
    chunks = [k for k in keys if "/chunks/" in k]
    # it stopped early, and what did land is complete and correct (content addressed, unreferenced)
    assert 0 < len(chunks) < 50
    for key in chunks:
        data = gzip.decompress(s3.get_object(Bucket=h.BUCKET, Key=key)["Body"].read())
        assert key.endswith(f"/{hashlib.sha256(data).hexdigest()}.gz")


def test_drain_of_a_node_without_a_mounted_volume_just_stops_workloads(ctx, platform):
    platform.mounted = False
    result = agent.drain(ctx, 25)
    assert result.backup is None
    assert platform.calls == ["stop_workloads"]
    assert agent.status(ctx)["phase"] == "drained"


def test_backup_on_a_drained_node_is_a_quiet_no_op(ctx, data_tree, platform):
    agent.drain(ctx, 25)
    result = agent.backup(ctx)
    assert result.skipped and "drained" in result.reason


def _cli(ctx, monkeypatch, argv, capsys):
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    code = agent.main(argv, env={})
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_drain_twice_exits_zero_both_times(ctx, data_tree, monkeypatch, capsys):
    first = _cli(ctx, monkeypatch, ["drain", "--deadline", "25"], capsys)
    second = _cli(ctx, monkeypatch, ["drain", "--deadline", "25"], capsys)
    assert first[0] == 0 and second[0] == 0
    assert json.loads(second[1])["already_drained"] is True


def test_cli_drain_past_deadline_prints_one_line_and_exits_non_zero(
    ctx, data_tree, platform, clock, monkeypatch, capsys
):
    platform.on_stop = lambda timeout_s: clock.advance(60)
    code, _out, err = _cli(ctx, monkeypatch, ["drain", "--deadline", "25"], capsys)
    assert code == agent.DeadlineExceeded.exit_code
    lines = [line for line in err.splitlines() if line.startswith("spotforge-agent:")]
    assert len(lines) == 1 and "drain:" in lines[0] and "volume unmounted" in lines[0]
