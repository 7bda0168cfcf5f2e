#!/usr/bin/env python3
"""spotforge node agent: backups, restore, drain, interruption watch and data-volume mount.

Runs on Amazon Linux 2023's system Python (3.9) with the standard library and boto3 only; boto3 is
imported lazily so ``--help`` and the pure functions work without it.

Command line (``/opt/spotforge/bin/spotforge-agent <subcommand>``; settings from the environment,
see ``Settings.from_env``)::

    backup [--force]            snapshot DB + repositories + small files to S3 (skips when unchanged)
    drain --deadline SECONDS    stop workloads, final backup, sync, unmount (idempotent)
    restore [--at TIME]         rebuild the data tree from S3 onto a blank mount
    watch [--once]              poll IMDS for spot interruption / rebalance (every 5 s)
    status                      print JSON: phase, mounted, mount, last_backup, instance_id
    restart                     restart the Forgejo workload
    mount-data [--wait SECONDS] find the data volume, format only if blank, mount, restore if blank
    set-phase PHASE             record the node phase locally and on the spotforge:phase tag

Exit 0 on success; otherwise one line on stderr naming what failed and a non-zero code taken from
the error class (``AgentError.exit_code``).

Python API (used by the emulator's simulated node, which passes its own ``Platform``)::

    ctx = Context(settings=Settings.from_env(os.environ), s3=s3_client, platform=my_platform,
                  clock=SystemClock(), ec2=ec2_client, events=events_client)
    backup(ctx, deadline=None, force=False) -> BackupResult
    drain(ctx, deadline_s: float) -> DrainResult
    restore(ctx, at: Optional[datetime] = None) -> RestoreResult
    watch(ctx, imds: ImdsClient, max_polls: Optional[int] = None) -> WatchState
    status(ctx) -> dict
    restart(ctx) -> None
    mount_data(ctx, wait_s: float = 120.0) -> MountResult
    decide_format(blkid_exit_code: int, blkid_output: str) -> FormatDecision   (pure)
    list_backups(ctx) -> List[str]                                              (index keys)

Lower-level pieces the emulator and the benchmark use directly::

    snapshot_sqlite(source_path, target_path, method="auto") -> {"page_count", "page_size", "method"}
    upload_chunks(ctx, path, known=(), deadline=None) -> {"chunks", "size", "sha256", "chunks_uploaded", ...}
    db_fingerprint(db_path) -> dict;  mount_holds_data(mount) -> bool;  parse_time(text) -> datetime

Settings (``Settings.from_env``): the names of /etc/spotforge/node.env (``SPOTFORGE_STACK``,
``SPOTFORGE_REGION``, ``SPOTFORGE_BUCKET``, ``SPOTFORGE_VOLUME_ID`` required; ``SPOTFORGE_MOUNT``,
``SPOTFORGE_BACKUP_PREFIX``, ``SPOTFORGE_DOMAIN``, ``SPOTFORGE_BACKUP_INTERVAL_MINUTES`` optional)
plus agent-only optional ones: ``SPOTFORGE_IMDS_URL`` (default http://169.254.169.254; tests
point it at loopback), ``SPOTFORGE_STATE_DIR`` (default /var/lib/spotforge: phase, last backup,
lock), ``SPOTFORGE_SNAPSHOT_METHOD`` (auto|backup|vacuum), ``SPOTFORGE_COMPRESS_LEVEL`` (0-9,
default 1; gzip level of DB chunks).

Local state lives in ``$SPOTFORGE_STATE_DIR/state.json`` on the root volume; scratch files
(snapshot, restore) live in ``<mount>/.spotforge-*`` so a restore can rename into place on the
same filesystem; they are removed on success and failure and never count as data.

``Platform`` is the seam for everything that touches the host (stopping workloads, mounts,
devices, identity, phase tag); ``LinuxPlatform`` implements it with systemctl/kubectl/umount/k3s.
``Clock`` supplies wall time, monotonic time and sleep so tests never sleep for real.

S3 layout under ``s3://$SPOTFORGE_BUCKET/$SPOTFORGE_BACKUP_PREFIX``::

    chunks/<sha256>.gz    one CHUNK_BYTES piece of a DB snapshot, gzip; named by the sha256 of
                          its raw bytes, so unchanged pieces are stored once for all backups
    db/<stamp>.json       DB manifest: format "chunks-v1", chunks in file order ([sha256, raw
                          size]), size and sha256 of the whole file, page_count, page_size,
                          source_time, instance_id, method, chunks_uploaded, bytes_uploaded
    blobs/<sha256>        content-addressed file contents (git objects and packs, large files)
    index/<stamp>.json.gz per-backup index: every directory, file (mode, owner, sha256, small
                          mutable files inline) and the DB entry (the manifest plus the change
                          fingerprint); S3 alone rebuilds the tree
    heartbeat.json        every successful run: checked_at, index

``<stamp>`` is ``YYYYmmddTHHMMSS.ffffffZ`` (UTC), so keys sort in time order. A DB backup uploads
only the chunks its predecessor's manifest does not list; restore fetches them in parallel and
checks each chunk's sha256, the whole file's sha256 and ``PRAGMA integrity_check``. Chunks and
blobs are shared by many backups: the bucket's expiry rule must not delete one while the newest
index still refers to it (``refresh_newest`` rewrites those daily).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections import deque
from typing import Any, Callable, Collection, Deque, Dict, Iterator, List, Mapping, Optional, Tuple

LOG = logging.getLogger("spotforge-agent")

PHASES = ("booting", "standby", "serving", "draining", "drained")
DB_RELPATH = "forgejo/gitea/gitea.db"
# What a backup covers, relative to the mount. Repositories and LFS are the user's data; app.ini
# holds generated secrets; ssh/ keeps host keys stable across nodes; acme.json keeps the Let's
# Encrypt account and certificates (5 duplicate certificates a week). Attachments and avatars are
# uploads that exist nowhere else. Queues, indexers, sessions and logs are rebuilt by Forgejo.
BACKUP_SCOPE = (
    "forgejo/git/repositories",
    "forgejo/git/lfs",
    "forgejo/gitea/conf/app.ini",
    "forgejo/gitea/attachments",
    "forgejo/gitea/avatars",
    "forgejo/gitea/repo-avatars",
    "forgejo/ssh",
    "traefik/acme.json",
)
# Entries of a mount that do not count as data when deciding whether it is blank.
IGNORED_TOP_LEVEL = ("lost+found",)
WORK_DIR_PREFIX = ".spotforge-"
INLINE_MAX_BYTES = 64 * 1024
# DB snapshots are stored as fixed-size chunks named by their sha256. bench/snapshot_bench.py, 1 GB
# DB, 1680 commits between the timer's backup and a drain: 256 KiB chunks re-send 2.8 MB raw but
# need 4023 requests for a full backup or restore; 1 MiB re-send 7.5 MB with 1006 requests; 4 MiB
# 21.5 MB with 252. 1 MiB keeps both the drain's upload and the request count small.
CHUNK_BYTES = 1024 * 1024
EVENT_SOURCE = "spotforge.node"
EVENT_DETAIL_TYPE = "Spot Interruption Signal"
SELF_DRAIN_LEAD_S = 25.0
WATCH_INTERVAL_S = 5.0
# A stat fingerprint whose newest mtime is this close to "now" may hide a later write in the same
# timestamp tick (the "racy git" problem), so it is not trusted to skip a snapshot.
RACY_WINDOW_S = 2.0
_VOLUME_ID_RE = re.compile(r"^vol-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_IMMUTABLE_RE = re.compile(
    r"(?:^|/)objects/(?:[0-9a-f]{2}/[0-9a-f]{38,62}"
    r"|pack/pack-[0-9a-f]{40,64}\.(?:pack|idx|rev|bitmap|keep|promisor|mtimes))$"
)
_TEMP_RE = re.compile(r"(?:^|/)(?:tmp_|incoming-|\.tmp-)|\.lock$|(?:^|/)objects/pack/tmp_")


# ----------------------------------------------------------------------------------------------
# Errors: each class is one kind of failure with its own exit code.
# ----------------------------------------------------------------------------------------------
class AgentError(Exception):
    exit_code = 1


class ConfigError(AgentError):
    exit_code = 2


class DeviceError(AgentError):
    exit_code = 3


class StorageError(AgentError):
    """S3 refused or failed a request."""

    exit_code = 4


class DiskFullError(AgentError):
    exit_code = 5


class IntegrityError(AgentError):
    """A backup object does not match its recorded checksum, or the DB fails integrity_check."""

    exit_code = 6


class DeadlineExceeded(AgentError):
    exit_code = 7


class ImdsError(AgentError):
    exit_code = 8


class RefusedError(AgentError):
    """The operation would destroy or overwrite data, so it was not started."""

    exit_code = 9


class BusyError(AgentError):
    exit_code = 10


class WorkloadError(AgentError):
    exit_code = 11


# ----------------------------------------------------------------------------------------------
# Settings, clock, context
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    stack: str
    region: str
    bucket: str
    volume_id: str
    mount: str = "/srv/spotforge"
    backup_prefix: str = "backups/"
    domain: str = ""
    backup_interval_minutes: int = 5
    imds_url: str = "http://169.254.169.254"
    state_dir: str = "/var/lib/spotforge"
    # "auto": online backup API for WAL databases, VACUUM INTO otherwise (measured; see snapshot_sqlite)
    snapshot_method: str = "auto"
    compress_level: int = 1
    # The bucket's lifecycle expires objects this many days after they were last written.
    retention_days: int = 30

    _REQUIRED = (
        ("stack", "SPOTFORGE_STACK"),
        ("region", "SPOTFORGE_REGION"),
        ("bucket", "SPOTFORGE_BUCKET"),
        ("volume_id", "SPOTFORGE_VOLUME_ID"),
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        values: Dict[str, Any] = {}
        for field, name in cls._REQUIRED:
            value = env.get(name, "").strip()
            if not value:
                raise ConfigError("missing setting %s (expected in /etc/spotforge/node.env)" % name)
            values[field] = value
        optional = (
            ("mount", "SPOTFORGE_MOUNT", str),
            ("backup_prefix", "SPOTFORGE_BACKUP_PREFIX", str),
            ("domain", "SPOTFORGE_DOMAIN", str),
            ("backup_interval_minutes", "SPOTFORGE_BACKUP_INTERVAL_MINUTES", int),
            ("imds_url", "SPOTFORGE_IMDS_URL", str),
            ("state_dir", "SPOTFORGE_STATE_DIR", str),
            ("snapshot_method", "SPOTFORGE_SNAPSHOT_METHOD", str),
            ("compress_level", "SPOTFORGE_COMPRESS_LEVEL", int),
            ("retention_days", "SPOTFORGE_BACKUP_RETENTION_DAYS", int),
        )
        for field, name, kind in optional:
            raw = env.get(name)
            if raw is None or (raw.strip() == "" and field != "domain"):
                continue
            try:
                values[field] = kind(raw.strip())
            except ValueError:
                raise ConfigError("invalid setting %s=%r: expected %s" % (name, raw, kind.__name__)) from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not _VOLUME_ID_RE.match(self.volume_id):
            raise ConfigError("invalid setting SPOTFORGE_VOLUME_ID=%r: expected vol-<hex>" % self.volume_id)
        if self.snapshot_method not in ("auto", "backup", "vacuum"):
            raise ConfigError("invalid setting SPOTFORGE_SNAPSHOT_METHOD=%r" % self.snapshot_method)
        if not os.path.isabs(self.mount):
            raise ConfigError("invalid setting SPOTFORGE_MOUNT=%r: must be absolute" % self.mount)
        if self.backup_prefix and not self.backup_prefix.endswith("/"):
            raise ConfigError(
                "invalid setting SPOTFORGE_BACKUP_PREFIX=%r: must end with /" % self.backup_prefix
            )
        if not 0 <= self.compress_level <= 9:
            raise ConfigError("invalid setting SPOTFORGE_COMPRESS_LEVEL=%r" % self.compress_level)


class Clock:
    """Wall time (UTC), monotonic time and sleep; tests pass a fake that advances on sleep."""

    def now(self) -> _dt.datetime:
        raise NotImplementedError

    def monotonic(self) -> float:
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError


class SystemClock(Clock):
    def now(self) -> _dt.datetime:
        return _dt.datetime.now(_dt.timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class Platform:
    """Host operations. LinuxPlatform does them for real; tests and the emulator pass their own."""

    def stop_workloads(self, timeout_s: float) -> None:
        raise NotImplementedError

    def start_workloads(self) -> None:
        raise NotImplementedError

    def restart_workloads(self) -> None:
        raise NotImplementedError

    def is_mounted(self, path: str) -> bool:
        raise NotImplementedError

    def mount(self, device: str, path: str) -> None:
        raise NotImplementedError

    def unmount(self, path: str) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def find_block_device(self, volume_id: str) -> Optional[str]:
        raise NotImplementedError

    def probe_filesystem(self, device: str) -> Tuple[int, str]:
        """Return (exit code, output) of ``blkid -p -o export DEVICE``."""
        raise NotImplementedError

    def make_filesystem(self, device: str) -> None:
        raise NotImplementedError

    def instance_identity(self) -> Dict[str, str]:
        """At least ``instance-id`` and ``region``."""
        raise NotImplementedError

    def set_phase_tag(self, phase: str) -> None:
        raise NotImplementedError


@dataclasses.dataclass
class Context:
    settings: Settings
    s3: Any
    platform: Platform
    clock: Clock = dataclasses.field(default_factory=SystemClock)
    ec2: Any = None
    events: Any = None
    # How long backup/restore wait for another agent operation holding the lock.
    lock_timeout_s: float = 600.0

    @property
    def state(self) -> StateStore:
        return StateStore(self.settings.state_dir)

    def key(self, suffix: str) -> str:
        return self.settings.backup_prefix + suffix

    def instance_id(self) -> str:
        try:
            return self.platform.instance_identity().get("instance-id", "unknown")
        except AgentError:
            return "unknown"


# ----------------------------------------------------------------------------------------------
# Local state (root volume): phase, last backup, interruption bookkeeping
# ----------------------------------------------------------------------------------------------
class StateStore:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "state.json")

    def load(self) -> Dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except ValueError:
            # A torn write cannot happen (atomic rename); a hand-edited file is treated as empty.
            LOG.warning("ignoring unreadable state file %s", self.path)
            return {}

    def update(self, **changes: Any) -> Dict[str, Any]:
        data = self.load()
        data.update(changes)
        os.makedirs(self.directory, exist_ok=True)
        tmp = "%s.%s.tmp" % (self.path, os.getpid())
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        return data


@contextlib.contextmanager
def agent_lock(ctx: Context, timeout_s: float, what: str) -> Iterator[None]:
    """Serialise backup, drain and restore: the timer's backup may overlap a drain from SSM."""
    os.makedirs(ctx.settings.state_dir, exist_ok=True)
    with open(os.path.join(ctx.settings.state_dir, "agent.lock"), "a+") as handle:
        start = ctx.clock.monotonic()
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if ctx.clock.monotonic() - start >= timeout_s:
                    raise BusyError("%s: another agent operation holds the lock" % what) from None
                ctx.clock.sleep(0.2)
        yield


