"""Scheduled health check: the core probes and acts on the streak; this publishes the gauges.

Gauges: Healthy (0/1, from this run's probe), CertificateDaysLeft (when a domain is set) and
BackupAgeSeconds (time since the node agent last confirmed a current backup: its heartbeat, written
on every successful run, changed or not; before the first heartbeat, the newest backup index).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from ..events import Scheduled, parse_event
from ..observe import certificate_days_left, probe_health, read_address, read_health, read_nodes
from ..reconcile import Trigger, reconcile
from ..runtime import Runtime
from . import common

NAME = "health"
BUDGET_SECONDS = 40.0
# docs/design.md: SPOTFORGE_BACKUP_PREFIX is `backups/`; the agent writes one index per backup
# that changed something, and the heartbeat on every successful run.
BACKUP_INDEX_PREFIX = "backups/index/"
HEARTBEAT_KEY = "backups/heartbeat.json"
# Keys are `<stamp>.json.gz` with a sortable UTC stamp, so listing from a recent stamp is enough.
RECENT_WINDOW = timedelta(days=2)
_STAMP = "%Y%m%dT%H%M%S.%fZ"


def handler(event: object, context: object = None, *, runtime: Runtime | None = None) -> dict[str, Any]:
    common.start(event)
    parsed = parse_event(event)
    if not isinstance(parsed, Scheduled):
        reason = parsed.reason if parsed.kind == "ignored" else f"not a scheduled event ({parsed.kind})"
        return common.finish(NAME, "ignored", reason=reason)
    rt = common.resolve_runtime(runtime)
    started = rt.clock.now()
    result = reconcile(
        rt, Trigger("health", None, parsed.trigger_detail()), until=common.until(rt, context, BUDGET_SECONDS)
    )

    healthy, status, probed_cert_days = current_health(rt, started)
    cert_days = probed_cert_days
    if cert_days is None and rt.config.domain:
        cert_days = certificate_days_left(rt, rt.config.domain)
    newest = newest_backup(rt.s3, rt.config.backup_bucket, rt.clock.now())
    backup_age = (rt.clock.now() - newest[1]).total_seconds() if newest else None

    gauges: list[tuple[str, float]] = [("Healthy", 1.0 if healthy else 0.0)]
    if cert_days is not None:
        gauges.append(("CertificateDaysLeft", float(cert_days)))
    if backup_age is not None:
        gauges.append(("BackupAgeSeconds", round(max(0.0, backup_age), 1)))
    published = common.publish(rt, result.happenings, gauges)
    return common.finish(
        NAME,
        "checked",
        status=status,
        newest_backup=newest[0] if newest else None,
        **common.summarize(result),
        **common.published_fields(published),
    )


def current_health(runtime: Runtime, started: datetime) -> tuple[bool, str, float | None]:
    """(healthy, status, certificate days) as of this run.

    The core records its probe in the `health` item; when it did not probe in this run (another
    controller held the lease, or a recovery is open) probe here so the gauge is never stale.
    """
    record = read_health(runtime)
    if record.last_at is not None and record.last_at >= started - timedelta(seconds=1) and record.last_status:
        return record.last_status in ("pass", "warn"), record.last_status, None
    address = read_address(runtime)
    serving = next(
        (n for n in read_nodes(runtime) if n.instance_id == address.instance_id and n.state == "running"),
        None,
    )
    if serving is None:
        return False, "no serving node", None
    probe = probe_health(runtime, address, serving.instance_id)
    return probe.ok, probe.status, probe.cert_days_left


def newest_backup(s3: Any, bucket: str, now: datetime) -> tuple[str, datetime] | None:
    """The newest backup index key and when it was last confirmed current, or None when there is
    none (or S3 refuses). A quiet forge writes no new index, so the heartbeat is what tells a
    current backup from stopped backups."""
    try:
        heartbeat = _heartbeat(s3, bucket)
        if heartbeat is not None:
            return heartbeat
        recent = BACKUP_INDEX_PREFIX + (now - RECENT_WINDOW).strftime(_STAMP)
        found = _newest_key(s3, bucket, recent) or _newest_key(s3, bucket, None)
    except ClientError as exc:
        common.logger.warning("cannot list backups", extra={"bucket": bucket, "error": str(exc)})
        return None
    if found is None:
        return None
    key, modified = found
    return key, _stamp_time(key) or modified


def _heartbeat(s3: Any, bucket: str) -> tuple[str, datetime] | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=HEARTBEAT_KEY)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        doc = json.loads(body)
        checked = datetime.fromisoformat(str(doc["checked_at"]).replace("Z", "+00:00"))
        return str(doc["index"]), checked
    except (ValueError, KeyError, TypeError):
        common.logger.warning("unreadable backup heartbeat", extra={"bucket": bucket})
        return None


def _newest_key(s3: Any, bucket: str, start_after: str | None) -> tuple[str, datetime] | None:
    best: tuple[str, datetime] | None = None
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": BACKUP_INDEX_PREFIX}
    if start_after:
        kwargs["StartAfter"] = start_after
    while True:
        page = s3.list_objects_v2(**kwargs)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key.endswith(".json.gz") and (best is None or key > best[0]):
                best = (key, obj["LastModified"])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return best
        kwargs = {"Bucket": bucket, "Prefix": BACKUP_INDEX_PREFIX, "ContinuationToken": token}


def _stamp_time(key: str) -> datetime | None:
    stamp = key.rsplit("/", 1)[-1].removesuffix(".json.gz")
    try:
        return datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return None
