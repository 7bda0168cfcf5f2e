"""A stand-in for Forgejo: a real HTTP server on 127.0.0.1 backed by a real SQLite file.

It answers `GET /api/healthz` the way Forgejo's `routers/web/healthcheck/check.go` does (research
notes, section 1): `{"status", "description", "checks": {"cache:ping": [...], "database:ping":
[...]}}` indented by two spaces, each check `{"status", "time"}` with an RFC 3339 UTC time (plus
`output` when it failed), HTTP 200 for pass/warn and 424 (Failed Dependency) otherwise,
`Content-Type: application/json` and `Cache-Control: no-store`. `database:ping` passes when the
database file exists and `SELECT 1` answers, as Forgejo's SQLite check does.

For the drill it also commits "transactions": `POST /api/drill/commit` (or `commit()`) inserts
one row in one transaction and answers only after COMMIT, so an acknowledged row is a committed
row; `GET /api/drill/rows` lists them. The drill counts rows to measure RPO.

The server never reads the drill's virtual clock from its own threads unless given a `now`
callable; the drill passes one that is safe to call while the requester waits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DB_RELPATH = Path("gitea") / "gitea.db"
APP_INI_RELPATH = Path("gitea") / "conf" / "app.ini"
# Forgejo's default APP_NAME, which /api/healthz reports as its description.
DEFAULT_APP_NAME = "Forgejo: Beyond coding. We forge."
_MAX_BODY = 64 * 1024
# A killed process never closes its database: the connections of crashed stand-ins are kept here
# so garbage collection cannot close them (closing would checkpoint the WAL, which a crash does not).
_CRASHED: list[sqlite3.Connection] = []


class StandinError(Exception):
    """Base class of the stand-in's own errors."""


class StandinDown(StandinError):
    """The stand-in is not serving (never started, stopped or crashed)."""


class StandinStateError(StandinError):
    """start/stop called in a state where it makes no sense (e.g. starting twice)."""


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ForgejoStandin:
    """Forgejo's `/data` is `data_dir` (`forgejo/` on the data volume); port 0 picks a free port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        now: Callable[[], datetime] | None = None,
        app_name: str = DEFAULT_APP_NAME,
        host: str = "127.0.0.1",
    ) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the stand-in only listens on loopback, not {host!r}")
        self.data_dir = Path(data_dir)
        self.app_name = app_name
        self.host = host
        self._now = now or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Test switch: make the cache check fail (Forgejo's cache:ping), to see a 424 with a live DB.
        self.fail_cache = False

    # ------------------------------------------------------------------ life cycle
    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_RELPATH

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise StandinDown("the stand-in is not serving")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> int:
        """Open (or, on a blank tree, create) the database as Forgejo's first start does, then
        serve. Returns the port."""
        if self._server is not None:
            raise StandinStateError("the stand-in is already serving")
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        app_ini = self.data_dir / APP_INI_RELPATH
        if not app_ini.exists():
            app_ini.parent.mkdir(parents=True, exist_ok=True)
            app_ini.write_text("[database]\nDB_TYPE = sqlite3\nPATH = /data/gitea/gitea.db\n")
        conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        # Forgejo 15 defaults to WAL; FULL makes every COMMIT durable before it is acknowledged.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS drill_rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL, "
            "committed_at TEXT NOT NULL)"
        )
        self._conn = conn
        server = ThreadingHTTPServer((self.host, 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        # A short poll interval: stop() waits for the serve loop to notice, in real time.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, name="forgejo-standin", daemon=True
        )
        self._thread.start()
        return self.port

    def stop(self) -> None:
        """Graceful stop: stop serving, close the database (SQLite checkpoints the WAL)."""
        conn = self._shutdown()
        if conn is not None:
            with self._lock:
                conn.close()

    def crash(self) -> None:
        """Stop serving the way a killed process does: the database is never closed, so the files
        stay as they were (`-wal` and `-shm` included) for the next opener to recover."""
        conn = self._shutdown()
        if conn is not None:
            _CRASHED.append(conn)

    def _shutdown(self) -> sqlite3.Connection | None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        with self._lock:
            conn, self._conn = self._conn, None
        return conn

    # ------------------------------------------------------------------ what the server does
    def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /api/healthz, computed now."""
        checks = {"cache:ping": [self._check_cache()], "database:ping": [self._check_database()]}
        failed = any(c["status"] != "pass" for results in checks.values() for c in results)
        status = "fail" if failed else "pass"
        body = {"status": status, "description": self.app_name, "checks": checks}
        return (200 if status in ("pass", "warn") else 424), body

    def _check_cache(self) -> dict[str, str]:
        result = {"status": "pass", "time": _rfc3339(self._now())}
        if self.fail_cache:
            result.update(status="fail", output="cache ping failed")
        return result

    def _check_database(self) -> dict[str, str]:
        result = {"status": "pass", "time": _rfc3339(self._now())}
        try:
            os.stat(self.db_path)
            with self._lock:
                if self._conn is None:
                    raise sqlite3.OperationalError("database is closed")
                self._conn.execute("SELECT 1").fetchone()
        except (OSError, sqlite3.Error) as exc:
            result.update(status="fail", output=str(exc))
        return result

    def commit(self, payload: str) -> int:
        """Insert one row in its own transaction; returns its id once COMMIT has returned."""
        with self._lock:
            if self._conn is None or self._server is None:
                raise StandinDown("the stand-in is not serving")
            cursor = self._conn.execute(
                "INSERT INTO drill_rows (payload, committed_at) VALUES (?, ?)",
                (payload, _rfc3339(self._now())),
            )
            return int(cursor.lastrowid or 0)

    def row_ids(self) -> list[int]:
        with self._lock:
            if self._conn is None:
                raise StandinDown("the stand-in is not serving")
            return [int(r[0]) for r in self._conn.execute("SELECT id FROM drill_rows ORDER BY id")]


def read_row_ids(data_dir: Path) -> list[int]:
    """Row ids in a stand-in database on disk (recovering its WAL like any opener), or [] if none."""
    path = Path(data_dir) / DB_RELPATH
    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return [int(r[0]) for r in conn.execute("SELECT id FROM drill_rows ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _handler_for(standin: ForgejoStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "forgejo-standin"

        def log_message(self, format: str, *args: Any) -> None:
            # The drill prints its own report; per-request lines would bury it.
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, indent=2).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/api/healthz":
                self._send(*standin.health())
            elif path == "/api/drill/rows":
                try:
                    self._send(200, {"ids": standin.row_ids()})
                except StandinDown as exc:
                    self._send(503, {"message": str(exc)})
            else:
                self._send(404, {"message": "not found"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/api/drill/commit":
                self._send(404, {"message": "not found"})
                return
            length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY)
            payload = self.rfile.read(length).decode("utf-8", "replace")
            try:
                row_id = standin.commit(payload)
            except (StandinDown, sqlite3.Error) as exc:
                self._send(503, {"message": str(exc)})
                return
            self._send(201, {"id": row_id})

    return Handler
