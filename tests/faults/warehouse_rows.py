"""Print, as one JSON line, the warehouse rows per event id of one fault test's users,
and the calls their per-user rollups hold.

Run as ``python -m tests.faults.warehouse_rows <dsn> <tag>`` by the fault harness: embedded
chdb belongs to one process at a time, so the rows are read in a process of their own,
after the sink has stopped. No ``FINAL``: a duplicate row must show up as two rows.
"""

from __future__ import annotations

import sys

import orjson

from app.warehouse.clickhouse import connect


def main(dsn: str, tag: str) -> None:
    client = connect(dsn=dsn)
    rows: dict[str, dict[str, int]] = {}
    for table in ("request_events", "usage_events"):
        result = client.query(
            f"SELECT event_id, count() FROM {table} WHERE startsWith(user_id, %(prefix)s) "
            "GROUP BY event_id",
            parameters={"prefix": f"{tag}-u"},
        )
        rows[table] = {event_id: int(count) for event_id, count in result.result_rows}
    # The rollups the reports read for whole minutes and hours (filled by materialized
    # views after each insert): the calls they hold, to compare with the distinct events.
    rows["rollups"] = {}
    for table in ("usage_user_minute", "usage_user_hour"):
        (calls,) = client.query(
            f"SELECT sum(requests) FROM {table} WHERE startsWith(user_id, %(prefix)s)",
            parameters={"prefix": f"{tag}-u"},
        ).result_rows[0]
        rows["rollups"][table] = int(calls or 0)
    sys.stdout.write(orjson.dumps(rows).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
