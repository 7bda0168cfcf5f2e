"""The Forgejo stand-in: Forgejo's /api/healthz shape and status codes, from a real SQLite file."""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from drill.forgejo_standin import DEFAULT_APP_NAME, ForgejoStandin, StandinDown, read_row_ids
from spotforge_controller.observe import parse_healthz

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
FIXED = datetime(2026, 11, 20, 8, 0, 5, tzinfo=UTC)
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with NO_PROXY.open(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[ForgejoStandin]:
    server = ForgejoStandin(tmp_path / "forgejo", now=lambda: FIXED)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_healthy_stand_in_answers_200_with_forgejos_json_shape(standin: ForgejoStandin) -> None:
    status, headers, body = get(standin.url + "/api/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    doc = json.loads(body)
    assert doc["status"] == "pass"
    assert doc["description"] == DEFAULT_APP_NAME
    assert sorted(doc["checks"]) == ["cache:ping", "database:ping"]
    for results in doc["checks"].values():
        assert isinstance(results, list) and len(results) == 1
        assert results[0]["status"] == "pass"
        assert RFC3339_UTC.match(results[0]["time"])
        assert "output" not in results[0]
    assert doc["checks"]["database:ping"][0]["time"] == "2026-11-20T08:00:05Z"
    # Forgejo writes json.MarshalIndent with two spaces.
    assert body.decode().startswith('{\n  "status": "pass"')


def test_the_controller_reads_the_stand_ins_answer_as_pass(standin: ForgejoStandin) -> None:
    status, _, body = get(standin.url + "/api/healthz")
    assert parse_healthz(status, body) == ("pass", {"cache:ping": "pass", "database:ping": "pass"}, "")


def test_a_missing_database_file_fails_with_424_and_says_why(standin: ForgejoStandin) -> None:
    standin.db_path.unlink()
    status, headers, body = get(standin.url + "/api/healthz")
    doc = json.loads(body)
    assert status == 424
    assert headers["Content-Type"] == "application/json"
    assert doc["status"] == "fail"
    assert doc["checks"]["database:ping"][0]["status"] == "fail"
    assert doc["checks"]["database:ping"][0]["output"]
    assert doc["checks"]["cache:ping"][0]["status"] == "pass"
    assert parse_healthz(status, body)[0] == "fail"


def test_a_failing_cache_fails_the_whole_check_with_424(standin: ForgejoStandin) -> None:
    standin.fail_cache = True
    status, _, body = get(standin.url + "/api/healthz")
    assert status == 424
    assert json.loads(body)["checks"]["cache:ping"][0]["status"] == "fail"


def test_commits_are_acknowledged_in_order_and_listed(standin: ForgejoStandin) -> None:
    request = urllib.request.Request(standin.url + "/api/drill/commit", data=b"hello", method="POST")
    with NO_PROXY.open(request, timeout=5) as response:
        assert response.status == 201
        first = json.loads(response.read())["id"]
    second = standin.commit("world")
    assert second == first + 1
    status, _, body = get(standin.url + "/api/drill/rows")
    assert status == 200 and json.loads(body)["ids"] == [first, second]


def test_unknown_paths_answer_404(standin: ForgejoStandin) -> None:
    assert get(standin.url + "/api/v1/version")[0] == 404


def test_committed_rows_survive_a_graceful_restart(tmp_path: Path) -> None:
    server = ForgejoStandin(tmp_path / "forgejo")
    server.start()
    ids = [server.commit(f"row {i}") for i in range(5)]
    server.stop()
    assert not server.running
    server.start()
    try:
        assert server.row_ids() == ids
    finally:
        server.stop()


def test_a_crash_leaves_the_wal_behind_and_loses_no_committed_row(tmp_path: Path) -> None:
    server = ForgejoStandin(tmp_path / "forgejo")
    server.start()
    ids = [server.commit(f"row {i}") for i in range(20)]
    server.crash()
    wal = server.db_path.with_name("gitea.db-wal")
    assert wal.exists() and wal.stat().st_size > 0
    assert read_row_ids(tmp_path / "forgejo") == ids


def test_a_stopped_stand_in_refuses_connections_and_commits(tmp_path: Path) -> None:
    server = ForgejoStandin(tmp_path / "forgejo")
    port = server.start()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        NO_PROXY.open(f"http://127.0.0.1:{port}/api/healthz", timeout=2)
    with pytest.raises(StandinDown):
        server.commit("too late")


def test_the_first_start_creates_the_database_and_app_ini_like_forgejo(tmp_path: Path) -> None:
    server = ForgejoStandin(tmp_path / "forgejo")
    server.start()
    server.stop()
    assert (tmp_path / "forgejo" / "gitea" / "conf" / "app.ini").exists()
    with sqlite3.connect(tmp_path / "forgejo" / "gitea" / "gitea.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_it_only_listens_on_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        ForgejoStandin(tmp_path, host="0.0.0.0")