def _utc_stamp(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _parse_stamp(stamp: str) -> _dt.datetime:
    return _dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=_dt.timezone.utc)


def parse_time(text: str) -> _dt.datetime:
    """ISO-8601 (``Z`` allowed) or a backup stamp; naive times are UTC."""
    value = text.strip()
    try:
        return _parse_stamp(value)
    except ValueError:
        pass
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        moment = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError("invalid time %r: expected ISO-8601 such as 2026-12-04T15:00:00Z" % text) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.astimezone(_dt.timezone.utc)


def _iso(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_deadline(ctx: Context, deadline: Optional[float], step: str) -> None:
    if deadline is not None and ctx.clock.monotonic() > deadline:
        raise DeadlineExceeded("deadline passed during %s" % step)


# ----------------------------------------------------------------------------------------------
# S3 helpers: turn botocore errors into StorageError without importing botocore up front
# ----------------------------------------------------------------------------------------------
def _s3_code(exc: BaseException) -> Optional[str]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    return None


def _s3(ctx: Context, operation: str, key: str, **kwargs: Any) -> Any:
    method = getattr(ctx.s3, operation)
    try:
        return (
            method(Bucket=ctx.settings.bucket, Key=key, **kwargs)
            if key
            else method(Bucket=ctx.settings.bucket, **kwargs)
        )
    except AgentError:
        raise
    except Exception as exc:
        code = _s3_code(exc)
        target = "s3://%s/%s" % (ctx.settings.bucket, key)
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            raise StorageError("S3 access denied: %s %s" % (operation, target)) from exc
        if code in ("NoSuchKey", "404", "NotFound"):
            raise IntegrityError("backup object missing: %s" % target) from exc
        raise StorageError("S3 %s %s failed: %s" % (operation, target, code or exc)) from exc


def _list_modified(ctx: Context, prefix: str) -> Dict[str, _dt.datetime]:
    """Key -> LastModified under a prefix (all pages)."""
    found: Dict[str, _dt.datetime] = {}
    token: Optional[str] = None
    while True:
        extra: Dict[str, Any] = {"Prefix": ctx.key(prefix)}
        if token:
            extra["ContinuationToken"] = token
        page = _s3(ctx, "list_objects_v2", "", **extra)
        for item in page.get("Contents", []):
            found[item["Key"]] = item["LastModified"]
        if not page.get("IsTruncated"):
            return found
        token = page.get("NextContinuationToken")


def _get_bytes(ctx: Context, key: str) -> bytes:
    return _s3(ctx, "get_object", key)["Body"].read()


def list_backups(ctx: Context) -> List[str]:
    """Index keys, oldest first."""
    return sorted(k for k in _list_modified(ctx, "index/") if k.endswith(".json.gz"))


def _index_stamp(key: str) -> str:
    return key.rsplit("/", 1)[-1][: -len(".json.gz")]


def _load_index(ctx: Context, key: str) -> Dict[str, Any]:
    raw = _get_bytes(ctx, key)
    try:
        index = json.loads(gzip.decompress(raw).decode("utf-8"))
    except (OSError, ValueError, EOFError) as exc:
        raise IntegrityError("corrupt backup index %s: %s" % (key, exc)) from None
    if not isinstance(index, dict) or index.get("version") != 1:
        raise IntegrityError("corrupt backup index %s: unknown format" % key)
    return index


def latest_index(ctx: Context, at: Optional[_dt.datetime] = None) -> Optional[Tuple[str, Dict[str, Any]]]:
    keys = list_backups(ctx)
    if at is not None:
        keys = [k for k in keys if _parse_stamp(_index_stamp(k)) <= at]
    if not keys:
        return None
    return keys[-1], _load_index(ctx, keys[-1])


# ----------------------------------------------------------------------------------------------
# SQLite snapshot
# ----------------------------------------------------------------------------------------------
def db_fingerprint(db_path: str) -> Dict[str, Any]:
    """Cheap change detector for the DB file and its WAL.

    ``PRAGMA data_version`` only reports changes seen by one long-lived connection, and each backup
    runs in a new process. The header's file change counter (offset 24) is bumped by every commit
    in rollback-journal mode but not in WAL mode, where commits only append frames to ``-wal``.
    The DB file itself is never opened here: closing any descriptor of a SQLite file drops every
    POSIX lock the process holds on it, which would break a SQLite connection living in the same
    process (the emulator's Forgejo stand-in, the tests' writer threads). So the DB contributes
    size, inode and mtime_ns (every rollback-mode commit and every checkpoint writes it), and the
    WAL (which SQLite never locks) its size, mtime_ns and 32-byte header, whose salts change at
    every WAL reset. Commits that overwrite frames of a reset WAL keep its size, so only mtime
    catches them; mtime has coarse ticks, so the caller trusts an unchanged fingerprint only when
    it was taken well after the last write (``RACY_WINDOW_S``); otherwise it snapshots and
    compares the content hash, which is exact.
    """
    result: Dict[str, Any] = {}
    try:
        info = os.stat(db_path)
        result["file"] = [info.st_size, info.st_ino, info.st_mtime_ns]
    except FileNotFoundError:
        result["file"] = None
    try:
        info = os.stat(db_path + "-wal")
        with open(db_path + "-wal", "rb") as handle:
            header = handle.read(32)
    except FileNotFoundError:
        info, header = None, b""
    # An empty WAL holds no commits; a read-only connection can leave one behind.
    result["file-wal"] = (
        [info.st_size, info.st_ino, info.st_mtime_ns, header.hex()] if info and info.st_size else None
    )
    return result


def _fingerprint_newest_mtime(fingerprint: Mapping[str, Any]) -> float:
    times = [entry[2] for entry in fingerprint.values() if entry]
    return max(times) / 1e9 if times else 0.0


def _open_snapshot_target(path: str) -> sqlite3.Connection:
    # Separate function so tests can constrain the target (e.g. max_page_count to force SQLITE_FULL).
    return sqlite3.connect(path)


def snapshot_sqlite(source_path: str, target_path: str, method: str = "auto") -> Dict[str, Any]:
    """Write a transactionally consistent copy of a live SQLite DB to ``target_path``.

    Both methods copy inside one read transaction, so the snapshot holds every transaction that
    committed before it began and none half-done. ``backup`` is the online backup API in one
    step: a stepped backup restarts from page 1 whenever another connection commits between
    steps, so under a steady writer it may never finish. In WAL mode (Forgejo's default) a reader
    does not block writers, so one step costs them nothing. ``vacuum`` is ``VACUUM INTO``.
    Measured (bench/snapshot_bench.py, 1 GB WAL DB, shared 2-core box): backup API in one step
    1.7 s idle and under writes, VACUUM INTO 4.1-5.3 s, ``sqlite3 .backup`` 5.1 s idle and no
    finish within 60 s under a 200-commit/s writer (it restarts). Rollback journal, 8 MB: stepped
    backup restarted again and again (45 s with a tight writer), VACUUM INTO 0.04 s. So ``auto``
    picks the backup API for WAL databases and VACUUM INTO otherwise. An explicit ``backup`` on a
    rollback-journal DB copies in 1024-page steps (writers get in between) and falls back to one
    step after three restarts.
    """
    # Stale -wal/-shm files next to a new target would be read as part of it ("disk I/O error").
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(target_path + suffix):
            os.unlink(target_path + suffix)
    # A plain connection, as the sqlite3 CLI opens: ``mode=ro`` connections cannot run WAL
    # recovery and failed with "disk I/O error" under a concurrent writer in the benchmark, and
    # query_only forbids VACUUM INTO. This connection only ever reads.
    source = sqlite3.connect(source_path, timeout=30)
    try:
        journal = source.execute("PRAGMA journal_mode").fetchone()[0].lower()
        if method == "auto":
            method = "backup" if journal == "wal" else "vacuum"
        if method == "vacuum":
            source.execute("VACUUM INTO ?", (target_path,))
        else:
            target = _open_snapshot_target(target_path)
            try:
                if journal == "wal":
                    # One step into a scratch file (deleted on any failure): no target journal and
                    # no fsync per write; the finished file is hashed afterwards.
                    # (A stepped copy into an unjournalled target broke with SQLITE_NOTADB.)
                    target.execute("PRAGMA journal_mode=OFF")
                    target.execute("PRAGMA synchronous=OFF")
                    source.backup(target, pages=-1)
                else:
                    restarts = [0, 1 << 62]

                    def progress(status: int, remaining: int, total: int) -> None:
                        # remaining grows back when the copy restarts after a concurrent commit
                        if remaining > restarts[1]:
                            restarts[0] += 1
                            if restarts[0] >= 3:
                                raise _RestartLimit()
                        restarts[1] = remaining

                    try:
                        source.backup(target, pages=1024, progress=progress, sleep=0.01)
                    except _RestartLimit:
                        source.backup(target, pages=-1)
            finally:
                target.close()
        # immutable: read the finished file as it is, creating no -wal/-shm beside it
        check = sqlite3.connect("file:%s?immutable=1" % target_path, uri=True)
        try:
            page_count = check.execute("PRAGMA page_count").fetchone()[0]
            page_size = check.execute("PRAGMA page_size").fetchone()[0]
        finally:
            check.close()
    except sqlite3.Error as exc:
        text = str(exc).lower()
        if "disk is full" in text or ("disk i/o" in text and _free_bytes(target_path) == 0):
            raise DiskFullError("snapshot: no space left for %s" % target_path) from None
        name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+ only; 3.9 prints the text alone
        raise AgentError("snapshot of %s failed: %s %s" % (source_path, exc, name)) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError("snapshot: no space left for %s" % target_path) from None
        raise
    finally:
        source.close()
    return {"page_count": int(page_count), "page_size": int(page_size), "method": method}


class _RestartLimit(Exception):
    pass


def _free_bytes(path: str) -> int:
    try:
        info = os.statvfs(os.path.dirname(path) or ".")
        return info.f_bavail * info.f_frsize
    except OSError:
        return -1


def _hash_file(path: str) -> Tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def gzip_member(data: bytes, level: int) -> bytes:
    """One complete gzip member (header mtime 0, so equal input gives equal bytes).

    zlib's compress object releases the GIL while deflating, so members compress in parallel.
    """
    squeezer = zlib.compressobj(level, zlib.DEFLATED, 31)
    return squeezer.compress(data) + squeezer.flush()


def _chunk_key(ctx: Context, digest: str) -> str:
    return ctx.key("chunks/%s.gz" % digest)


def upload_chunks(
    ctx: Context,
    path: str,
    known: Collection[str] = (),
    deadline: Optional[float] = None,
    workers: int = 4,
) -> Dict[str, Any]:
    """Split ``path`` into ``CHUNK_BYTES`` pieces and upload each piece S3 does not hold yet.

    Each chunk is named by the sha256 of its raw bytes and stored gzip-compressed as
    ``chunks/<sha256>.gz``; ``known`` are digests the previous backup already lists, so they are
    not sent again. SQLite keeps every page at a fixed offset, so a few row updates change only
    the chunks holding the touched pages. The file is read and hashed in order on this thread
    (hashlib releases the GIL on large buffers) while worker threads compress (zlib releases it
    too) and upload; the in-flight window bounds memory to about ``2 * workers`` chunks. A
    chunk object is only ever written whole, so a failure or deadline leaves at most some
    complete, unreferenced chunks that the bucket's expiry rule removes.

    Returns ``chunks`` ([digest, raw size] in file order), ``size``, ``sha256`` of the whole file,
    ``chunk_bytes``, ``chunks_uploaded``, ``bytes_uploaded`` (compressed) and
    ``raw_bytes_uploaded``.
    """
    level = ctx.settings.compress_level
    chunk_bytes = CHUNK_BYTES
    skip = set(known)
    whole = hashlib.sha256()
    chunks: List[List[Any]] = []
    totals = {"size": 0, "uploaded": 0, "compressed": 0, "raw": 0}
    in_flight: Deque[concurrent.futures.Future] = deque()

    def send(digest: str, data: bytes) -> int:
        body = gzip_member(data, level)
        _s3(ctx, "put_object", _chunk_key(ctx, digest), Body=body, ContentType="application/gzip")
        return len(body)

    def settle(future: concurrent.futures.Future) -> None:
        totals["compressed"] += future.result()
        totals["uploaded"] += 1

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        with open(path, "rb") as handle:
            for data in iter(lambda: handle.read(chunk_bytes), b""):
                whole.update(data)
                digest = hashlib.sha256(data).hexdigest()
                chunks.append([digest, len(data)])
                totals["size"] += len(data)
                if digest in skip:
                    continue
                skip.add(digest)  # a digest repeated inside the file (empty pages) goes once
                totals["raw"] += len(data)
                while len(in_flight) >= 2 * workers:
                    settle(in_flight.popleft())
                _check_deadline(ctx, deadline, "DB upload")
                in_flight.append(pool.submit(send, digest, data))
        while in_flight:
            settle(in_flight.popleft())
        _check_deadline(ctx, deadline, "DB upload")
    except BaseException:
        for future in in_flight:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
    return {
        "chunks": chunks,
        "chunk_bytes": chunk_bytes,
        "size": totals["size"],
        "sha256": whole.hexdigest(),
        "chunks_uploaded": totals["uploaded"],
        "bytes_uploaded": totals["compressed"],
        "raw_bytes_uploaded": totals["raw"],
    }


# ----------------------------------------------------------------------------------------------
# Backup
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BackupResult:
    skipped: bool
    index_key: Optional[str]
    db_uploaded: bool
    blobs_uploaded: int
    bytes_uploaded: int
    reason: str = ""
    # DB chunks sent by this backup (the rest were already listed by the previous one).
    db_chunks_uploaded: int = 0


def _work_dir(ctx: Context, kind: str) -> str:
    path = os.path.join(ctx.settings.mount, "%s%s-%s" % (WORK_DIR_PREFIX, kind, uuid.uuid4().hex[:8]))
    os.makedirs(path, mode=0o700)
    return path


def _backup_db(
    ctx: Context, prev_db: Optional[Dict[str, Any]], stamp: str, deadline: Optional[float]
) -> Tuple[Optional[Dict[str, Any]], bool]:
    db_path = os.path.join(ctx.settings.mount, DB_RELPATH)
    if not os.path.exists(db_path):
        return None, False
    taken = ctx.clock.now()
    fingerprint = db_fingerprint(db_path)
    trusted = _fingerprint_newest_mtime(fingerprint) <= time.time() - RACY_WINDOW_S
    if prev_db and prev_db.get("fingerprint") == fingerprint and prev_db.get("fingerprint_trusted"):
        return prev_db, False
    # Only chunks the previous backup lists count as present: its refresh keeps them from
    # expiring, while an older chunk may already be gone.
    known = {c[0] for c in (prev_db or {}).get("chunks", [])}
    work = _work_dir(ctx, "snapshot")
    try:
        snap_path = os.path.join(work, "gitea.db")
        _check_deadline(ctx, deadline, "DB snapshot")
        info = snapshot_sqlite(db_path, snap_path, ctx.settings.snapshot_method)
        _check_deadline(ctx, deadline, "DB snapshot")
        sums = upload_chunks(ctx, snap_path, known, deadline)
        if prev_db and prev_db.get("sha256") == sums["sha256"] and not sums["chunks_uploaded"]:
            same = dict(prev_db)
            same.update(fingerprint=fingerprint, fingerprint_trusted=trusted)
            return same, False
        key = ctx.key("db/%s.json" % stamp)
        manifest = {
            "format": "chunks-v1",
            "key": key,
            "chunks": sums["chunks"],
            "chunk_bytes": sums["chunk_bytes"],
            "size": sums["size"],
            "sha256": sums["sha256"],
            "page_count": info["page_count"],
            "page_size": info["page_size"],
            "source_time": _iso(taken),
            "instance_id": ctx.instance_id(),
            "method": info["method"],
            "chunks_uploaded": sums["chunks_uploaded"],
            "bytes_uploaded": sums["bytes_uploaded"],
        }
        _check_deadline(ctx, deadline, "DB manifest")
        _s3(
            ctx,
            "put_object",
            key,
            Body=json.dumps(manifest, sort_keys=True).encode(),
            ContentType="application/json",
        )
        entry = dict(manifest, fingerprint=fingerprint, fingerprint_trusted=trusted)
        return entry, True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _scope_walk(mount: str, immutable: bool) -> Iterator[Tuple[str, os.stat_result]]:
    """Yield (relative path, lstat) for the backup scope; directories included, temp files not."""
    for scope in BACKUP_SCOPE:
        top = os.path.join(mount, scope)
        if not os.path.lexists(top):
            continue
        if not os.path.isdir(top) or os.path.islink(top):
            if not immutable:
                yield scope, os.lstat(top)
            continue
        for root, dirs, files in os.walk(top):
            dirs.sort()
            rel_root = os.path.relpath(root, mount)
            if not immutable:
                yield rel_root, os.lstat(root)
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                rel = rel_root + "/" + name
                if _TEMP_RE.search(rel):
                    continue
                is_immutable = bool(_IMMUTABLE_RE.search(rel)) or rel.startswith("forgejo/git/lfs/")
                if is_immutable != immutable:
                    continue
                try:
                    yield rel, os.lstat(os.path.join(root, name))
                except FileNotFoundError:
                    continue  # removed while walking (gc, push); the next backup sees the new state


def _backup_tree(
    ctx: Context, prev: Optional[Dict[str, Any]], deadline: Optional[float]
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], int, int]:
    mount = ctx.settings.mount
    prev_files = {f["path"]: f for f in (prev or {}).get("files", [])}
    known = {f["sha256"] for f in prev_files.values() if "data" not in f}
    dirs: List[Dict[str, Any]] = []
    files: List[Dict[str, Any]] = []
    to_upload: Dict[str, str] = {}
    payloads: Dict[str, bytes] = {}

    def add_file(rel: str, info: os.stat_result, content: Optional[bytes], immutable: bool) -> None:
        entry: Dict[str, Any] = {
            "path": rel,
            "mode": stat.S_IMODE(info.st_mode),
            "uid": info.st_uid,
            "gid": info.st_gid,
        }
        if stat.S_ISLNK(info.st_mode):
            entry["link"] = os.readlink(os.path.join(mount, rel))
            files.append(entry)
            return
        if not stat.S_ISREG(info.st_mode):
            return
        previous = prev_files.get(rel)
        if immutable and previous and previous.get("size") == info.st_size and "data" not in previous:
            # Immutable by name (git object id, pack checksum, LFS oid): same path, same bytes.
            digest, size = previous["sha256"], info.st_size
        else:
            if content is None:
                try:
                    digest, size = _hash_file(os.path.join(mount, rel))
                except FileNotFoundError:
                    return
            else:
                digest, size = hashlib.sha256(content).hexdigest(), len(content)
        entry.update(size=size, sha256=digest)
        if content is not None and size <= INLINE_MAX_BYTES:
            entry["data"] = base64.b64encode(content).decode("ascii")
        elif digest not in known:
            to_upload[digest] = rel
            if content is not None:
                payloads[digest] = content
        files.append(entry)

    # Mutable files (refs, packed-refs, HEAD, config) are read before the objects are listed: git
    # writes objects before it moves a ref, so every captured ref points at objects the later
    # object pass finds (a repack adds the new pack before deleting loose objects).
    for rel, info in _scope_walk(mount, immutable=False):
        if stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode):
            dirs.append(
                {"path": rel, "mode": stat.S_IMODE(info.st_mode), "uid": info.st_uid, "gid": info.st_gid}
            )
            continue
        content: Optional[bytes] = None
        if stat.S_ISREG(info.st_mode):
            try:
                # Read whole, once: a mutable file may change again before the upload below.
                with open(os.path.join(mount, rel), "rb") as handle:
                    content = handle.read()
            except FileNotFoundError:
                continue
        add_file(rel, info, content, False)
    _check_deadline(ctx, deadline, "repository backup")
    for rel, info in _scope_walk(mount, immutable=True):
        add_file(rel, info, None, True)

    uploaded_bytes = 0

    def upload(digest: str, rel: str) -> int:
        data = payloads.get(digest)
        if data is None:
            with open(os.path.join(mount, rel), "rb") as handle:
                data = handle.read()
        if hashlib.sha256(data).hexdigest() != digest:
            # Immutable files do not change; one that did is damaged or not what its name says.
            raise AgentError("file changed during backup: %s" % rel)
        _s3(ctx, "put_object", ctx.key("blobs/" + digest), Body=data)
        return len(data)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(upload, d, r) for d, r in to_upload.items()]
        for future in futures:
            _check_deadline(ctx, deadline, "repository upload")
            uploaded_bytes += future.result()
    return dirs, files, len(to_upload), uploaded_bytes


