"""Fixtures for the node agent tests: a fake clock, a folder-backed Platform, moto S3, and a
Forgejo-like data tree with real SQLite and real git repositories."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

import spotforge_agent as agent

BUCKET = "spotforge-backups-test"
INSTANCE_ID = "i-0123456789abcdef0"
VOLUME_ID = "vol-0123456789abcdef0"
FIXTURES = Path(__file__).parent / "fixtures"


class FakeClock(agent.Clock):
    """Virtual time: sleep advances wall and monotonic time together and returns at once."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self.wall = start or dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)
        self.mono = 1000.0
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += dt.timedelta(seconds=seconds)


@dataclass
class FolderPlatform(agent.Platform):
    """A node whose disk is a folder: 'mounted' is a flag, workloads are a callable."""

    mount_path: Path
    mounted: bool = True
    devices: dict[str, str] = field(default_factory=dict)
    probe: tuple[int, str] = (2, "")
    on_stop: Callable[[float], None] | None = None
    calls: list[str] = field(default_factory=list)
    phase_tags: list[str] = field(default_factory=list)
    workloads_running: bool = True
    instance_id: str = INSTANCE_ID

    def stop_workloads(self, timeout_s: float) -> None:
        self.calls.append("stop_workloads")
        if self.on_stop is not None:
            self.on_stop(timeout_s)
        self.workloads_running = False

    def start_workloads(self) -> None:
        self.calls.append("start_workloads")
        self.workloads_running = True

    def restart_workloads(self) -> None:
        self.calls.append("restart_workloads")

    def is_mounted(self, path: str) -> bool:
        return self.mounted and Path(path) == self.mount_path

    def mount(self, device: str, path: str) -> None:
        self.calls.append(f"mount {device}")
        self.mounted = True

    def unmount(self, path: str) -> None:
        self.calls.append("unmount")
        self.mounted = False

    def sync(self) -> None:
        self.calls.append("sync")

    def find_block_device(self, volume_id: str) -> str | None:
        return self.devices.get(volume_id)

    def probe_filesystem(self, device: str) -> tuple[int, str]:
        self.calls.append("probe")
        return self.probe

    def make_filesystem(self, device: str) -> None:
        self.calls.append(f"mkfs {device}")
        self.probe = (0, "TYPE=ext4\n")

    def instance_identity(self) -> dict[str, str]:
        return {"instance-id": self.instance_id, "region": "us-east-1"}

    def set_phase_tag(self, phase: str) -> None:
        self.phase_tags.append(phase)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


@pytest.fixture
def s3(aws: None):
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    return client


def make_settings(tmp_path: Path, **overrides: object) -> agent.Settings:
    values: dict[str, object] = {
        "stack": "spotforge",
        "region": "us-east-1",
        "bucket": BUCKET,
        "volume_id": VOLUME_ID,
        "mount": str(tmp_path / "mnt"),
        "state_dir": str(tmp_path / "state"),
        "imds_url": "http://127.0.0.1:9",
    }
    values.update(overrides)
    return agent.Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def platform(tmp_path: Path) -> FolderPlatform:
    mount = tmp_path / "mnt"
    mount.mkdir()
    return FolderPlatform(mount_path=mount)


@pytest.fixture
def ctx(tmp_path: Path, s3, platform: FolderPlatform, clock: FakeClock) -> agent.Context:
    return agent.Context(settings=make_settings(tmp_path), s3=s3, platform=platform, clock=clock)


# ---------------------------------------------------------------------------------------------
# Forgejo-like data
# ---------------------------------------------------------------------------------------------
GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "HOME": "/nonexistent",
}


