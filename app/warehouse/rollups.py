"""Rebuilding the rollups of some hours from the raw events, after an interrupted insert.

Owns one repair. The rollups (``usage_minute``, ``usage_user_minute``, ``usage_team_minute``,
``outcome_minute``, ``refused_minute``, the hourly ones fed from the minute ones,
``downtiered_requests``) are materialized views: ClickHouse fills them as a raw table is
inserted into, and the insert into a view comes after the insert into its raw table. A sink killed between the two leaves the raw rows
stored and the rollup rows missing; the restarted sink finds those events already stored,
drops them as duplicates, and the reports, which read the rollups for whole minutes and
hours, count fewer calls than the raw table holds (session 12's newcomer probe: 592 of 605
in the minutes of two kills).

So when the sink finds events of a raw table already stored, it rebuilds the rollups of
their hours: deletes those hours from every rollup fed (directly or through another rollup)
by that table, then inserts each direct rollup again with its view's own query over the
raw rows of those hours (``FINAL``: each event once), which fills the hourly rollups in
turn. The queries are read from the views' definitions in ``deploy/clickhouse``, so a
rollup added there is rebuilt too. Rebuilding an hour that was complete changes nothing.

A rollup with a TTL (``usage_user_minute``: 3 days) cannot be checked for an hour its TTL
may have dropped rows of, nor can the rollups fed from it (``usage_user_hour``): the check
of such an hour reads the others (before, every check of an older hour found it short, and
rebuilt it). A rebuild still rebuilds them all: the hourly rollup is refilled through the
minute one, whose rows the TTL then drops.

A migration that adds a view, or changes one's query, rebuilds the hours stored before it
(``REBUILD_AFTER``), in the new views only where the others are complete. The views are
read from every migration file, so a migration applied on an older install rebuilds before
the later ones exist: rollups whose table is not created yet are left out.

A migration that creates a rollup table (``Backfill.new``) fills it, while it is empty,
with one ``INSERT ... SELECT`` of its view's query over the whole raw table (``FINAL``),
and the rollups it feeds fill through their views: hour by hour, each hour's rebuild read
its whole month partition (the raw tables are ordered by user first), 167 s for migration
012 at a million events a month. A table already holding rows (a migration cut off after
its fill, before it was recorded) is rebuilt hour by hour where it is short instead. The
fill counts what is stored when it runs: an event inserted between the view's creation
and the fill is counted twice (by the view and by the fill). The sink applies the
migrations before it consumes, so one sink inserts none; with several sinks on one
server, apply the migrations (``tollgate db migrate``) before starting them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

from app.ids import SUPERSEDED
from app.warehouse.clickhouse import MIGRATIONS_DIR, _statements

log = logging.getLogger(__name__)
HOUR = timedelta(hours=1)
_VIEW = re.compile(
    r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+) AS\s+(.*)", re.DOTALL | re.IGNORECASE
)
_TTL = re.compile(
    r"\bTTL\s+\w+\s*\+\s*toInterval(Second|Minute|Hour|Day|Week|Month|Quarter|Year)\((\d+)\)"
)
# The longest each unit may be: an hour is skipped only once its rows surely may be dropped.
_UNIT = {"Second": timedelta(seconds=1), "Minute": timedelta(minutes=1), "Hour": HOUR,
         "Day": timedelta(days=1), "Week": timedelta(weeks=1), "Month": timedelta(days=31),
         "Quarter": timedelta(days=92), "Year": timedelta(days=366)}  # fmt: skip
_NEW_QUERY = re.compile(r"ALTER TABLE (\w+) MODIFY QUERY\s+(.*)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Backfill:
    """The hours of ``table`` (raw events) where ``affected`` holds, rebuilt in the rollups of
    ``views`` and those they feed; every rollup ``table`` feeds when ``views`` is empty.
    ``new``: the migration creates those rollups' tables, filled whole while empty."""

    table: str
    affected: str
    views: tuple[str, ...] = ()
    new: bool = False


# Migrations that change a view's query, or add a view, and which hours of its raw table
# stored before then it counts differently: they are rebuilt once that migration is applied.
REBUILD_AFTER = {
    "011_client_requests": (Backfill("usage_events", SUPERSEDED),),
    # a new view: the calls refused before it existed are counted
    "012_refused_calls": (
        Backfill("request_events", "status = 'blocked'", ("refused_minute_mv",), new=True),
    ),
    # new views: every hour with usage, and with refused calls, is counted by team; only
    # the new rollups are filled (the others are complete)
    "013_team_rollups": (
        Backfill("usage_events", "1", ("usage_team_minute_mv",), new=True),
        Backfill("request_events", "status = 'blocked'", ("refused_team_minute_mv",), new=True),
    ),
}


@dataclass(frozen=True)
class Rollup:
    view: str
    target: str
    query: str  # the view's SELECT
    source: str  # the table it reads