def _comparable(index: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in index.items() if k not in ("created", "instance_id")}


def backup(ctx: Context, deadline: Optional[float] = None, force: bool = False) -> BackupResult:
    """Back up DB, repositories and small files; ``deadline`` is a ``ctx.clock.monotonic()`` value."""
    wait = ctx.lock_timeout_s if deadline is None else max(0.0, deadline - ctx.clock.monotonic())
    with agent_lock(ctx, wait, "backup"):
        return _backup_locked(ctx, deadline, force)


def _backup_locked(ctx: Context, deadline: Optional[float], force: bool) -> BackupResult:
    state = ctx.state
    if state.load().get("phase") == "drained" and not ctx.platform.is_mounted(ctx.settings.mount):
        return BackupResult(True, None, False, 0, 0, "node is drained; nothing to back up")
    if not ctx.platform.is_mounted(ctx.settings.mount):
        raise DeviceError("backup: data volume is not mounted at %s" % ctx.settings.mount)
    if not os.path.isdir(os.path.join(ctx.settings.mount, "forgejo")):
        raise AgentError("backup: no forgejo/ directory under %s" % ctx.settings.mount)
    now = ctx.clock.now()
    stamp = _utc_stamp(now)
    previous = latest_index(ctx)
    prev_index = previous[1] if previous else None
    db_entry, db_uploaded = _backup_db(ctx, (prev_index or {}).get("db"), stamp, deadline)
    dirs, files, blob_count, blob_bytes = _backup_tree(ctx, prev_index, deadline)
    index = {
        "version": 1,
        "created": _iso(now),
        "instance_id": ctx.instance_id(),
        "db": db_entry,
        "dirs": dirs,
        "files": files,
    }
    db_chunks = int(db_entry.get("chunks_uploaded", 0)) if db_uploaded and db_entry else 0
    uploaded = blob_bytes + (int(db_entry.get("bytes_uploaded", 0)) if db_uploaded and db_entry else 0)
    if (
        prev_index is not None
        and previous is not None
        and not force
        and _comparable(prev_index) == _comparable(index)
    ):
        _after_backup(ctx, previous[0], prev_index, now, deadline)
        state.update(last_backup_check=_iso(now))
        return BackupResult(True, previous[0], False, 0, 0, "nothing changed")
    _check_deadline(ctx, deadline, "backup index")
    key = ctx.key("index/%s.json.gz" % stamp)
    body = gzip.compress(json.dumps(index, sort_keys=True).encode("utf-8"), 6, mtime=0)
    _s3(ctx, "put_object", key, Body=body, ContentType="application/gzip")
    summary = {
        "key": key,
        "time": _iso(now),
        "db_key": db_entry["key"] if db_entry else None,
        "files": len(files),
        "bytes_uploaded": uploaded,
    }
    _after_backup(ctx, key, index, now, deadline)
    state.update(last_backup=summary, last_backup_check=_iso(now))
    LOG.info(
        "backup %s: db %s (%d new chunks), %d new blobs",
        key,
        "uploaded" if db_uploaded else "unchanged",
        db_chunks,
        blob_count,
    )
    return BackupResult(False, key, db_uploaded, blob_count, uploaded, db_chunks_uploaded=db_chunks)


