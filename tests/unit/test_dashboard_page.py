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


def _page_function(page: str, name: str) -> str:
    start = page.index(f"function {name}(")
    end = page.index("\n}\n", start) + 2
    return page[start:end]


def test_daily_chart_spans_the_range_with_empty_days_at_zero() -> None:
    """After a first replay there is one day of data: the chart still draws every day of the
    range (UTC), the empty ones at zero, and the axes name dates and dollars."""
    import json
    import shutil
    import subprocess

    import pytest

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = DASHBOARD_HTML.read_text()
    helpers = "\n".join(
        line for line in page.splitlines() if line.startswith(("const esc", "const usd"))
    )
    script = (
        helpers
        + "\n"
        + _page_function(page, "fill")
        + "\n"
        + _page_function(page, "bars")
        + """
const win = {from: "2025-03-01T12:00:00.000Z", to: "2025-03-08T12:00:00.000Z"};
const points = [{start: "2025-03-05T00:00:00+00:00", day: "2025-03-05", cost_usd: "2.5",
                 requests: 3, anomaly: true, alert_kinds: ["spend_rate"]}];
const filled = fill(points, win, 86400000);
const svg = bars(filled, (p) => Number(p.cost_usd), (p) => p.anomaly, (p) => p.day, (p) => p.day.slice(5));
console.log(JSON.stringify({days: filled.map((p) => [p.day, Number(p.cost_usd)]), svg}));
"""
    )
    out = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True,
                                    check=True).stdout)  # fmt: skip
    assert [d for d, _ in out["days"]] == [f"2025-03-0{n}" for n in range(1, 9)]
    assert dict(out["days"]) == {f"2025-03-0{n}": (2.5 if n == 5 else 0) for n in range(1, 9)}
    assert ">03-01<" in out["svg"] and ">03-05<" in out["svg"]  # dates on the x axis
    assert "$2.50" in out["svg"] and "$0.00" in out["svg"]  # dollars on the y axis
    assert "UTC" in out["svg"]


def test_times_are_utc_and_tables_scroll_at_phone_width() -> None:
    page = DASHBOARD_HTML.read_text()
    assert "toLocaleTimeString" not in page and 'toISOString().slice(11, 19) + " UTC"' in page
    assert '<div class="scroll"><table>' in page and ".scroll { overflow-x:auto" in page
    assert 'report("alerts"' in page and "esc(r.message)" in page


def test_a_cut_table_says_what_it_left_out() -> None:
    """Probe R: the feature table showed its top 10 of 11, summing to 452 requests beside a
    Spend tile of 454, and nothing said a row was left out."""
    import json
    import shutil
    import subprocess

    import pytest

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (
        _page_function(DASHBOARD_HTML.read_text(), "others")
        + """
const summary = {requests: 454, cost_usd: "1.5"};
const top = [{feature: "chat", requests: 400, cost_usd: "1"}, {feature: "x", requests: 52, cost_usd: "0.25"}];
console.log(JSON.stringify([others(top, "feature", summary),
  others(top, "feature", {requests: 452, cost_usd: "1.25"})]));
"""
    )
    cut, whole = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True,
                                           check=True).stdout)  # fmt: skip
    assert cut[-1] == {
        "feature": "all others", "requests": 2, "cost_usd": "0.25", "savings_usd": None,
    }  # fmt: skip
    assert whole == cut[:-1]  # nothing left out: no extra row


def test_the_alerts_list_says_how_many_it_left_out() -> None:
    """Probe 56 (F2): the dashboard's "Recent alerts" showed the latest 20 of 42 and nothing
    said 22 more had fired; the report's page now says `more` and `total`, and so does the
    list under its table."""
    import json
    import shutil
    import subprocess

    import pytest

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    page = DASHBOARD_HTML.read_text()
    helpers = "\n".join(line for line in page.splitlines() if line.startswith("const int"))
    script = (
        helpers
        + "\n"
        + _page_function(page, "leftOut")
        + """
const alerts = (n) => Array.from({length: n}, () => ({kind: "volume_spike"}));
console.log(JSON.stringify([
  leftOut({alerts: alerts(20), more: true, next_offset: 20, total: 42}),
  leftOut({alerts: alerts(3), more: false, next_offset: null, total: 3}),
]));
"""
    )
    cut, whole = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True,
                                           check=True).stdout)  # fmt: skip
    assert "latest 20 of 42" in cut and "offset=20" in cut
    assert whole == ""
    assert "leftOut(alerts)" in page