@cache
def rollups(directory: Path = MIGRATIONS_DIR) -> tuple[Rollup, ...]:
    """Every materialized view of the migrations, in the order they are created, each with
    its latest query (a later ``ALTER TABLE view MODIFY QUERY`` replaces it)."""
    found: dict[str, Rollup] = {}
    for path in sorted(directory.glob("[0-9][0-9][0-9]_*.sql")):
        for statement in _statements(path.read_text()):
            if match := _VIEW.match(statement.rstrip(";")):
                view, target, query = match.groups()
            elif (match := _NEW_QUERY.match(statement.rstrip(";"))) and match[1] in found:
                view, query = match.groups()
                target = found[view].target
            else:
                continue
            sources = re.findall(r"\bFROM\s+(\w+)", query)
            found[view] = Rollup(view, target, query, sources[-1])
    return tuple(found.values())


def after_migration(client: Any, version: str) -> int:
    """Rebuild the hours a migration's new view queries count differently (``REBUILD_AFTER``),
    or fill its new rollups; returns how many hours were rebuilt or filled."""
    done = 0
    for backfill in REBUILD_AFTER.get(version, ()):
        if backfill.new and (filled := fill(client, backfill.table, backfill.views)):
            done += filled
            continue
        hours = client.query(
            f"SELECT DISTINCT toStartOfHour(ts) FROM {backfill.table} WHERE {backfill.affected}"
        ).result_rows
        done += rebuild(client, backfill.table, (h[0] for h in hours), backfill.views)
    return done


def fed_by(
    table: str, directory: Path = MIGRATIONS_DIR, views: tuple[str, ...] = ()
) -> list[Rollup]:
    """The rollups ``table`` feeds, directly or through another rollup, nearest first; with
    ``views``, only those of them (fed directly) and the rollups they feed."""
    result: list[Rollup] = []
    frontier = [table]
    while frontier:
        source = frontier.pop(0)
        for rollup in rollups(directory):
            if views and source == table and rollup.view not in views:
                continue
            if rollup.source == source and rollup not in result:
                result.append(rollup)
                frontier.append(rollup.target)
    return result


@dataclass(frozen=True)
class _Table:
    """What a check needs to know of a table of the warehouse."""

    time_column: str  # the first column of its sorting key
    sums: bool  # a SummingMergeTree: its rows' measures are summed
    numbers: tuple[str, ...]  # its numeric columns not in the sorting key, in order
    ttl: timedelta | None  # how long its rows are kept, if it drops them


def _tables(client: Any) -> dict[str, _Table]:
    """Every table and view of the database, read once a check (two queries): a check of
    many hours asked for each rollup's sorting key, engine, columns and TTL every hour.
    Read again by each check, never kept: a migration may create tables later in the
    process (``after_migration`` rebuilds while later views do not exist yet)."""
    numbers: dict[str, list[str]] = {}
    for table, column in client.query(
        "SELECT table, name FROM system.columns WHERE database = currentDatabase() "
        "AND match(type, '^(U?Int|Decimal|Float)') ORDER BY table, position"
    ).result_rows:
        numbers.setdefault(str(table), []).append(str(column))
    tables = {}
    for name, engine, key, query in client.query(
        "SELECT name, engine, sorting_key, create_table_query FROM system.tables "
        "WHERE database = currentDatabase()"
    ).result_rows:
        keys = {k.strip() for k in str(key).split(",")}
        found = _TTL.search(str(query))
        tables[str(name)] = _Table(
            time_column=str(key).split(",")[0].strip(),
            sums="Summing" in str(engine),
            numbers=tuple(c for c in numbers.get(str(name), ()) if c not in keys),
            ttl=None if found is None else int(found.group(2)) * _UNIT[found.group(1)],
        )
    return tables


def _created(chain: list[Rollup], tables: dict[str, _Table]) -> list[Rollup]:
    """The rollups of ``chain`` whose view and table exist: a migration applied before a
    later one rebuilds its hours while the later one's views are not created yet."""
    return [r for r in chain if r.view in tables and r.target in tables]


def hours_of(times: Iterable[datetime]) -> list[datetime]:
    return sorted({t.astimezone(UTC).replace(minute=0, second=0, microsecond=0) for t in times})


def _hour_of(tables: dict[str, _Table], table: str, raw: str) -> str:
    """A subquery: the rows of ``table`` in the hour ``%(lo)s``..``%(hi)s`` (raw events
    ``FINAL``, each once; a rollup as it is, its sums being what counts)."""
    # Named as the table: a view's query may name its columns ``usage_minute.requests``.
    if table == raw:
        return f"(SELECT * FROM {table} FINAL WHERE ts >= %(lo)s AND ts < %(hi)s) AS {table}"
    column = tables[table].time_column
    return f"(SELECT * FROM {table} WHERE {column} >= %(lo)s AND {column} < %(hi)s) AS {table}"