HEARTBEAT_KEY = "heartbeat.json"
REFRESH_EVERY = _dt.timedelta(days=1)


def _after_backup(
    ctx: Context, index_key: str, index: Mapping[str, Any], now: _dt.datetime, deadline: Optional[float]
) -> None:
    """Every successful run, changed or not: keep the newest backup alive and say it is current."""
    last_refresh = ctx.state.load().get("blobs_refreshed_at")
    due = last_refresh is None or now - parse_time(last_refresh) >= REFRESH_EVERY
    # Never on a drain's clock (deadline set): listing every blob is the timer's job.
    if due and deadline is None:
        refreshed = refresh_newest(ctx, index_key, index, now)
        ctx.state.update(blobs_refreshed_at=_iso(now))
        if refreshed:
            LOG.info("refreshed %d objects of %s ahead of the lifecycle expiry", refreshed, index_key)
    # The controller's BackupAgeSeconds reads this: a quiet forge has nothing new to upload, yet its
    # newest backup is current, so the age is measured from the last successful check.
    heartbeat = {"checked_at": _iso(now), "index": index_key, "instance_id": ctx.instance_id()}
    _s3(
        ctx,
        "put_object",
        ctx.key(HEARTBEAT_KEY),
        Body=json.dumps(heartbeat, sort_keys=True).encode("utf-8"),
        ContentType="application/json",
    )


