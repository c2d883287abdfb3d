"""The built-in dashboard page asks only for reports, dimensions and fields that exist."""

from __future__ import annotations

import re

from app.http.reports_api import REPORTS
from app.http.server import DASHBOARD_HTML, ROUTES
from app.warehouse.reports import BREAKDOWN_DIMENSIONS, INTERVALS


def test_the_dashboard_is_routed_and_reads_existing_reports() -> None:
    assert ("GET", "/dashboard") in {(m, p) for m, p, _ in ROUTES}
    page = DASHBOARD_HTML.read_text()
    names = set(re.findall(r'report\("(\w+)"', page))
    assert names == set(REPORTS)
    assert set(re.findall(r'by: "(\w+)"', page)) <= set(BREAKDOWN_DIMENSIONS)
    assert set(re.findall(r'interval: "(\w+)"', page)) <= set(INTERVALS)
    # Report text is escaped before it reaches innerHTML (names and scopes are user input).
    assert "esc(r.scope)" in page and "esc(r[key])" in page
