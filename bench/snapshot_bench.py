"""Benchmark the node agent's final-snapshot path against `sqlite3 .backup` and a raw read.

    python bench/snapshot_bench.py --sizes 10,100,1000     (sizes in MB; default 10,100)

For each size it builds a Forgejo-like SQLite database (WAL mode, users, repositories, issues,
comments, actions with indexes), starts a writer thread that keeps committing, and measures on the
same file: a raw sequential read, the agent's snapshot (``auto``: online backup API for WAL) and
``VACUUM INTO``, the ``sqlite3`` CLI's ``.backup``, the agent's parallel gzip alone, and the
agent's compress + multipart upload to moto S3 served over HTTP on 127.0.0.1
(``ThreadedMotoServer``, needs ``moto[server]``; without it the upload goes to in-process moto and
the table says so). It prints a markdown table and whether a 1 GB final snapshot fits the 25 s
drain budget. Files live in a temporary directory that is removed at the end. Numbers are
warm-page-cache numbers on this machine, not on a t4g.small.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import random
import shutil
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "userdata" / "agent"))

import spotforge_agent as agent  # noqa: E402

DRAIN_BUDGET_S = 25.0
BUCKET = "spotforge-bench"
MB = 1024 * 1024

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE user (id INTEGER PRIMARY KEY, lower_name TEXT UNIQUE, name TEXT, email TEXT, passwd TEXT,
                   created_unix INTEGER, updated_unix INTEGER);
CREATE TABLE repository (id INTEGER PRIMARY KEY, owner_id INTEGER, lower_name TEXT, name TEXT,
                         description TEXT, size INTEGER, created_unix INTEGER);
CREATE UNIQUE INDEX UQE_repository_s ON repository (owner_id, lower_name);
CREATE TABLE issue (id INTEGER PRIMARY KEY, repo_id INTEGER, idx INTEGER, poster_id INTEGER,
                    title TEXT, content TEXT, is_closed INTEGER, created_unix INTEGER);
CREATE INDEX IDX_issue_repo_id ON issue (repo_id);
CREATE TABLE comment (id INTEGER PRIMARY KEY, type INTEGER, poster_id INTEGER, issue_id INTEGER,
                      content TEXT, created_unix INTEGER);
CREATE INDEX IDX_comment_issue_id ON comment (issue_id);
CREATE TABLE action (id INTEGER PRIMARY KEY, user_id INTEGER, op_type INTEGER, act_user_id INTEGER,
                     repo_id INTEGER, ref_name TEXT, content TEXT, created_unix INTEGER);
CREATE INDEX IDX_action_user_id ON action (user_id);
"""

WORDS = [
    "".join(random.Random(i).choices(string.ascii_lowercase, k=random.Random(i).randint(2, 9)))
    for i in range(2000)
]


def _text(rng: random.Random, words: int) -> str:
    # Natural-language-like text compresses like real issue and comment bodies (not like noise).
    return " ".join(rng.choices(WORDS, k=words))


def build_db(path: Path, size_mb: int) -> None:
    rng = random.Random(size_mb)
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.executemany(
        "INSERT INTO user VALUES (NULL, ?, ?, ?, ?, ?, ?)",
        [(f"user{i}", f"User{i}", f"user{i}@example.com", os.urandom(32).hex(), i, i) for i in range(2000)],
    )
    conn.executemany(
        "INSERT INTO repository VALUES (NULL, ?, ?, ?, ?, ?, ?)",
        [(i % 2000, f"repo{i}", f"Repo{i}", _text(rng, 12), i * 100, i) for i in range(5000)],
    )
    conn.commit()
    issue = 0
    while path.stat().st_size < size_mb * MB:
        batch_issues = []
        batch_comments = []
        batch_actions = []
        for _ in range(2000):
            issue += 1
            batch_issues.append(
                (issue % 5000, issue, issue % 2000, _text(rng, 8), _text(rng, 60), issue % 2, issue)
            )
            for _ in range(3):
                batch_comments.append((0, issue % 2000, issue, _text(rng, 40), issue))
            batch_actions.append(
                (issue % 2000, 5, issue % 2000, issue % 5000, "refs/heads/main", _text(rng, 10), issue)
            )
        conn.executemany("INSERT INTO issue VALUES (NULL, ?, ?, ?, ?, ?, ?, ?)", batch_issues)
        conn.executemany("INSERT INTO comment VALUES (NULL, ?, ?, ?, ?, ?)", batch_comments)
        conn.executemany("INSERT INTO action VALUES (NULL, ?, ?, ?, ?, ?, ?, ?)", batch_actions)
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


