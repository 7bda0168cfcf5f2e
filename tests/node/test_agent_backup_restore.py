"""Backup -> restore round trips against moto S3 with real SQLite files and real git repositories."""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3

import botocore.exceptions
import pytest

import spotforge_agent as agent


def test_round_trip_restores_db_repositories_and_small_files_byte_for_byte(ctx, data_tree, h):
    before = h.tree_snapshot(data_tree.mount)
    rows_before = h.db_rows(data_tree.db)

    result = agent.backup(ctx)
    assert not result.skipped and result.db_uploaded and result.blobs_uploaded > 0

    h.wipe_mount(data_tree.mount)
    restored = agent.restore(ctx)

    assert restored.index_key == result.index_key
    assert h.tree_snapshot(data_tree.mount) == before
    assert h.db_rows(data_tree.db) == rows_before
    for repo in (data_tree.packed_repo, data_tree.loose_repo):
        h.git("fsck", "--full", "--strict", cwd=repo)
        assert h.git("rev-parse", "refs/tags/v1", cwd=repo).strip()
    assert (data_tree.mount / "traefik" / "acme.json").stat().st_mode & 0o777 == 0o600
    assert (data_tree.mount / "forgejo" / "ssh" / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert not [p for p in data_tree.mount.iterdir() if p.name.startswith(".spotforge-")]


def test_the_test_data_really_has_a_packed_and_a_loose_repository(data_tree):
    assert list((data_tree.packed_repo / "objects" / "pack").glob("pack-*.pack"))
    loose = [p for p in (data_tree.loose_repo / "objects").iterdir() if len(p.name) == 2]
    assert loose


def test_second_backup_uploads_only_new_objects_and_skips_the_unchanged_db(ctx, s3, data_tree, h):
    first = agent.backup(ctx)
    blobs_after_first = set(h.s3_keys(s3, "backups/blobs/"))
    db_after_first = h.s3_keys(s3, "backups/db/")

    h.add_commit(data_tree.loose_repo, data_tree.work, "one more commit")
    ctx.clock.advance(60)
    second = agent.backup(ctx)

    new_blobs = set(h.s3_keys(s3, "backups/blobs/")) - blobs_after_first
    assert not second.skipped and second.index_key != first.index_key
    assert not second.db_uploaded
    assert h.s3_keys(s3, "backups/db/") == db_after_first
    # a commit adds one commit, one tree and one blob object; refs are inline in the index
    assert second.blobs_uploaded == len(new_blobs) == 3


def test_backup_with_nothing_changed_writes_nothing(ctx, s3, data_tree, h):
    agent.backup(ctx)
    keys = h.s3_keys(s3)
    ctx.clock.advance(300)
    again = agent.backup(ctx)
    ctx.clock.advance(300)
    third = agent.backup(ctx)
    assert third.skipped and third.reason == "nothing changed"
    assert again.bytes_uploaded == 0 and third.bytes_uploaded == 0
    # the second run may only refresh the index once its DB fingerprint became trustworthy
    assert [k for k in h.s3_keys(s3) if k not in keys and not k.startswith("backups/index/")] == []


def test_db_change_uploads_a_new_snapshot_with_a_manifest(ctx, s3, data_tree, h):
    agent.backup(ctx)
    conn = sqlite3.connect(data_tree.db)
    conn.execute("INSERT INTO user (name, email, created) VALUES ('new', 'n@example.com', 1)")
    conn.commit()
    conn.close()
    ctx.clock.advance(60)
    result = agent.backup(ctx)
    assert result.db_uploaded
    manifests = h.s3_keys(s3, "backups/db/")
    assert len([k for k in manifests if k.endswith(".json")]) == 2
    manifest = json.loads(s3.get_object(Bucket=h.BUCKET, Key=manifests[-1])["Body"].read())
    assert set(manifest) >= {
        "format",
        "chunks",
        "size",
        "sha256",
        "page_count",
        "page_size",
        "source_time",
        "instance_id",
    }
    assert manifest["format"] == "chunks-v1"
    assert sum(size for _digest, size in manifest["chunks"]) == manifest["size"]
    assert manifest["size"] == manifest["page_count"] * manifest["page_size"]
    assert manifest["instance_id"] == h.INSTANCE_ID
    assert manifest["key"].startswith("backups/db/20261204T1201") and manifest["key"].endswith(".json")
    # the index's DB entry is the manifest (plus the change fingerprint): restore needs nothing else
    _, index = agent.latest_index(ctx)
    assert {k: v for k, v in index["db"].items() if not k.startswith("fingerprint")} == manifest
    assert not [k for k in h.s3_keys(s3) if k.endswith(".db.gz")]


def test_restore_at_picks_the_newest_backup_at_or_before_the_time(ctx, data_tree, h):
    agent.backup(ctx)
    first_time = ctx.clock.now()
    h.add_commit(data_tree.packed_repo, data_tree.work, "later work")
    later_head = h.git("rev-parse", "main", cwd=data_tree.packed_repo).strip()
    ctx.clock.advance(600)
    agent.backup(ctx)

    h.wipe_mount(data_tree.mount)
    agent.restore(ctx, at=first_time + agent._dt.timedelta(seconds=30))
    assert h.git("rev-parse", "main", cwd=data_tree.packed_repo).strip() != later_head

    h.wipe_mount(data_tree.mount)
    agent.restore(ctx, at=ctx.clock.now())
    assert h.git("rev-parse", "main", cwd=data_tree.packed_repo).strip() == later_head


def test_restore_refuses_a_mount_that_already_holds_data(ctx, data_tree):
    agent.backup(ctx)
    before = sorted(p.name for p in data_tree.mount.iterdir())
    with pytest.raises(agent.RefusedError, match="already holds data"):
        agent.restore(ctx)
    assert sorted(p.name for p in data_tree.mount.iterdir()) == before


def test_corrupt_blob_fails_the_restore_and_leaves_the_mount_blank(ctx, s3, data_tree, h):
    agent.backup(ctx)
    victim = h.s3_keys(s3, "backups/blobs/")[0]
    s3.put_object(Bucket=h.BUCKET, Key=victim, Body=b"bit rot")
    h.wipe_mount(data_tree.mount)
    with pytest.raises(agent.IntegrityError, match="does not match its sha256"):
        agent.restore(ctx)
    assert list(data_tree.mount.iterdir()) == []


def _chunked_db(data_tree, monkeypatch, rows: int = 200) -> None:
    """Grow the test DB to ~1.7 MB of incompressible rows and use 64 KiB chunks (~27 of them)."""
    monkeypatch.setattr(agent, "CHUNK_BYTES", 64 * 1024)
    conn = sqlite3.connect(data_tree.db)
    conn.execute("CREATE TABLE attachment (id INTEGER PRIMARY KEY, data BLOB)")
    conn.executemany("INSERT INTO attachment (data) VALUES (randomblob(8192))", [()] * rows)
    conn.commit()
    conn.close()


def _manifest(s3, h) -> dict:
    key = h.s3_keys(s3, "backups/db/")[-1]
    return json.loads(s3.get_object(Bucket=h.BUCKET, Key=key)["Body"].read())


def test_corrupt_db_chunk_is_refused_with_the_integrity_exit_code_and_nothing_is_left(
    ctx, s3, data_tree, h, monkeypatch, capsys
):
    _chunked_db(data_tree, monkeypatch)
    agent.backup(ctx)
    digest = _manifest(s3, h)["chunks"][3][0]
    key = f"backups/chunks/{digest}.gz"
    raw = gzip.decompress(s3.get_object(Bucket=h.BUCKET, Key=key)["Body"].read())
    damaged = raw[:4096] + b"\x00" * 4096 + raw[8192:]
    s3.put_object(Bucket=h.BUCKET, Key=key, Body=gzip.compress(damaged))
    h.wipe_mount(data_tree.mount)

    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    code = agent.main(["restore"], env={})

    assert code == agent.IntegrityError.exit_code
    assert f"chunks/{digest}.gz does not match its sha256" in capsys.readouterr().err
    assert list(data_tree.mount.iterdir()) == []


def test_a_chunk_that_is_not_gzip_is_an_integrity_error(ctx, s3, data_tree, h):
    agent.backup(ctx)
    digest = _manifest(s3, h)["chunks"][0][0]
    s3.put_object(Bucket=h.BUCKET, Key=f"backups/chunks/{digest}.gz", Body=b"bit rot")
    h.wipe_mount(data_tree.mount)
    with pytest.raises(agent.IntegrityError, match="does not decompress"):
        agent.restore(ctx)
    assert list(data_tree.mount.iterdir()) == []


def test_a_missing_chunk_fails_the_restore_and_leaves_the_mount_blank(ctx, s3, data_tree, h):
    agent.backup(ctx)
    digest = _manifest(s3, h)["chunks"][-1][0]
    s3.delete_object(Bucket=h.BUCKET, Key=f"backups/chunks/{digest}.gz")
    h.wipe_mount(data_tree.mount)
    with pytest.raises(agent.IntegrityError, match="backup object missing"):
        agent.restore(ctx)
    assert list(data_tree.mount.iterdir()) == []


def test_chunks_that_each_verify_but_assemble_a_different_file_are_refused(
    ctx, s3, data_tree, h, monkeypatch
):
    monkeypatch.setattr(agent, "CHUNK_BYTES", 4096)
    agent.backup(ctx)
    key = h.s3_keys(s3, "backups/index/")[-1]
    index = json.loads(gzip.decompress(s3.get_object(Bucket=h.BUCKET, Key=key)["Body"].read()))
    chunks = index["db"]["chunks"]
    assert len(chunks) >= 2 and chunks[0][1] == chunks[1][1]
    chunks[0], chunks[1] = chunks[1], chunks[0]  # every chunk is intact, the order is not
    s3.put_object(Bucket=h.BUCKET, Key=key, Body=gzip.compress(json.dumps(index).encode()))
    h.wipe_mount(data_tree.mount)
    with pytest.raises(agent.IntegrityError, match="sha256 of the database does not match"):
        agent.restore(ctx)
    assert list(data_tree.mount.iterdir()) == []


def test_second_backup_after_a_few_row_updates_uploads_only_a_few_chunks(ctx, s3, data_tree, h, monkeypatch):
    _chunked_db(data_tree, monkeypatch)
    first = agent.backup(ctx)
    first_manifest = _manifest(s3, h)
    chunks_before = set(h.s3_keys(s3, "backups/chunks/"))
    assert first.db_chunks_uploaded == len(chunks_before) == len({c[0] for c in first_manifest["chunks"]})
    assert len(first_manifest["chunks"]) >= 25

    conn = sqlite3.connect(data_tree.db)
    conn.execute("UPDATE user SET email = 'moved@example.com' WHERE id IN (1, 2, 3)")
    conn.execute("UPDATE attachment SET data = randomblob(8192) WHERE id = 150")
    conn.commit()
    conn.close()
    ctx.clock.advance(300)
    second = agent.backup(ctx)

    new_keys = sorted(set(h.s3_keys(s3, "backups/chunks/")) - chunks_before)
    new_bytes = sum(s3.head_object(Bucket=h.BUCKET, Key=k)["ContentLength"] for k in new_keys)
    assert second.db_uploaded and not second.skipped
    # page 1 (header), the user table's leaf and the attachment's page: at most 3 of ~27 chunks
    assert 1 <= second.db_chunks_uploaded == len(new_keys) <= 3
    assert second.bytes_uploaded == new_bytes == _manifest(s3, h)["bytes_uploaded"]
    assert new_bytes < first.bytes_uploaded / 5
    h.wipe_mount(data_tree.mount)
    agent.restore(ctx)
    assert h.db_rows(data_tree.db)["user"][0][2] == "moved@example.com"


def test_restore_rebuilds_the_db_byte_for_byte_from_parallel_chunks(ctx, s3, data_tree, h, monkeypatch):
    _chunked_db(data_tree, monkeypatch)
    rows = h.db_rows(data_tree.db)
    reference = data_tree.mount.parent / "reference.db"
    agent.snapshot_sqlite(str(data_tree.db), str(reference))
    agent.backup(ctx)
    h.wipe_mount(data_tree.mount)

    agent.restore(ctx)

    assert data_tree.db.read_bytes() == reference.read_bytes()
    assert hashlib.sha256(data_tree.db.read_bytes()).hexdigest() == _manifest(s3, h)["sha256"]
    conn = sqlite3.connect(data_tree.db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    assert h.db_rows(data_tree.db) == rows


def test_restore_without_any_backup_names_the_bucket(ctx, platform):
    with pytest.raises(agent.AgentError, match="no backup found in s3://spotforge-backups-test"):
        agent.restore(ctx)


def test_restore_rejects_index_paths_that_escape_the_mount(ctx, s3, data_tree, h):
    agent.backup(ctx)
    key = h.s3_keys(s3, "backups/index/")[-1]
    index = json.loads(gzip.decompress(s3.get_object(Bucket=h.BUCKET, Key=key)["Body"].read()))
    index["files"][0]["path"] = "../../escaped"
    s3.put_object(Bucket=h.BUCKET, Key=key, Body=gzip.compress(json.dumps(index).encode()))
    h.wipe_mount(data_tree.mount)
    with pytest.raises(agent.IntegrityError, match="unsafe path"):
        agent.restore(ctx)
    assert list(data_tree.mount.iterdir()) == []


class _DenyingS3:
    """Wraps the moto client; put_object is refused the way S3 refuses a missing IAM grant."""

    def __init__(self, inner, denied=("put_object",)):
        self._inner = inner
        self._denied = denied

    def __getattr__(self, name):
        if name in self._denied:

            def refuse(**kwargs):
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, name
                )

            return refuse
        return getattr(self._inner, name)


def test_s3_access_denied_is_a_storage_error_naming_the_operation(ctx, data_tree):
    denied = agent.Context(
        settings=ctx.settings, s3=_DenyingS3(ctx.s3), platform=ctx.platform, clock=ctx.clock
    )
    with pytest.raises(agent.StorageError, match="S3 access denied: put_object s3://spotforge-backups-test/"):
        agent.backup(denied)


def test_backup_of_an_unmounted_volume_fails_clearly(ctx, platform):
    platform.mounted = False
    with pytest.raises(agent.DeviceError, match="not mounted"):
        agent.backup(ctx)


def test_repeated_chunks_inside_one_snapshot_are_uploaded_once_and_restored_everywhere(
    ctx, s3, data_tree, h, monkeypatch
):
    monkeypatch.setattr(agent, "CHUNK_BYTES", 4096)
    conn = sqlite3.connect(data_tree.db)
    # secure_delete zeroes freed pages, and a snapshot keeps the free list: many 4 KiB chunks of
    # zeros share one digest
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("CREATE TABLE attachment (id INTEGER PRIMARY KEY, data BLOB)")
    conn.executemany("INSERT INTO attachment (data) VALUES (randomblob(65536))", [()] * 20)
    conn.commit()
    conn.execute("DELETE FROM attachment")
    conn.commit()
    conn.close()
    rows = h.db_rows(data_tree.db)
    result = agent.backup(ctx)
    chunks = _manifest(s3, h)["chunks"]
    distinct = {digest for digest, _size in chunks}
    assert len(distinct) < len(chunks) / 2
    assert result.db_chunks_uploaded == len(distinct) == len(h.s3_keys(s3, "backups/chunks/"))
    h.wipe_mount(data_tree.mount)
    agent.restore(ctx)
    assert h.db_rows(data_tree.db) == rows


def test_a_large_mutable_file_rewritten_with_the_same_size_is_backed_up_again(ctx, data_tree, h):
    big = data_tree.mount / "forgejo" / "ssh" / "authorized_keys"
    big.write_bytes(b"a" * 100_000)
    agent.backup(ctx)
    big.write_bytes(b"b" * 100_000)
    ctx.clock.advance(60)
    assert not agent.backup(ctx).skipped
    h.wipe_mount(data_tree.mount)
    agent.restore(ctx)
    assert big.read_bytes() == b"b" * 100_000