def refresh_newest(ctx: Context, index_key: str, index: Mapping[str, Any], now: _dt.datetime) -> int:
    """Rewrite (copy onto itself) every object the newest backup needs that is older than half the
    retention, so the bucket's expiry rule never removes a blob, DB chunk, DB manifest or index
    that the newest backup still refers to. Objects no backup refers to any more are left to expire: that is the
    garbage collection. Returns how many objects were refreshed."""
    needed = {index_key}
    db = index.get("db") or {}
    if db.get("key"):
        needed.add(db["key"])
    for digest, _size in db.get("chunks", []):
        needed.add(_chunk_key(ctx, digest))
    for entry in index.get("files", []):
        if "sha256" in entry and "data" not in entry and "link" not in entry:
            needed.add(ctx.key("blobs/" + entry["sha256"]))
    modified: Dict[str, _dt.datetime] = {}
    for prefix in ("index/", "db/", "chunks/", "blobs/"):
        modified.update(_list_modified(ctx, prefix))
    cutoff = now - _dt.timedelta(days=max(1, ctx.settings.retention_days // 2))
    stale = sorted(key for key in needed if key in modified and modified[key] < cutoff)
    for key in stale:
        _s3(
            ctx,
            "copy_object",
            key,
            CopySource={"Bucket": ctx.settings.bucket, "Key": key},
            MetadataDirective="REPLACE",
            Metadata={"spotforge-refreshed": _iso(now)},
        )
    return len(stale)


# ----------------------------------------------------------------------------------------------
# Restore
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RestoreResult:
    index_key: str
    files: int
    db_restored: bool


def mount_holds_data(mount: str) -> bool:
    try:
        names = os.listdir(mount)
    except FileNotFoundError:
        return False
    return any(n not in IGNORED_TOP_LEVEL and not n.startswith(WORK_DIR_PREFIX) for n in names)


def _safe_join(root: str, rel: str) -> str:
    # Index paths come from S3: refuse anything that would land outside the restore directory.
    if rel.startswith("/") or ".." in rel.split("/"):
        raise IntegrityError("corrupt backup index: unsafe path %r" % rel)
    return os.path.join(root, rel)


def _chown(path: str, entry: Mapping[str, Any]) -> None:
    if os.geteuid() == 0 and "uid" in entry:
        os.lchown(path, entry["uid"], entry["gid"])


def _restore_db(ctx: Context, entry: Dict[str, Any], target: str, workers: int = 8) -> None:
    """Rebuild the DB file at ``target`` from its chunks and verify it.

    Chunks download in parallel and are written at their offsets; each is checked against its
    sha256, then the whole file against the manifest's, then SQLite's integrity_check. The caller
    owns ``target`` (a scratch directory) and removes it on any failure.
    """
    chunks = entry.get("chunks")
    if entry.get("format") != "chunks-v1" or not isinstance(chunks, list):
        raise IntegrityError("corrupt backup index: unknown DB backup format in %s" % entry.get("key"))
    offsets: Dict[str, List[int]] = {}
    sizes: Dict[str, int] = {}
    position = 0
    for digest, size in chunks:
        offsets.setdefault(digest, []).append(position)
        sizes[digest] = size
        position += size
    if position != entry.get("size"):
        raise IntegrityError("corrupt backup %s: chunk sizes do not add up to the file size" % entry["key"])

    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:

        def fetch(digest: str) -> None:
            key = _chunk_key(ctx, digest)
            body = _get_bytes(ctx, key)
            try:
                data = gzip.decompress(body)
            except (OSError, EOFError, zlib.error) as exc:
                raise IntegrityError("corrupt backup: %s does not decompress: %s" % (key, exc)) from None
            if len(data) != sizes[digest] or hashlib.sha256(data).hexdigest() != digest:
                raise IntegrityError("corrupt backup: %s does not match its sha256" % key)
            for offset in offsets[digest]:
                written = 0
                while written < len(data):
                    written += os.pwrite(fd, data[written:], offset + written)

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fetch, digest) for digest in offsets]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        os.fsync(fd)
    finally:
        os.close(fd)
    whole, size = _hash_file(target)
    if size != entry["size"] or whole != entry["sha256"]:
        raise IntegrityError("corrupt backup %s: sha256 of the database does not match" % entry["key"])
    conn = sqlite3.connect(target)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.Error as exc:
        raise IntegrityError("restored database failed integrity_check: %s" % exc) from None
    finally:
        conn.close()
    if result != [("ok",)]:
        raise IntegrityError("restored database failed integrity_check: %s" % result[:3])


