"""A migration that adds a rollup fills its new table with one query, on the warehouse.

Migrations 012 (refused calls) and 013 (team rollups) create new rollup tables, and the
events stored before them must be counted. They were rebuilt hour by hour: for every hour
with a blocked event (012) or with any usage (013) a check, a DELETE and an INSERT over
that hour's raw rows, each of which scans its whole month partition (the raw tables are
ordered by user first): 167 s for migration 012 at a million events a month, before the
sink consumed anything. A new, empty rollup is now filled by one ``INSERT ... SELECT`` over
the whole raw table, with the view's own query; the rollups it feeds fill through their
views. Each test has a database of its own: the tables must be empty, as a new one is.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import clickhouse_connect
import pytest

from app.warehouse.clickhouse import migrate
from app.warehouse.rollups import after_migration, rebuild

pytestmark = pytest.mark.integration

USAGE_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "team", "source",
                 "provider", "model_served", "baseline_model", "prompt_tokens", "cost_usd",
                 "baseline_cost_usd", "cache_saved_usd", "price_unknown", "status", "error_type",
                 "http_status"]  # fmt: skip
REQUEST_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "team", "endpoint",
                   "model_requested", "tier", "status", "reason", "blocked_scope"]  # fmt: skip
NEW_TABLES = {
    "012_refused_calls": ("refused_minute",),
    "013_team_rollups": ("usage_team_minute", "usage_team_hour", "refused_team_minute"),
}


class Counting:
    """The warehouse client, counting the statements run through it by their first word."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.statements: list[str] = []
        self.texts: list[str] = []

    def _seen(self, sql: str) -> None:
        self.statements.append(sql.split(None, 1)[0].upper())
        self.texts.append(sql)

    def query(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._seen(sql)
        return self.client.query(sql, *args, **kwargs)

    def command(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._seen(sql)
        return self.client.command(sql, *args, **kwargs)

    def count(self, word: str) -> int:
        return self.statements.count(word)


@pytest.fixture
def warehouse(clickhouse_dsn: str, clickhouse: Any) -> Iterator[Any]:
    """A client on a new database of the session's warehouse, migrated."""
    name = f"backfill_{uuid.uuid4().hex[:8]}"
    clickhouse.command(f"CREATE DATABASE {name}")
    client = clickhouse_connect.get_client(dsn=clickhouse_dsn, database=name)
    try:
        migrate(client)
        yield client
    finally:
        clickhouse.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def _store(
    client: Any, hours: int = 60, start: datetime = datetime(2025, 1, 30, 6, tzinfo=UTC)
) -> None:
    """A few thousand calls over ``hours`` hours from ``start`` (by default across a month's
    end): teams and none, errors, escalated attempts, unpriced calls, and calls refused by a
    cap or for another reason."""
    rng = random.Random(7)
    teams = ["red", "blue", "green", None]
    usage, requests = [], []
    for i in range(3000):
        at = start + timedelta(seconds=rng.randrange(hours * 3600))
        error_type = rng.choice([None] * 8 + ["escalated_refused", "timeout"])
        status = "ok" if error_type is None else "error"
        cost = Decimal(rng.randrange(1, 10**9)) / 10**9
        usage.append([uuid.uuid4().hex, at, f"r{i}", f"u{i % 17}", f"f{i % 3}",
                      rng.choice(teams), "gateway", "openai", "gpt-4o", "gpt-4",
                      rng.randrange(5000), cost, cost * 3, cost / 7, rng.random() < 0.05,
                      status, error_type, 200 if status == "ok" else 500])  # fmt: skip
    for i in range(1500):
        at = start + timedelta(seconds=rng.randrange(hours * 3600))
        status, reason = rng.choice(
            [("blocked", "budget_exceeded")] * 3 + [("rejected", "invalid_request_error"),
                                                    ("accepted", None)]
        )  # fmt: skip
        requests.append([uuid.uuid4().hex, at, f"q{i}", f"u{i % 17}", f"f{i % 3}",
                         rng.choice(teams), "/v1/chat/completions",
                         rng.choice(["gpt-4o", "auto"]), rng.choice(["standard", None]),
                         status, reason, "user:u" if status == "blocked" else None])  # fmt: skip
    for rows in (usage[:1000], usage[1000:]):  # several inserts, as a sink's batches
        client.insert("usage_events", rows, column_names=USAGE_COLUMNS)
    client.insert("request_events", requests, column_names=REQUEST_COLUMNS)


def _held(client: Any, table: str) -> list[tuple[Any, ...]]:
    """Every row of a rollup, its measures summed by key (as the reports read it)."""
    (key,) = client.query(
        "SELECT sorting_key FROM system.tables WHERE database = currentDatabase() AND name = %(t)s",
        parameters={"t": table},
    ).result_rows[0]
    keys = [k.strip() for k in str(key).split(",")]
    measures = [
        row[0]
        for row in client.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() "
            "AND table = %(t)s ORDER BY position",
            parameters={"t": table},
        ).result_rows
        if row[0] not in keys
    ]
    sums = ", ".join(f"sum({m})" for m in measures)
    columns = ", ".join(keys)
    return list(
        client.query(
            f"SELECT {columns}, {sums} FROM {table} GROUP BY {columns} ORDER BY {columns}"
        ).result_rows
    )


@pytest.mark.parametrize("version", list(NEW_TABLES))
def test_a_new_rollup_is_filled_by_one_insert_as_its_view_would_have(
    warehouse: Any, version: str
) -> None:
    _store(warehouse)
    # What the views counted as the events were inserted; then the tables as the migration
    # creates them: empty, their views in place.
    counted = {table: _held(warehouse, table) for table in NEW_TABLES[version]}
    assert all(counted.values())
    assert len({row[0] for row in counted[NEW_TABLES[version][0]]}) > 40  # many hours
    for table in NEW_TABLES[version]:
        warehouse.command(f"TRUNCATE TABLE {table}")

    spy = Counting(warehouse)
    assert after_migration(spy, version) > 40  # the hours counted
    assert {table: _held(warehouse, table) for table in NEW_TABLES[version]} == counted
    # One INSERT a table the raw events feed (the hourly one fills through its view), and
    # nothing deleted: not a rebuild hour by hour.
    direct = {"012_refused_calls": 1, "013_team_rollups": 2}[version]
    assert (spy.count("INSERT"), spy.count("DELETE")) == (direct, 0), spy.statements
    assert len(spy.statements) < 40, spy.statements
    # Applied again (cut off before it was recorded): the table holds rows, so it is not
    # filled again (every event would count twice); its hours are complete, none rebuilt.
    assert after_migration(warehouse, version) == 0
    assert {table: _held(warehouse, table) for table in NEW_TABLES[version]} == counted


def test_checking_many_hours_reads_the_rollups_tables_once(warehouse: Any) -> None:
    """The sink checks every hour of the events it sees again (``rebuild``): each hour's
    check asked the warehouse for each rollup's sorting key, engine, columns and TTL again
    (system.tables, system.columns), which cannot change during one check. They are read
    once a check; a short hour is still found and rebuilt."""
    # recent hours: within every rollup's TTL, so each is checked
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=30)
    _store(warehouse, hours=24, start=start)
    hours = [start + timedelta(hours=h) for h in range(24)]

    def metadata_reads(hours: list[datetime]) -> int:
        spy = Counting(warehouse)
        assert rebuild(spy, "usage_events", hours) == 0  # complete: nothing rebuilt
        return sum("system." in sql for sql in spy.texts)

    one = metadata_reads(hours[:1])
    assert metadata_reads(hours) == one <= 3

    held = _held(warehouse, "usage_user_hour")
    warehouse.command("DELETE FROM usage_user_hour WHERE hour = %(h)s", parameters={"h": hours[5]})
    assert _held(warehouse, "usage_user_hour") != held
    assert rebuild(warehouse, "usage_events", hours) == 1
    assert _held(warehouse, "usage_user_hour") == held