class Writer(threading.Thread):
    """Forgejo-like write load: small transactions (a comment plus an action) every ~5 ms."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.commits = 0

    def run(self) -> None:
        rng = random.Random(7)
        conn = sqlite3.connect(self.path, timeout=60)
        while not self.stop.is_set():
            if not self.running.wait(0.05):
                continue
            conn.execute("INSERT INTO comment VALUES (NULL, 0, 1, 1, ?, 0)", (_text(rng, 30),))
            conn.execute("INSERT INTO action VALUES (NULL, 1, 5, 1, 1, 'refs/heads/main', 'x', 0)")
            conn.commit()
            self.commits += 1
            time.sleep(0.005)
        conn.close()


@contextmanager
def s3_endpoint() -> Iterator[tuple[object, str]]:
    import boto3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        from moto import mock_aws

        with mock_aws():
            client = boto3.client("s3", region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield client, "in-process moto (moto[server] not installed)"
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client("s3", region_name="us-east-1", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket=BUCKET)
        yield client, f"moto server on http://{host}:{port}"
    finally:
        server.stop()


def timed(step: Callable[[], object], repeat: int = 1) -> float:
    """Best of ``repeat`` runs: the machine is shared, the minimum is the least disturbed run."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def raw_read(path: Path) -> None:
    # In a child process: closing a descriptor of a SQLite file in this process would drop the
    # writer thread's POSIX locks and let another process delete the WAL under it.
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def compress_only(path: Path, level: int) -> None:
    # The same parallel gzip-member scheme compress_upload uses, without the upload.
    with open(path, "rb") as handle, concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for chunk in iter(lambda: handle.read(agent.CHUNK_BYTES), b""):
            pending.append(pool.submit(agent.gzip_member, chunk, level))
            if len(pending) > 3:
                pending.pop(0).result()
        for future in pending:
            future.result()


@dataclass
class Row:
    size_mb: int
    step: str
    seconds: float
    mb: float
    vs_cli: float | None


