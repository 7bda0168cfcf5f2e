"""SQLite snapshots under a concurrent writer, change detection and a full disk."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

import spotforge_agent as agent


class Writer(threading.Thread):
    """Commits one row per transaction and records (id, commit-finished time) for each."""

    def __init__(self, path, journal: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.journal = journal
        self.committed: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=30)
            conn.execute(f"PRAGMA journal_mode={self.journal}")
            i = 0
            while not self.stop.is_set():
                i += 1
                conn.execute("INSERT INTO ledger (id, payload) VALUES (?, ?)", (i, "x" * 200))
                conn.commit()
                self.committed.append((i, time.monotonic()))
                if self.journal != "wal":
                    # rollback-journal writers lock readers out while committing; a tight loop
                    # would starve every reader, which no real Forgejo does
                    time.sleep(0.002)
            conn.close()
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def _seed(path, journal: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
    conn.executemany("INSERT INTO filler (data) VALUES (randomblob(4000))", [()] * 2000)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("journal", "method"),
    [("wal", "backup"), ("wal", "vacuum"), ("wal", "auto"), ("delete", "backup"), ("delete", "auto")],
)
def test_snapshot_under_a_concurrent_writer_is_consistent_and_has_every_earlier_commit(
    tmp_path, journal, method
):
    source = tmp_path / "gitea.db"
    _seed(source, journal)
    writer = Writer(source, journal)
    writer.start()
    while len(writer.committed) < 50:
        time.sleep(0.005)
    began = time.monotonic()
    info = agent.snapshot_sqlite(str(source), str(tmp_path / "snap.db"), method)
    writer.stop.set()
    writer.join()
    assert writer.error is None

    conn = sqlite3.connect(tmp_path / "snap.db")
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    present = {row[0] for row in conn.execute("SELECT id FROM ledger")}
    assert conn.execute("PRAGMA page_count").fetchone()[0] == info["page_count"]
    conn.close()
    if method == "auto":
        assert info["method"] == ("backup" if journal == "wal" else "vacuum")
    before = {i for i, at in writer.committed if at < began}
    assert before and before <= present
    # a snapshot is a prefix of the commit sequence: no gaps
    assert present == set(range(1, len(present) + 1))


def test_a_full_disk_during_the_snapshot_is_a_disk_full_error(tmp_path, monkeypatch):
    source = tmp_path / "gitea.db"
    _seed(source, "wal")

    def tiny_target(path):
        conn = sqlite3.connect(path)
        # SQLITE_FULL is what SQLite reports for ENOSPC too; a page cap triggers it on demand.
        conn.execute("PRAGMA max_page_count=8")
        return conn

    monkeypatch.setattr(agent, "_open_snapshot_target", tiny_target)
    with pytest.raises(agent.DiskFullError, match="no space left"):
        agent.snapshot_sqlite(str(source), str(tmp_path / "snap.db"), "backup")


def test_backup_on_a_full_disk_fails_cleanly_without_leaving_temp_files(ctx, s3, data_tree, h, monkeypatch):
    def full(path):
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA max_page_count=1")
        return conn

    monkeypatch.setattr(agent, "_open_snapshot_target", full)
    code = _run_cli_backup(ctx, monkeypatch, h)
    assert code == agent.DiskFullError.exit_code
    assert h.s3_keys(s3) == []
    assert not [p for p in data_tree.mount.iterdir() if p.name.startswith(".spotforge-")]


def _run_cli_backup(ctx, monkeypatch, h):
    monkeypatch.setattr(agent, "make_context", lambda env: (ctx, None))
    return agent.main(["backup"], env={})


def test_fingerprint_changes_with_every_commit_in_wal_mode(tmp_path):
    source = tmp_path / "gitea.db"
    _seed(source, "wal")
    seen = set()
    conn = sqlite3.connect(source)
    for i in range(20):
        conn.execute("INSERT INTO ledger (id, payload) VALUES (?, 'p')", (i,))
        conn.commit()
        seen.add(repr(agent.db_fingerprint(str(source))))
        if i == 10:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert len(seen) == 20


def test_fingerprint_changes_with_every_commit_in_rollback_mode(tmp_path):
    source = tmp_path / "gitea.db"
    _seed(source, "delete")
    conn = sqlite3.connect(source)
    seen = set()
    for i in range(10):
        conn.execute("INSERT INTO ledger (id, payload) VALUES (?, 'p')", (i,))
        conn.commit()
        seen.add(repr(agent.db_fingerprint(str(source))))
    conn.close()
    assert len(seen) == 10


def test_a_recent_fingerprint_is_not_trusted_so_a_same_size_wal_rewrite_is_still_backed_up(
    ctx, s3, data_tree, h
):
    agent.backup(ctx)
    conn = sqlite3.connect(data_tree.db)
    conn.execute("UPDATE user SET email = 'changed@example.com' WHERE id = 1")
    conn.commit()
    conn.close()
    fingerprint = agent.db_fingerprint(str(data_tree.db))
    # Pretend the last backup saw exactly this fingerprint but too soon after the write: the agent
    # must not trust it and falls back to the content hash, which sees the change.
    index_key = h.s3_keys(s3, "backups/index/")[-1]
    index = agent._load_index(ctx, index_key)
    index["db"]["fingerprint"] = fingerprint
    index["db"]["fingerprint_trusted"] = False
    import gzip
    import json

    s3.put_object(Bucket=h.BUCKET, Key=index_key, Body=gzip.compress(json.dumps(index).encode()))
    ctx.clock.advance(60)
    assert agent.backup(ctx).db_uploaded


def test_a_trusted_unchanged_fingerprint_skips_the_snapshot(ctx, s3, data_tree, h, monkeypatch):
    old = time.time() - 60
    for suffix in ("", "-wal"):
        path = str(data_tree.db) + suffix
        if os.path.exists(path):
            os.utime(path, (old, old))
    agent.backup(ctx)
    calls = []
    monkeypatch.setattr(agent, "snapshot_sqlite", lambda *a: calls.append(a))
    ctx.clock.advance(300)
    assert agent.backup(ctx).skipped
    assert calls == []


def test_a_chunked_backup_taken_under_a_concurrent_writer_restores_a_consistent_prefix(
    ctx, data_tree, h, monkeypatch
):
    monkeypatch.setattr(agent, "CHUNK_BYTES", 64 * 1024)
    db = data_tree.db
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE ledger (id INTEGER PRIMARY KEY, payload TEXT)")
    conn.execute("CREATE TABLE filler (id INTEGER PRIMARY KEY, data BLOB)")
    conn.executemany("INSERT INTO filler (data) VALUES (randomblob(4000))", [()] * 300)
    conn.commit()
    conn.close()
    writer = Writer(db, "wal")
    writer.start()
    try:
        while len(writer.committed) < 20:
            time.sleep(0.001)
        first = agent.backup(ctx)
        ctx.clock.advance(300)
        second = agent.backup(ctx)  # incremental, while the writer still commits
        committed_before_second = len(writer.committed)
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None
    assert first.db_uploaded and second.db_uploaded
    assert 0 < second.db_chunks_uploaded < first.db_chunks_uploaded
    h.wipe_mount(data_tree.mount)
    agent.restore(ctx)
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in check.execute("SELECT id FROM ledger ORDER BY id")]
    finally:
        check.close()
    # every transaction is in or out whole: ids 1..n with no gap, n reaching the first backup's rows
    assert ids == list(range(1, len(ids) + 1))
    assert 20 <= len(ids) <= committed_before_second + 1
