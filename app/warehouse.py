"""The ClickHouse connection: a server through clickhouse-connect, or embedded chdb.

Owns how Tollgate opens ClickHouse, nothing about tables (``deploy/clickhouse``)
or queries (the reports module). ``chdb:///path`` DSNs give the same
clickhouse-connect client API on an embedded, on-disk engine.
"""

from __future__ import annotations

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
        raise WarehouseError(
            f"cannot open ClickHouse at {target}: {exc}. Set TOLLGATE_CLICKHOUSE_URL to a "
            "reachable server (http://host:8123) or unset it to use embedded chdb."
        ) from exc


def describe(client: Any) -> str:
    version = client.query("SELECT version()").result_rows[0][0]
    return f"ClickHouse {version}"