def git(*args: str, cwd: Path | None = None) -> str:
    env = dict(os.environ, **GIT_ENV)
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def make_forgejo_db(path: Path, rows: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE user (id INTEGER PRIMARY KEY, name TEXT UNIQUE, email TEXT, created INTEGER)")
    conn.execute(
        "CREATE TABLE repository (id INTEGER PRIMARY KEY, owner_id INTEGER, name TEXT, size INTEGER)"
    )
    conn.execute(
        "CREATE TABLE action (id INTEGER PRIMARY KEY, user_id INTEGER, repo_id INTEGER, content TEXT)"
    )
    conn.execute("CREATE INDEX action_user ON action(user_id)")
    conn.executemany(
        "INSERT INTO user (name, email, created) VALUES (?, ?, ?)",
        [(f"user{i}", f"u{i}@example.com", i) for i in range(rows)],
    )
    conn.executemany(
        "INSERT INTO action (user_id, repo_id, content) VALUES (?, ?, ?)",
        [(i % 7, i % 3, f"commit {i} " * 4) for i in range(rows * 4)],
    )
    conn.commit()
    conn.close()


def make_repo(repositories: Path, owner: str, name: str, commits: int, packed: bool, work: Path) -> Path:
    bare = repositories / owner / (f"{name}.git")
    bare.parent.mkdir(parents=True, exist_ok=True)
    git("init", "--bare", "-q", "-b", "main", str(bare))
    clone = work / (f"{owner}-{name}")
    git("clone", "-q", str(bare), str(clone))
    for i in range(commits):
        (clone / (f"file{i % 3}.txt")).write_text(f"line {i} of {owner}/{name}\n" * (i + 1))
        git("add", "-A", cwd=clone)
        git("commit", "-q", "-m", f"commit {i}", cwd=clone)
    git("push", "-q", "origin", "HEAD:main", cwd=clone)
    git("tag", "v1", cwd=clone)
    git("push", "-q", "origin", "v1", cwd=clone)
    if packed:
        git("gc", "-q", "--aggressive", cwd=bare)
    return bare


def add_commit(bare: Path, work: Path, message: str) -> None:
    clone = work / (f"extra-{hashlib.sha1(str(bare).encode()).hexdigest()[:6]}")
    if not clone.exists():
        git("clone", "-q", str(bare), str(clone))
    (clone / "new.txt").write_text(message + "\n")
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", message, cwd=clone)
    git("push", "-q", "origin", "HEAD:main", cwd=clone)


@dataclass
class DataTree:
    mount: Path
    db: Path
    packed_repo: Path
    loose_repo: Path
    work: Path


def build_data_tree(mount: Path, work: Path) -> DataTree:
    forgejo = mount / "forgejo"
    db = forgejo / "gitea" / "gitea.db"
    make_forgejo_db(db)
    conf = forgejo / "gitea" / "conf"
    conf.mkdir(parents=True)
    (conf / "app.ini").write_text("[server]\nDOMAIN = git.example.com\n[security]\nINTERNAL_TOKEN = abc\n")
    ssh = forgejo / "ssh"
    ssh.mkdir()
    for key in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        (ssh / key).write_text(f"PRIVATE {key}\n")
        (ssh / key).chmod(0o600)
        (ssh / (key + ".pub")).write_text(f"PUBLIC {key}\n")
    traefik = mount / "traefik"
    traefik.mkdir()
    (traefik / "acme.json").write_text('{"letsencrypt": {"Account": {"Email": "me@example.com"}}}')
    (traefik / "acme.json").chmod(0o600)
    repositories = forgejo / "git" / "repositories"
    work.mkdir(parents=True, exist_ok=True)
    packed = make_repo(repositories, "alice", "packed", commits=6, packed=True, work=work)
    loose = make_repo(repositories, "bob", "loose", commits=4, packed=False, work=work)
    hooks = loose / "hooks" / "post-receive"
    hooks.write_text("#!/bin/sh\nexit 0\n")
    hooks.chmod(0o755)
    return DataTree(mount=mount, db=db, packed_repo=packed, loose_repo=loose, work=work)


@pytest.fixture(scope="session")
def _data_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Building the repositories takes ~40 git commands; build once, copy per test.
    root = tmp_path_factory.mktemp("data-template")
    (root / "mnt").mkdir()
    build_data_tree(root / "mnt", root / "work")
    return root / "mnt"


@pytest.fixture
def data_tree(platform: FolderPlatform, tmp_path: Path, _data_template: Path) -> DataTree:
    mount = platform.mount_path
    shutil.copytree(_data_template, mount, symlinks=True, dirs_exist_ok=True)
    repositories = mount / "forgejo" / "git" / "repositories"
    work = tmp_path / "work"
    work.mkdir()
    return DataTree(
        mount=mount,
        db=mount / "forgejo" / "gitea" / "gitea.db",
        packed_repo=repositories / "alice" / "packed.git",
        loose_repo=repositories / "bob" / "loose.git",
        work=work,
    )


def tree_snapshot(root: Path, skip_db: bool = True) -> dict[str, tuple[str, int, str]]:
    """Map of relative path -> (kind, mode, content digest) for a byte-for-byte tree comparison."""
    result: dict[str, tuple[str, int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".spotforge-") or rel == "lost+found":
            continue
        if skip_db and rel.startswith("forgejo/gitea/gitea.db"):
            continue
        info = path.lstat()
        if path.is_symlink():
            result[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            result[rel] = ("dir", info.st_mode & 0o7777, "")
        else:
            result[rel] = ("file", info.st_mode & 0o7777, hashlib.sha256(path.read_bytes()).hexdigest())
    return result


def db_rows(path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")
        ]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


def wipe_mount(mount: Path) -> None:
    for child in mount.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def s3_keys(s3, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


class Helpers:
    """Test helpers handed out as a fixture (test modules cannot import a conftest by name)."""

    BUCKET = BUCKET
    INSTANCE_ID = INSTANCE_ID
    VOLUME_ID = VOLUME_ID
    FIXTURES = FIXTURES
    FakeClock = FakeClock
    FolderPlatform = FolderPlatform
    make_settings = staticmethod(make_settings)
    git = staticmethod(git)
    make_forgejo_db = staticmethod(make_forgejo_db)
    make_repo = staticmethod(make_repo)
    add_commit = staticmethod(add_commit)
    build_data_tree = staticmethod(build_data_tree)
    tree_snapshot = staticmethod(tree_snapshot)
    db_rows = staticmethod(db_rows)
    wipe_mount = staticmethod(wipe_mount)
    s3_keys = staticmethod(s3_keys)


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
