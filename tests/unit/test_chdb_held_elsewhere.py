"""Opening the embedded ClickHouse that another process holds (the sink of `make up`)."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from app.warehouse.clickhouse import WarehouseError, connect


def test_a_chdb_directory_another_process_holds_is_named_as_such(tmp_path: Path) -> None:
    """A newcomer probe: `tollgate db migrate` while `make up` ran said "cannot open ClickHouse
    ... Error initializing EmbeddedServer: . (BAD_ARGUMENTS). Set TOLLGATE_CLICKHOUSE_URL to a
    reachable server": the cause was the sink holding the directory's lock (ClickHouse's
    `status` file, locked with flock as here), and the advice pointed elsewhere."""
    directory = tmp_path / "chdb"
    directory.mkdir()
    with (directory / "status").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WarehouseError) as info:
            connect(dsn=f"chdb://{directory}")
    message = str(info.value)
    assert "another process" in message and "make down" in message
    assert "TOLLGATE_CLICKHOUSE_URL to a reachable server" not in message