def restore(ctx: Context, at: Optional[_dt.datetime] = None) -> RestoreResult:
    """Rebuild the data tree from the newest backup at or before ``at`` onto a blank mount.

    Everything lands in a temporary directory on the same filesystem and is verified (sha256 of
    every object, integrity_check of the DB) before being renamed into place; on any failure the
    temporary directory is removed and the mount is left as it was.
    """
    mount = ctx.settings.mount
    with agent_lock(ctx, ctx.lock_timeout_s, "restore"):
        if not ctx.platform.is_mounted(mount):
            raise DeviceError("restore: data volume is not mounted at %s" % mount)
        if mount_holds_data(mount):
            raise RefusedError("restore: %s already holds data; refusing to overwrite it" % mount)
        found = latest_index(ctx, at)
        if found is None:
            when = " at or before %s" % _iso(at) if at else ""
            raise AgentError(
                "restore: no backup found in s3://%s/%s%s" % (ctx.settings.bucket, ctx.key("index/"), when)
            )
        key, index = found
        work = _work_dir(ctx, "restore")
        try:
            for entry in sorted(index.get("dirs", []), key=lambda d: d["path"].count("/")):
                path = _safe_join(work, entry["path"])
                os.makedirs(path, exist_ok=True)
            blobs: Dict[str, List[Dict[str, Any]]] = {}
            for entry in index.get("files", []):
                path = _safe_join(work, entry["path"])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                if "link" in entry:
                    os.symlink(entry["link"], path)
                    _chown(path, entry)
                elif "data" in entry:
                    data = base64.b64decode(entry["data"])
                    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                        raise IntegrityError(
                            "corrupt backup index %s: inline %s checksum" % (key, entry["path"])
                        )
                    _write_file(path, data, entry)
                else:
                    blobs.setdefault(entry["sha256"], []).append(entry)

            def fetch(digest: str) -> None:
                blob_key = ctx.key("blobs/" + digest)
                data = _get_bytes(ctx, blob_key)
                if hashlib.sha256(data).hexdigest() != digest:
                    raise IntegrityError("corrupt backup: %s does not match its sha256" % blob_key)
                for entry in blobs[digest]:
                    _write_file(_safe_join(work, entry["path"]), data, entry)

            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                for future in [pool.submit(fetch, d) for d in blobs]:
                    future.result()
            db_entry = index.get("db")
            if db_entry:
                db_target = _safe_join(work, DB_RELPATH)
                os.makedirs(os.path.dirname(db_target), exist_ok=True)
                _restore_db(ctx, db_entry, db_target)
                owner = next((d for d in index.get("dirs", []) if d["path"] == "forgejo/gitea"), None)
                if owner:
                    _chown(db_target, owner)
                os.chmod(db_target, 0o644)
            # Directory modes last: a read-only directory would have refused the files above.
            for entry in sorted(index.get("dirs", []), key=lambda d: -d["path"].count("/")):
                path = _safe_join(work, entry["path"])
                os.chmod(path, entry["mode"])
                _chown(path, entry)
            for parent in _parents_missing_in_index(index):
                _chown(os.path.join(work, parent), _owner_of_child(index, parent))
            _fsync_tree(work)
            if mount_holds_data(mount):
                raise RefusedError("restore: %s gained data during the restore; leaving it untouched" % mount)
            # forgejo/ goes last: its presence is what marks the mount as holding data.
            tops = sorted(os.listdir(work), key=lambda n: n == "forgejo")
            for name in tops:
                os.rename(os.path.join(work, name), os.path.join(mount, name))
            ctx.platform.sync()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError("restore: no space left on %s" % mount) from None
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files = len(index.get("files", []))
        LOG.info("restored %s (%d files)", key, files)
        return RestoreResult(key, files, bool(index.get("db")))


def _parents_missing_in_index(index: Mapping[str, Any]) -> List[str]:
    # Scope entries such as traefik/acme.json have parents that are not themselves in the scope.
    listed = {d["path"] for d in index.get("dirs", [])}
    parents = set()
    for entry in list(index.get("files", [])) + list(index.get("dirs", [])):
        parts = entry["path"].split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in listed:
                parents.add(parent)
    return sorted(parents)


def _owner_of_child(index: Mapping[str, Any], parent: str) -> Dict[str, Any]:
    for entry in list(index.get("dirs", [])) + list(index.get("files", [])):
        if entry["path"].startswith(parent + "/"):
            return entry
    return {}