def _past_ttl(tables: dict[str, _Table], chain: list[Rollup], start: datetime) -> set[str]:
    """The rollups of ``chain`` that cannot hold all of the hour from ``start``: their TTL
    may have dropped some of its rows, or that of a rollup they are fed from."""
    now, gone = datetime.now(UTC), set()
    for rollup in chain:  # sources before the rollups they feed
        ttl = tables[rollup.target].ttl
        if rollup.source in gone or (ttl is not None and start + ttl <= now):
            gone.add(rollup.target)
    return gone


def complete(
    client: Any,
    table: str,
    start: datetime,
    chain: list[Rollup] | None = None,
    tables: dict[str, _Table] | None = None,
) -> bool:
    """Whether every rollup ``table`` feeds (or of ``chain``) holds what its query gives over
    the hour from ``start``: the same sums (a summing rollup), or the same rows (a
    deduplicating one). Rollups past their TTL for that hour are not checked. ``tables``:
    the database's tables as ``_tables`` read them, when checking many hours."""
    bounds = {"lo": start, "hi": start + HOUR}
    tables = _tables(client) if tables is None else tables
    chain = _created(fed_by(table), tables) if chain is None else chain
    gone = _past_ttl(tables, chain, start)
    for rollup in chain:
        if rollup.target in gone:
            continue
        query = re.sub(
            rf"\bFROM\s+{rollup.source}\b",
            f"FROM {_hour_of(tables, rollup.source, table)}",
            rollup.query,
        )
        target = tables[rollup.target]
        sums, columns, column = target.sums, target.numbers, target.time_column
        where = f"WHERE {column} >= %(lo)s AND {column} < %(hi)s"
        if sums and columns:
            totals = ", ".join(f"sum({c})" for c in columns)
            expected = f"SELECT {totals} FROM ({query})"
            held = f"SELECT {totals} FROM {rollup.target} {where}"
        else:
            expected = f"SELECT count() FROM ({query})"
            held = f"SELECT count() FROM {rollup.target} FINAL {where}"
        if (
            client.query(expected, parameters=bounds).result_rows
            != client.query(held, parameters=bounds).result_rows
        ):
            return False
    return True


def fill(client: Any, table: str, views: tuple[str, ...]) -> int:
    """Fill the rollups of ``views`` (and those they feed) from the whole of ``table``, with
    one ``INSERT`` each, if every one of them is empty; returns how many hours they hold
    then (0: not filled, or nothing to count)."""
    tables = _tables(client)
    chain = _created(fed_by(table, views=views), tables)
    if not chain or any(
        client.query(f"SELECT count() FROM {r.target}").result_rows[0][0] for r in chain
    ):
        return 0
    direct = [r for r in chain if r.source == table]
    for rollup in direct:
        whole = f"(SELECT * FROM {table} FINAL) AS {table}"
        query = re.sub(rf"\bFROM\s+{table}\b", f"FROM {whole}", rollup.query)
        client.command(f"INSERT INTO {rollup.target} {query}")
    hours = 0
    for rollup in direct:
        column = tables[rollup.target].time_column
        hours += client.query(
            f"SELECT uniqExact(toStartOfHour({column})) FROM {rollup.target}"
        ).result_rows[0][0]
    log.info(
        "filled new rollups from the events stored before them",
        extra={"table": table, "rollups": [r.target for r in chain], "hours": hours},
    )
    return int(hours)


def rebuild(client: Any, table: str, hours: Iterable[datetime], views: tuple[str, ...] = ()) -> int:
    """Recompute every rollup ``table`` feeds (with ``views``: those views' and the rollups
    they feed) for the whole ``hours`` given, except hours whose rollups are complete
    already (a DELETE costs about 0.4 s a rollup at a million rows); returns how many hours
    were rebuilt. The tables are read once for all the hours."""
    tables = _tables(client)
    chain = _created(fed_by(table, views=views), tables)
    if not chain:
        return 0
    direct = [r for r in chain if r.source == table]
    done = 0
    for start in hours_of(hours):
        if complete(client, table, start, chain, tables):
            continue
        bounds = {"lo": start, "hi": start + HOUR}
        for rollup in chain:
            column = tables[rollup.target].time_column
            client.command(
                f"DELETE FROM {rollup.target} WHERE {column} >= %(lo)s AND {column} < %(hi)s",
                parameters=bounds,
            )
        for rollup in direct:
            query = re.sub(
                rf"\bFROM\s+{table}\b", f"FROM {_hour_of(tables, table, table)}", rollup.query
            )
            client.command(f"INSERT INTO {rollup.target} {query}", parameters=bounds)
        done += 1
    if done:
        log.info(
            "rebuilt the rollups of hours whose events were already stored (an earlier insert "
            "may have been cut off before its rollups)",
            extra={"table": table, "hours": done},
        )
    return done
