"""The bucket expires objects after the retention: the newest backup must never lose a piece, and the
controller must be able to tell a quiet forge from stopped backups."""

from __future__ import annotations

import json

import spotforge_agent as agent
from tests.node.conftest import BUCKET

DAY = 86400


def _refreshed(s3, key: str) -> str | None:
    return s3.head_object(Bucket=BUCKET, Key=key)["Metadata"].get("spotforge-refreshed")


def _needed_keys(index_key: str, index: dict) -> list[str]:
    manifest_key = index["db"]["key"]
    chunks = [f"backups/chunks/{digest}.gz" for digest, _size in index["db"]["chunks"]]
    blobs = [
        "backups/blobs/" + f["sha256"]
        for f in index["files"]
        if "sha256" in f and "data" not in f and "link" not in f
    ]
    assert manifest_key.endswith(".json") and chunks
    return [index_key, manifest_key, *chunks, *blobs]


def test_every_run_writes_a_heartbeat_even_when_nothing_changed(ctx, s3, data_tree):
    first = agent.backup(ctx)
    ctx.clock.advance(300)
    again = agent.backup(ctx)
    assert again.skipped
    heartbeat = json.loads(s3.get_object(Bucket=BUCKET, Key="backups/heartbeat.json")["Body"].read())
    assert heartbeat["checked_at"] == "2026-12-04T12:05:00Z"
    assert heartbeat["index"] == first.index_key


def test_objects_the_newest_backup_needs_are_rewritten_before_they_can_expire(ctx, s3, data_tree):
    first = agent.backup(ctx)
    _, index = agent.latest_index(ctx)
    needed = _needed_keys(first.index_key, index)
    s3.put_object(Bucket=BUCKET, Key="backups/blobs/" + "0" * 64, Body=b"no backup refers to me")
    s3.put_object(Bucket=BUCKET, Key="backups/chunks/" + "1" * 64 + ".gz", Body=b"nor to me")

    ctx.clock.advance(16 * DAY)  # past half of the 30-day retention, as the bucket sees it
    agent.backup(ctx)

    assert all(_refreshed(s3, key) == "2026-12-20T12:00:00Z" for key in needed)
    # Unreferenced objects are left to the lifecycle rule: that is the garbage collection.
    assert _refreshed(s3, "backups/blobs/" + "0" * 64) is None
    assert _refreshed(s3, "backups/chunks/" + "1" * 64 + ".gz") is None


def test_refresh_runs_at_most_once_a_day_and_never_on_a_drain_deadline(ctx, s3, data_tree):
    first = agent.backup(ctx)
    ctx.clock.advance(16 * DAY)
    assert agent.refresh_newest(ctx, first.index_key, agent.latest_index(ctx)[1], ctx.clock.now()) > 0
    calls = []
    original = agent.refresh_newest
    agent.refresh_newest = lambda *a, **k: calls.append(a) or 0
    try:
        agent.backup(ctx, deadline=ctx.clock.monotonic() + 60)  # the drain's final snapshot
        assert calls == []
        agent.backup(ctx)
        ctx.clock.advance(3600)
        agent.backup(ctx)
        assert len(calls) == 1
    finally:
        agent.refresh_newest = original


def test_fresh_objects_are_not_copied(ctx, s3, data_tree):
    first = agent.backup(ctx)
    index = agent.latest_index(ctx)[1]
    assert agent.refresh_newest(ctx, first.index_key, index, ctx.clock.now()) == 0