def _write_file(path: str, data: bytes, entry: Mapping[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, entry["mode"])
    _chown(path, entry)


def _fsync_tree(root: str) -> None:
    for current, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(current, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------------------------
# Drain
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DrainResult:
    already_drained: bool
    backup: Optional[BackupResult]
    seconds: float


def drain(ctx: Context, deadline_s: float) -> DrainResult:
    """Stop workloads, take the final backup, sync, unmount. Idempotent.

    When the deadline passes, the remaining safety steps (sync, unmount) still run so the volume
    can move without loss: the data then lives on the volume even if the final upload did not end.
    """
    start = ctx.clock.monotonic()
    deadline = start + deadline_s
    state = ctx.state
    mount = ctx.settings.mount
    with agent_lock(ctx, deadline_s, "drain"):
        if state.load().get("phase") == "drained" and not ctx.platform.is_mounted(mount):
            return DrainResult(True, None, 0.0)
        state.update(phase="draining")
        if not ctx.platform.is_mounted(mount):
            # Nothing is on a volume that is not mounted; workloads cannot be using it.
            ctx.platform.stop_workloads(max(1.0, deadline - ctx.clock.monotonic()))
            state.update(phase="drained", drained_at=_iso(ctx.clock.now()))
            return DrainResult(False, None, ctx.clock.monotonic() - start)
        failure: Optional[AgentError] = None
        result: Optional[BackupResult] = None
        try:
            ctx.platform.stop_workloads(max(0.0, deadline - ctx.clock.monotonic()))
            _check_deadline(ctx, deadline, "stopping workloads")
            result = _backup_locked(ctx, deadline, False)
        except AgentError as exc:
            failure = exc
        # Always leave the volume safe to detach, even past the deadline.
        ctx.platform.sync()
        ctx.platform.unmount(mount)
        elapsed = ctx.clock.monotonic() - start
        if failure is not None:
            state.update(phase="draining", drain_error=str(failure))
            if isinstance(failure, DeadlineExceeded):
                raise DeadlineExceeded(
                    "drain: %s (%.1fs of %.0fs); volume unmounted, data safe on the volume but the "
                    "final backup is incomplete" % (failure, elapsed, deadline_s)
                )
            raise type(failure)("drain: %s; volume unmounted, final backup incomplete" % failure)
        if elapsed > deadline_s:
            state.update(phase="drained", drained_at=_iso(ctx.clock.now()))
            raise DeadlineExceeded("drain: finished after the %.0fs deadline (%.1fs)" % (deadline_s, elapsed))
        state.update(phase="drained", drained_at=_iso(ctx.clock.now()), drain_error=None)
        return DrainResult(False, result, elapsed)


# ----------------------------------------------------------------------------------------------
# IMDSv2 and watch
# ----------------------------------------------------------------------------------------------
class ImdsClient:
    """Minimal IMDSv2 client: a session token from ``PUT /latest/api/token``, then GETs with it."""

    TOKEN_TTL_S = 21600

    def __init__(self, base_url: str, clock: Clock, timeout_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.timeout_s = timeout_s
        self._token: Optional[str] = None
        self._token_expires = 0.0

    def _open(self, request: urllib.request.Request) -> Tuple[int, bytes]:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, b""
        except (urllib.error.URLError, OSError) as exc:
            # socket.timeout is an OSError; URLError wraps connection refusals and timeouts.
            raise ImdsError("IMDS %s %s: %s" % (request.get_method(), request.full_url, exc)) from None

    def _fetch_token(self) -> str:
        request = urllib.request.Request(
            self.base_url + "/latest/api/token",
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)},
        )
        code, body = self._open(request)
        if code != 200 or not body:
            raise ImdsError("IMDS token request returned HTTP %s" % code)
        self._token = body.decode("ascii").strip()
        # Renew well before expiry so a poll never races the token's end.
        self._token_expires = self.clock.monotonic() + self.TOKEN_TTL_S - 60
        return self._token

    def get(self, path: str) -> Optional[str]:
        """Body of ``/latest/<path>``, or None on 404 (IMDS's way of saying "no such notice")."""
        for attempt in range(2):
            token = self._token
            if token is None or self.clock.monotonic() >= self._token_expires:
                token = self._fetch_token()
            request = urllib.request.Request(
                self.base_url + "/latest/" + path.lstrip("/"), headers={"X-aws-ec2-metadata-token": token}
            )
            code, body = self._open(request)
            if code == 200:
                return body.decode("utf-8")
            if code == 404:
                return None
            if code == 401 and attempt == 0:
                self._token = None  # expired or revoked: fetch a new one once
                continue
            raise ImdsError("IMDS GET %s returned HTTP %s" % (path, code))
        raise ImdsError("IMDS GET %s: token rejected" % path)

    def get_json(self, path: str) -> Optional[Dict[str, Any]]:
        body = self.get(path)
        if body is None:
            return None
        try:
            value = json.loads(body)
        except ValueError:
            raise ImdsError("IMDS %s returned invalid JSON" % path) from None
        if not isinstance(value, dict):
            raise ImdsError("IMDS %s returned %s, expected an object" % (path, type(value).__name__))
        return value


@dataclasses.dataclass
class WatchState:
    polls: int = 0
    imds_errors: int = 0
    interruption: Optional[Dict[str, Any]] = None
    signaled: bool = False
    self_drained: bool = False
    rebalance_backups: int = 0
    last_error: str = ""


def _tag_if_absent(ctx: Context, instance_id: str, key: str, value: str) -> bool:
    found = ctx.ec2.describe_tags(
        Filters=[{"Name": "resource-id", "Values": [instance_id]}, {"Name": "key", "Values": [key]}]
    ).get("Tags", [])
    if found:
        return False
    ctx.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": key, "Value": value}])
    return True


SPOT_WARNING_LEAD = _dt.timedelta(seconds=120)


def warning_time(action_time: str, seen_at: _dt.datetime) -> _dt.datetime:
    """When AWS issued the warning: two minutes before the action time IMDS shows (never later than
    the moment the agent saw it; a missing or odd action time means "now")."""
    try:
        issued = parse_time(action_time) - SPOT_WARNING_LEAD
    except (ConfigError, ValueError):
        return seen_at
    return min(issued, seen_at)


def signal_interruption(ctx: Context, notice: Mapping[str, Any]) -> None:
    """Tag ``spotforge:interruption`` (first writer wins) and put the node's EventBridge event."""
    instance_id = ctx.platform.instance_identity()["instance-id"]
    action_time = str(notice.get("time", ""))
    warned = warning_time(action_time, ctx.clock.now())
    # The controller's handoff deadline counts from the warning, not from the action two minutes on.
    _tag_if_absent(ctx, instance_id, "spotforge:interruption", _iso(warned))
    # The event copies IMDS as it is (time = the action time); the controller derives the warning.
    detail = {"instance-id": instance_id, "instance-action": notice.get("action", ""), "time": action_time}
    response = ctx.events.put_events(
        Entries=[{"Source": EVENT_SOURCE, "DetailType": EVENT_DETAIL_TYPE, "Detail": json.dumps(detail)}]
    )
    if response.get("FailedEntryCount"):
        codes = [e.get("ErrorCode") for e in response.get("Entries", []) if e.get("ErrorCode")]
        raise AgentError("interruption event rejected by EventBridge: %s" % ",".join(map(str, codes)))


def watch(
    ctx: Context, imds: ImdsClient, max_polls: Optional[int] = None, interval_s: float = WATCH_INTERVAL_S
) -> WatchState:
    """Poll IMDS for a spot instance-action and rebalance recommendation until ``max_polls``.

    Everything is idempotent and remembered in the state file, so a restarted watcher neither
    signals twice nor repeats a rebalance backup for the same notice.
    """
    result = WatchState()
    state = ctx.state
    while max_polls is None or result.polls < max_polls:
        result.polls += 1
        try:
            _watch_once(ctx, imds, state, result)
        except ImdsError as exc:
            result.imds_errors += 1
            result.last_error = str(exc)
            LOG.warning("watch: %s (will retry)", exc)
        except AgentError as exc:
            result.last_error = str(exc)
            LOG.error("watch: %s", exc)
        except Exception as exc:  # the watcher must outlive AWS hiccups; log and keep polling
            result.last_error = str(exc)
            LOG.error("watch: unexpected %s: %s", type(exc).__name__, exc)
        if max_polls is not None and result.polls >= max_polls:
            break
        ctx.clock.sleep(interval_s)
    return result


def _watch_once(ctx: Context, imds: ImdsClient, state: StateStore, result: WatchState) -> None:
    notice = imds.get_json("meta-data/spot/instance-action")
    if notice is not None:
        result.interruption = dict(notice)
        saved = state.load()
        key = "%s@%s" % (notice.get("action"), notice.get("time"))
        if saved.get("interruption_signaled") != key:
            signal_interruption(ctx, notice)
            state.update(interruption_signaled=key, interruption=dict(notice))
        result.signaled = True
        action_at = parse_time(str(notice.get("time")))
        remaining = (action_at - ctx.clock.now()).total_seconds()
        phase = state.load().get("phase")
        if remaining <= SELF_DRAIN_LEAD_S and phase != "drained":
            # Keep a few seconds for sync/unmount and for the controller to detach after us.
            budget = max(5.0, remaining - 5.0)
            LOG.warning("watch: no drain %.0fs before the interruption; draining now", remaining)
            drain(ctx, budget)
            with contextlib.suppress(Exception):
                ctx.platform.set_phase_tag("drained")
            result.self_drained = True
    rebalance = imds.get_json("meta-data/events/recommendations/rebalance")
    if rebalance is not None:
        seen = str(rebalance.get("noticeTime", ""))
        saved = state.load()
        if saved.get("rebalance_seen") != seen and saved.get("phase") not in ("draining", "drained"):
            # Marked before the attempt: a failing backup is not retried every 5 s; the timer's
            # next run covers it.
            state.update(rebalance_seen=seen)
            backup(ctx)
            result.rebalance_backups += 1


# ----------------------------------------------------------------------------------------------
# mount-data: format decision, mount, restore
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FormatDecision:
    format: bool
    reason: str


def decide_format(blkid_exit_code: int, blkid_output: str) -> FormatDecision:
    """Whether a device may be formatted, from ``blkid -p -o export DEVICE``.

    blkid(8): exit 0 = something was identified (filesystem, RAID member, partition table...),
    2 = nothing identified, 4 = usage or other error, 8 = ambivalent low-level probe. Only a clean
    "nothing found" with no output at all means blank; everything else keeps the volume's bytes.
    """
    if blkid_exit_code == 2 and not blkid_output.strip():
        return FormatDecision(True, "blkid -p found no filesystem or partition table")
    if blkid_exit_code == 0:
        found = dict(line.split("=", 1) for line in blkid_output.splitlines() if "=" in line)
        kind = found.get("TYPE") or found.get("PTTYPE") or "unknown signature"
        return FormatDecision(False, "device already holds %s" % kind)
    if blkid_exit_code == 8:
        return FormatDecision(False, "blkid -p found ambivalent signatures; refusing to format")
    return FormatDecision(False, "blkid -p failed (exit %d); refusing to format" % blkid_exit_code)


@dataclasses.dataclass(frozen=True)
class MountResult:
    device: str
    formatted: bool
    restored: Optional[str]
    already_mounted: bool


def wait_for_device(ctx: Context, volume_id: str, wait_s: float) -> str:
    if not _VOLUME_ID_RE.match(volume_id):
        raise DeviceError("invalid volume id %r: expected vol-<hex>" % volume_id)
    start = ctx.clock.monotonic()
    while True:
        device = ctx.platform.find_block_device(volume_id)
        if device:
            return device
        if ctx.clock.monotonic() - start >= wait_s:
            raise DeviceError("volume %s not attached: no block device after %.0fs" % (volume_id, wait_s))
        ctx.clock.sleep(1.0)


def mount_data(ctx: Context, wait_s: float = 120.0) -> MountResult:
    """Find the data volume, format it only when blank, mount it, restore from S3 if it is empty.

    Safe to run again after any failure: an already mounted but still empty volume (say S3 failed
    during the first run) is restored on the next run.
    """
    settings = ctx.settings
    device = wait_for_device(ctx, settings.volume_id, wait_s)
    already = ctx.platform.is_mounted(settings.mount)
    formatted = False
    if not already:
        code, output = ctx.platform.probe_filesystem(device)
        decision = decide_format(code, output)
        if decision.format:
            LOG.warning("formatting %s (%s): %s", device, settings.volume_id, decision.reason)
            ctx.platform.make_filesystem(device)
            formatted = True
            # Probe again: only mount what now carries a filesystem.
            code, output = ctx.platform.probe_filesystem(device)
            if code != 0:
                raise DeviceError("mkfs on %s did not produce a filesystem (blkid exit %d)" % (device, code))
        elif code != 0:
            raise DeviceError("cannot use %s: %s" % (device, decision.reason))
        os.makedirs(settings.mount, exist_ok=True)
        ctx.platform.mount(device, settings.mount)
    restored: Optional[str] = None
    if not mount_holds_data(settings.mount) and list_backups(ctx):
        restored = restore(ctx).index_key
    if ctx.state.load().get("phase") in ("draining", "drained"):
        # Mounted again after a drain (an aborted handoff): the node is no longer drained.
        ctx.state.update(phase="standby")
    return MountResult(device, formatted, restored, already)


# ----------------------------------------------------------------------------------------------
# status, restart, phase
# ----------------------------------------------------------------------------------------------
def status(ctx: Context) -> Dict[str, Any]:
    saved = ctx.state.load()
    mounted = ctx.platform.is_mounted(ctx.settings.mount)
    phase = saved.get("phase") or "booting"
    if phase == "drained" and mounted:
        phase = "serving"  # remounted after a drain (e.g. an aborted handoff)
    try:
        instance_id: Optional[str] = ctx.platform.instance_identity().get("instance-id")
    except AgentError:
        instance_id = None
    return {
        "phase": phase,
        "mounted": mounted,
        "mount": ctx.settings.mount,
        "last_backup": saved.get("last_backup"),
        "instance_id": instance_id,
    }


def restart(ctx: Context) -> None:
    ctx.platform.restart_workloads()


def set_phase(ctx: Context, phase: str) -> None:
    if phase not in PHASES:
        raise ConfigError("unknown phase %r: expected one of %s" % (phase, ", ".join(PHASES)))
    ctx.state.update(phase=phase)
    ctx.platform.set_phase_tag(phase)


# ----------------------------------------------------------------------------------------------
# LinuxPlatform: the real host
# ----------------------------------------------------------------------------------------------
class LinuxPlatform(Platform):
    """AL2023 + k3s. Workloads are Forgejo (namespace forgejo) and Traefik (kube-system)."""

    KUBECTL = ("/usr/local/bin/k3s", "kubectl")
    # (namespace, deployment, pod label selector): Forgejo from userdata/manifests, Traefik from k3s.
    WORKLOADS = (
        ("forgejo", "deployment/forgejo", "app.kubernetes.io/name=forgejo"),
        ("kube-system", "deployment/traefik", "app.kubernetes.io/name=traefik"),
    )
    BY_ID = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_%s"

    def __init__(self, imds: ImdsClient, ec2: Any = None, run: Optional[Callable[..., Any]] = None) -> None:
        self.imds = imds
        self.ec2 = ec2
        self._run = run or subprocess.run
        self._identity: Optional[Dict[str, str]] = None

    def _cmd(
        self, argv: List[str], timeout_s: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        try:
            done = self._run(argv, capture_output=True, text=True, timeout=max(1.0, timeout_s))
        except FileNotFoundError:
            raise WorkloadError("%s: command not found" % argv[0]) from None
        except subprocess.TimeoutExpired:
            raise DeadlineExceeded("%s timed out after %.0fs" % (" ".join(argv), timeout_s)) from None
        if check and done.returncode != 0:
            message = (done.stderr or done.stdout or "").strip().splitlines()
            raise WorkloadError(
                "%s failed: %s" % (" ".join(argv), message[-1] if message else done.returncode)
            )
        return done

    def stop_workloads(self, timeout_s: float) -> None:
        start = time.monotonic()
        try:
            for namespace, name, _selector in self.WORKLOADS:
                self._cmd([*self.KUBECTL, "-n", namespace, "scale", name, "--replicas=0"], 15)
            for namespace, _name, selector in self.WORKLOADS:
                left = timeout_s * 0.7 - (time.monotonic() - start)
                wait = "--timeout=%ds" % max(1, int(left))
                argv = [*self.KUBECTL, "-n", namespace, "wait", "--for=delete", "pod", "-l", selector, wait]
                self._cmd(argv, left + 5)
        except AgentError as exc:
            # Graceful stop failed or is too slow: kill every container (SQLite survives SIGKILL).
            LOG.warning("graceful stop failed (%s); running k3s-killall.sh", exc)
            self._cmd(["/usr/local/bin/k3s-killall.sh"], max(5.0, timeout_s - (time.monotonic() - start)))

    def start_workloads(self) -> None:
        for namespace, name, _selector in self.WORKLOADS:
            self._cmd([*self.KUBECTL, "-n", namespace, "scale", name, "--replicas=1"])

    def restart_workloads(self) -> None:
        self._cmd([*self.KUBECTL, "-n", "forgejo", "rollout", "restart", "deployment/forgejo"])

    def is_mounted(self, path: str) -> bool:
        return os.path.ismount(path)

    def mount(self, device: str, path: str) -> None:
        self._cmd(["mount", "-o", "noatime", device, path])

    def unmount(self, path: str) -> None:
        if not os.path.ismount(path):
            return
        self._cmd(["umount", path])

    def sync(self) -> None:
        os.sync()

    def find_block_device(self, volume_id: str) -> Optional[str]:
        link = self.BY_ID % volume_id.replace("-", "")
        return os.path.realpath(link) if os.path.exists(link) else None

    def probe_filesystem(self, device: str) -> Tuple[int, str]:
        done = self._cmd(["blkid", "-p", "-o", "export", device], check=False)
        return done.returncode, done.stdout

    def make_filesystem(self, device: str) -> None:
        self._cmd(["mkfs.ext4", "-q", "-L", "spotforge-data", device], 300)

    def instance_identity(self) -> Dict[str, str]:
        if self._identity is None:
            instance_id = self.imds.get("meta-data/instance-id")
            region = self.imds.get("meta-data/placement/region")
            if not instance_id:
                raise ImdsError("IMDS has no instance-id")
            self._identity = {"instance-id": instance_id, "region": region or ""}
        return self._identity

    def set_phase_tag(self, phase: str) -> None:
        instance_id = self.instance_identity()["instance-id"]
        if self.ec2 is None:
            raise ConfigError("no EC2 client to set the phase tag")
        self.ec2.create_tags(Resources=[instance_id], Tags=[{"Key": "spotforge:phase", "Value": phase}])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line on stderr, as the controller's SSM output and systemd journal expect.
        sys.stderr.write("spotforge-agent: %s\n" % message)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spotforge-agent", description="spotforge node agent (see module docstring)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("backup", help="back up DB, repositories and small files to S3")
    p.add_argument("--force", action="store_true", help="write a new index even when nothing changed")
    p = sub.add_parser("drain", help="stop workloads, final backup, sync, unmount")
    p.add_argument("--deadline", type=float, required=True, metavar="SECONDS")
    p = sub.add_parser("restore", help="rebuild the data tree from S3 onto a blank mount")
    p.add_argument("--at", metavar="TIME", help="newest backup at or before this ISO-8601 time")
    p = sub.add_parser("watch", help="poll IMDS for spot interruption and rebalance notices")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    sub.add_parser("status", help="print node status as JSON")
    sub.add_parser("restart", help="restart the Forgejo workload")
    p = sub.add_parser("mount-data", help="find, format if blank, mount and restore the data volume")
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS")
    p = sub.add_parser("set-phase", help="record the node phase (and its spotforge:phase tag)")
    p.add_argument("phase", choices=PHASES)
    return parser


def make_context(env: Mapping[str, str]) -> Tuple[Context, ImdsClient]:
    settings = Settings.from_env(env)
    try:
        import boto3  # deferred: --help and the pure functions must work without boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError("boto3 is not installed (dnf install python3-boto3)") from None
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    session = boto3.session.Session(region_name=settings.region)
    clock = SystemClock()
    imds = ImdsClient(settings.imds_url, clock)
    ec2 = session.client("ec2", config=config)
    platform = LinuxPlatform(imds, ec2)
    ctx = Context(
        settings=settings,
        s3=session.client("s3", config=config),
        platform=platform,
        clock=clock,
        ec2=ec2,
        events=session.client("events", config=config),
    )
    return ctx, imds


def run_command(args: argparse.Namespace, ctx: Context, imds: ImdsClient) -> int:
    command = args.command
    if command == "backup":
        result = backup(ctx, force=args.force)
        print(json.dumps(dataclasses.asdict(result), sort_keys=True))
    elif command == "drain":
        if args.deadline <= 0:
            raise ConfigError("--deadline must be positive")
        result_d = drain(ctx, args.deadline)
        print(
            json.dumps({"already_drained": result_d.already_drained, "seconds": round(result_d.seconds, 2)})
        )
    elif command == "restore":
        at = parse_time(args.at) if args.at else None
        result_r = restore(ctx, at)
        print(json.dumps(dataclasses.asdict(result_r), sort_keys=True))
    elif command == "watch":
        watch(ctx, imds, max_polls=1 if args.once else None)
    elif command == "status":
        print(json.dumps(status(ctx), sort_keys=True))
    elif command == "restart":
        restart(ctx)
    elif command == "mount-data":
        result_m = mount_data(ctx, args.wait)
        print(json.dumps(dataclasses.asdict(result_m), sort_keys=True))
    elif command == "set-phase":
        set_phase(ctx, args.phase)
    return 0


def main(argv: Optional[List[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        # Quiet by default so a failure is the one line on stderr the controller reads over SSM;
        # the long-running watcher logs its progress to the journal.
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "watch" else logging.WARNING,
        format="%(asctime)s spotforge-agent %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    # boto3/urllib3 chatter would bury the one line that matters.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        ctx, imds = make_context(os.environ if env is None else env)
        return run_command(args, ctx, imds)
    except AgentError as exc:
        sys.stderr.write("spotforge-agent: %s: %s\n" % (args.command, str(exc).splitlines()[0]))
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("spotforge-agent: %s: interrupted\n" % args.command)
        return 130
    except Exception as exc:
        if args.verbose:
            LOG.exception("unexpected failure")
        sys.stderr.write(
            "spotforge-agent: %s: unexpected %s: %s\n"
            % (args.command, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