def run_size(
    size_mb: int, work: Path, s3, cli: str | None, cli_timeout: float
) -> tuple[list[Row], dict[str, float]]:
    db = work / f"gitea-{size_mb}.db"
    print(f"building {size_mb} MB database...", file=sys.stderr)
    built = timed(lambda: build_db(db, size_mb))
    print(f"built in {built:.1f} s", file=sys.stderr)
    actual_mb = db.stat().st_size / MB
    settings = agent.Settings(
        stack="bench", region="us-east-1", bucket=BUCKET, volume_id="vol-0123456789abcdef0", mount=str(work)
    )
    ctx = agent.Context(settings=settings, s3=s3, platform=agent.Platform(), clock=agent.SystemClock())
    writer = Writer(db)
    writer.start()
    results: dict[str, float] = {}
    snap = work / "snap.db"

    def cli_backup(out: Path) -> None:
        subprocess.run(
            [cli, str(db), f".backup '{out}'"], check=True, capture_output=True, timeout=cli_timeout
        )

    try:
        time.sleep(0.2)
        # Idle: the writer pauses, as in a drain (workloads already stopped).
        writer.running.clear()
        time.sleep(0.1)
        results["raw sequential read (idle)"] = timed(lambda: raw_read(db), 3)
        results["agent snapshot, backup API (idle)"] = timed(
            lambda: agent.snapshot_sqlite(str(db), str(snap), "auto"), 3
        )
        results["VACUUM INTO (idle)"] = timed(
            lambda: agent.snapshot_sqlite(str(db), str(work / "vac.db"), "vacuum")
        )
        if cli:
            results["sqlite3 CLI .backup (idle)"] = timed(lambda: cli_backup(work / "cli.db"), 3)
        # Under writes: a commit every ~5 ms, as a busy Forgejo during a scheduled backup.
        writer.running.set()
        time.sleep(0.1)
        results["agent snapshot, backup API (writer)"] = timed(
            lambda: agent.snapshot_sqlite(str(db), str(snap), "auto")
        )
        results["VACUUM INTO (writer)"] = timed(
            lambda: agent.snapshot_sqlite(str(db), str(work / "vac.db"), "vacuum")
        )
        if cli:
            try:
                results["sqlite3 CLI .backup (writer)"] = timed(lambda: cli_backup(work / "cli.db"))
            except subprocess.TimeoutExpired:
                # The CLI copies 100 pages per step and restarts after every foreign commit.
                results[f"sqlite3 CLI .backup (writer) gave up after {cli_timeout:.0f} s"] = float("nan")
        writer.running.clear()
        results[f"gzip (parallel, level {settings.compress_level})"] = timed(
            lambda: compress_only(snap, settings.compress_level)
        )
        key = f"bench/{size_mb}.db.gz"
        sums: dict[str, object] = {}
        results["compress + upload (agent)"] = timed(
            lambda: sums.update(agent.compress_upload(ctx, str(snap), key))
        )
        ratio = int(sums["size_raw"]) / max(1, int(sums["size_compressed"]))  # type: ignore[arg-type]
        results["final snapshot total (idle snapshot + compress + upload)"] = (
            results["agent snapshot, backup API (idle)"] + results["compress + upload (agent)"]
        )
    finally:
        writer.stop.set()
        writer.running.set()
        writer.join()
    cli_s = results.get("sqlite3 CLI .backup (idle)")
    rows = [
        Row(size_mb, step, secs, actual_mb, (secs / cli_s) if cli_s else None)
        for step, secs in results.items()
    ]
    extras = {"actual_mb": actual_mb, "compression_ratio": ratio, "writer_commits": float(writer.commits)}
    for name in ("snap.db", "vac.db", "cli.db", db.name, db.name + "-wal", db.name + "-shm"):
        with_path = work / name
        if with_path.exists():
            with_path.unlink()
    return rows, extras


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="comma list of database sizes in MB")
    parser.add_argument(
        "--cli-timeout", type=float, default=60.0, help="give up on sqlite3 .backup after this"
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    cli = shutil.which("sqlite3")
    work = Path(tempfile.mkdtemp(prefix="spotforge-bench-"))
    all_rows: list[Row] = []
    notes: list[str] = []
    try:
        with s3_endpoint() as (s3, where):
            notes.append(f"upload target: {where}")
            for size in sizes:
                rows, extras = run_size(size, work, s3, cli, args.cli_timeout)
                all_rows.extend(rows)
                notes.append(
                    f"{size} MB: file {extras['actual_mb']:.0f} MB, gzip ratio {extras['compression_ratio']:.1f}x, "
                    f"{extras['writer_commits']:.0f} concurrent commits during the run"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| size | step | seconds | MB/s | x sqlite3 .backup |")
    print("|---:|---|---:|---:|---:|")
    for row in all_rows:
        if math.isnan(row.seconds):
            print(f"| {row.size_mb} MB | {row.step} | - | - | - |")
            continue
        ratio = f"{row.vs_cli:.2f}" if row.vs_cli is not None else "n/a"
        print(f"| {row.size_mb} MB | {row.step} | {row.seconds:.3f} | {row.mb / row.seconds:.0f} | {ratio} |")
    largest = max(all_rows, key=lambda r: r.size_mb).size_mb
    final = next(r for r in all_rows if r.size_mb == largest and r.step.startswith("final snapshot total"))
    per_gb = final.seconds * 1024 / final.mb
    verdict = "fits" if per_gb <= DRAIN_BUDGET_S else "does NOT fit"
    measured = "measured" if largest >= 1000 else f"extrapolated from {largest} MB"
    print()
    for note in notes:
        print(f"- {note}")
    print(
        f"- 1 GB final snapshot + upload: {per_gb:.1f} s ({measured}) -> {verdict} the {DRAIN_BUDGET_S:.0f} s drain budget"
    )
    if not cli:
        print("- sqlite3 CLI not found: no .backup comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
