"""The finance sentence reads right for one request, a dearer-than-baseline period and
amounts under a cent (probe J: "We processed 1 requests ... — -733.3% savings")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from app.warehouse.reports import Range, Summary

DAY = datetime(2026, 11, 30, tzinfo=UTC)
RANGE = Range(DAY, DAY + timedelta(days=1))


def sentence(requests: int, cost: str, baseline: str, unpriced: int = 0) -> str:
    return Summary(requests, Decimal(cost), Decimal(baseline), "gpt-4", unpriced, RANGE).sentence()


def test_one_request_dearer_than_the_baseline() -> None:
    assert sentence(1, "0.25", "0.03", unpriced=1) == (
        "We processed 1 request, would have cost $0.03 at GPT-4 rates, actually cost $0.25 "
        "— 733.3% more than at those rates. (1 request to models without a price is in "
        "neither amount.)"
    )


def test_amounts_under_a_cent_are_not_read_as_nothing() -> None:
    assert sentence(3, "0.00012", "0.0036", unpriced=2) == (
        "We processed 3 requests, would have cost $0.0036 at GPT-4 rates, actually cost "
        "$0.00012 — 96.7% savings. (2 requests to models without a price are in neither amount.)"
    )
    assert sentence(2_000, "12.5", "100") == (
        "We processed 2,000 requests, would have cost $100.00 at GPT-4 rates, actually cost "
        "$12.50 — 87.5% savings."
    )


def test_a_csv_cell_a_spreadsheet_would_run_is_quoted() -> None:
    """Probe J: `tollgate report --format csv` wrote a user id `=HYPERLINK(...)` as a
    formula cell (ids are the client's words when there are no keys)."""
    from app.cli import _spreadsheet_safe

    cells = ['=HYPERLINK("http://x")', "@SUM(A1)", "+cmd", "-2+3", "alice", "-0.5", 12]
    assert [_spreadsheet_safe(c) for c in cells] == [
        "'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "'+cmd", "'-2+3", "alice", "-0.5", 12,
    ]  # fmt: skip
