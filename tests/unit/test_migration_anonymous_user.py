"""Migration 015's views spell the anonymous user out in SQL (an applied migration is never
edited): this ties that spelling to ``app.ids.ANONYMOUS_USER``, the user ingest charges a
call that names none to and leaves NULL on its outcomes (closing39 L5)."""

from __future__ import annotations

import re

from app.ids import ANONYMOUS_USER
from app.warehouse.clickhouse import MIGRATIONS_DIR

MIGRATION = MIGRATIONS_DIR / "015_unserved_call_outcomes.sql"


def _sql(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


def test_migration_015_reads_a_null_outcome_user_as_the_anonymous_user() -> None:
    sql = _sql(MIGRATION.read_text())
    # every default of an outcome's user, in both views: the calls' user is matched to it
    defaults = re.findall(r"ifNull\(\s*user_id\s*,\s*'([^']*)'\s*\)", sql)
    assert defaults == [ANONYMOUS_USER, ANONYMOUS_USER]
    # unserved_calls: the users whose calls are looked up
    assert f"SELECT ifNull(user_id, '{ANONYMOUS_USER}') FROM outcome_events" in sql
    # unserved_call_outcomes: an outcome is of an unserved call of its user
    assert f"AND (ifNull(user_id, '{ANONYMOUS_USER}'), assumeNotNull(request_id)) IN" in sql
