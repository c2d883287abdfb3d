"""The ClickHouse connection: a server through clickhouse-connect, or embedded chdb.

Owns how Tollgate opens ClickHouse, nothing about tables (``deploy/clickhouse``)
or queries (the reports module). ``chdb:///path`` DSNs give the same
clickhouse-connect client API on an embedded, on-disk engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.settings import Settings


class WarehouseError(RuntimeError):
    """ClickHouse could not be opened; the message says which DSN and what to check."""


def connect(settings: Settings | None = None, dsn: str | None = None) -> Any:
    """A clickhouse-connect client for ``dsn`` (default: the settings' DSN)."""
    import clickhouse_connect

    target = dsn or (settings or Settings()).clickhouse_dsn
    if target.startswith("chdb://"):
        Path(target.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
    try:
        return clickhouse_connect.get_client(dsn=target)
    except Exception as exc:
        if target.startswith("chdb://") and _held_elsewhere(Path(target.removeprefix("chdb://"))):
            raise WarehouseError(
                f"cannot open the embedded ClickHouse at {target}: another process has it open "
                "(embedded chdb is one process's: the sink of `make up`, which applies the "
                "migrations itself when it starts). Stop the stack (`make down`) to run this "
                "here, or read the warehouse through the dispatcher (/v1/reports/*)."
            ) from exc
        raise WarehouseError(
            f"cannot open ClickHouse at {target}: {exc}. Set TOLLGATE_CLICKHOUSE_URL to a "
            "reachable server (http://host:8123) or unset it to use embedded chdb."
        ) from exc


def _held_elsewhere(directory: Path) -> bool:
    """Whether another process holds the chdb directory: ClickHouse flocks its ``status``
    file for as long as its engine is open."""
    import fcntl

    try:
        with (directory / "status").open("rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
    except OSError:
        return False  # no status file: nothing holds it
    return False


def describe(client: Any) -> str:
    version = client.query("SELECT version()").result_rows[0][0]
    return f"ClickHouse {version}"


MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "clickhouse"


def _statements(sql: str) -> list[str]:
    """SQL statements of a migration file (``;`` at a line end separates them)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";").strip()]


def migrate(client: Any, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the numbered ``*.sql`` files not applied yet, in order; returns what it applied.

    Idempotent: applied versions are recorded in ``schema_migrations``, and every
    statement is itself ``IF NOT EXISTS``, so a migration interrupted halfway re-runs.
    """
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {
        row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows
    }
    applied = []
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        version = path.stem
        if version in done:
            continue
        for statement in _statements(path.read_text()):
            client.command(statement.rstrip(";"))
        # Rows stored before a view's query changed are counted again by the new one
        # (imported here: the rollups read the migrations this module applies).
        from app.warehouse.rollups import after_migration

        after_migration(client, version)
        client.insert("schema_migrations", [[version]], column_names=["version"])
        applied.append(version)
    return applied


class ReconnectingClient:
    """A client that connects on first use and again after any failure.

    ClickHouse servers restart; the sink must survive that without losing its
    batch. ``factory`` builds a fresh clickhouse-connect client (default: the
    settings' DSN); a failed call drops the client so the next call reconnects.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory
        self._client: Any = None
        # One call at a time: the sink's inserts and report queries share one connection
        # (embedded chdb is one engine per process).
        self._lock = threading.Lock()

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self.factory()
            try:
                return getattr(self._client, method)(*args, **kwargs)
            except Exception:
                self._client = None
                raise

    def query(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("query", *args, **kwargs)

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("insert", *args, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("command", *args, **kwargs)

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("raw_insert", *args, **kwargs)
