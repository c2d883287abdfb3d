"""The Grafana FinOps dashboard: its JSON, its provisioning, and every query it sends, run on chdb.

Grafana cannot run here, so the test does to each query what Grafana and the ClickHouse plugin
(grafana-clickhouse-datasource) do before ClickHouse sees it, in the same order:

1. the plugin's front end: ``$__conditionalAll(condition, $var)`` becomes ``1=1`` when the
   variable is All (``$__all``) or empty, else the condition (``applyConditionalAll``);
2. Grafana's template service: the global ``${__from}`` and ``${__to}`` become the range's
   bounds in Unix milliseconds; ``${var:singlequote}``, ``${var:sqlstring}``, ``${var}`` and
   ``$var`` become the selected values (plain ones through the plugin's format: a list becomes
   ``'a','b'``);
3. the plugin's back end (pkg/macros/macros.go): ``$__timeFilter(col)``, ``$__timeInterval(col)``,
   ``$__fromTime``, ``$__toTime`` and the rest of its table, with the same SQL it generates.

A ``$`` left after that is a macro or variable the plugin does not define: the test fails.

The fixture (a random day D of 2023 and a random tag, so other tests' rows stay outside):

| # | time (D)    | user  | feature | served (asked)         | tier     | cost  | asked | baseline |
|---|-------------|-------|---------|------------------------|----------|-------|-------|----------|
| 1 | 10:00       | alice | chat    | gpt-4o-mini (gpt-4o)   | economy  | 0.15  | 2.50  | 30       |
| 2 | 10:01 hit   | alice | chat    | gpt-4o                 | standard | 0     | 2.50  | 30       |
| 3 | 10:02       | bob   | search  | gpt-4o, 0.625 prompt $ | standard | 1.875 | 2.50  | 30       |
| 4 | 10:03       | bob   | search  | mystery-model (price?) | -        | 0     | -     | -        |
| 5 | 10:04 error | carol | (none)  | gpt-4o-mini            | economy  | 0.05  | 0.05  | 1        |
| 6 | D-3 12:00   | alice | chat    | gpt-4o                 | standard | 1.00  | 1.00  | 12       |
| 7 | D-3 12:01   | dave  | agent   | gpt-4o, dispatcher_lost| -        | 0     | -     | -        |
| 8 | D-3 12:02   | dave  | agent   | gpt-4o, timeout        | -        | 0     | -     | -        |

Range D: spend 2.075, baseline 91, savings 88.925 = model choice 83.45 + routing 2.35 +
prompt cache 0.625 + cache 2.5.

Teams: alice's calls are team red's, bob's team blue's, carol's and dave's no team's.
Outcomes in D: success of 1, failure of 2, success of 3 (value 5); successes posted for
calls never served, which the reports API counts apart (``outcomes_on_failed_calls``): of
5 (feature search, value 3) and of 8 (feature agent, value 7); a success of 7 (agent,
value 4), whose dispatcher died (``dispatcher_lost``), served as far as anyone knows.
Calls budget caps refused (402, blocked Request events): alice's at 10:01 and 10:05 (chat,
gpt-4o), carol's at 10:06 (no feature, gpt-4o-mini); bob's 10:07 call rejected as invalid
is not one.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.warehouse import reports
from app.warehouse.clickhouse import migrate
from tests.integration.harness import private_day

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "tollgate-finops.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
DATASOURCES = yaml.safe_load((GRAFANA / "provisioning/datasources/clickhouse.yaml").read_text())
PROVIDERS = yaml.safe_load((GRAFANA / "provisioning/dashboards/tollgate.yaml").read_text())
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PLUGIN = "grafana-clickhouse-datasource"

ROLLUPS = {
    "usage_minute", "usage_user_hour", "outcome_minute", "refused_minute", "usage_team_minute",
    "refused_team_minute",
}  # fmt: skip
# Views of a migration the reports API reads too (one definition for both): the outcomes of
# calls never served, read for the outcomes of the range only (deploy/clickhouse/015_...).
SHARED_VIEWS = {"unserved_call_outcomes"}
SMALL_TABLES = {"budget_decisions", "alert_events"}
RAW_TABLES = {"usage_events", "request_events", "outcome_events"}

ALL = object()  # the "All" selection of a multi-value variable (value "$__all" in Grafana)
Selections = dict[str, Any]  # variable name -> ALL or a list of selected values
EVERYTHING: Selections = {"feature": ALL, "model": ALL}


# -- what Grafana and the plugin do to a query ---------------------------------------------------


def _macro_args(sql: str, open_paren: int) -> list[str]:
    """The plugin's getMacroArgs: split at top-level commas up to the matching parenthesis."""
    args, depth, last = [], 0, 1
    rest = sql[open_paren:]
    for token in re.finditer(r"\(|\)|,", rest):
        depth += {"(": 1, ")": -1}.get(token.group(), 0)
        if token.group() == "," and depth == 1:
            args.append(rest[last : token.end() - 1])
            last = token.end()
        if depth == 0:
            args.append(rest[last : token.end() - 1])
            return args
    return []


def conditional_all(sql: str, selections: Selections) -> str:
    """The plugin's applyConditionalAll, last occurrence first as it does."""
    macro = "$__conditionalAll("
    at = sql.rfind(macro)
    while at != -1:
        params = _macro_args(sql, at + len(macro) - 1)
        assert len(params) == 2, f"$__conditionalAll needs 2 arguments: {sql[at : at + 120]}"
        name = re.search(r"(?<=\$\{)\w+(?=\})|(?<=\$)\w+", params[1].strip())
        assert name and name.group() in selections, f"unknown variable in {params[1]!r}"
        value = selections[name.group()]
        phrase = "1=1" if value is ALL or value in ([], [""], "") else params[0]
        sql = sql.replace(f"{macro}{params[0]},{params[1]})", phrase, 1)
        at = sql.rfind(macro)
    return sql


# Grafana's variable syntax (public/app/features/variables/utils.ts, variableRegex).
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)


def template_variables(sql: str, selections: Selections) -> str:
    """Grafana's templateSrv.replace with the plugin's format function."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(6)
        if name not in selections:
            return match.group(0)  # not a variable ($__timeFilter...): left for the back end
        value = selections[name]
        assert value is not ALL, (
            f"${name} outside $__conditionalAll would expand to every value when All is selected"
        )
        values = value if isinstance(value, list) else [value]
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
        if fmt == "sqlstring":
            return ",".join("'" + v.replace("'", "''") + "'" for v in values)
        assert fmt is None, f"format {fmt!r} of ${name} is not handled"
        return "'" + "','".join(values) + "'" if isinstance(value, list) else value

    return _VARIABLE.sub(replace, sql)


@dataclass(frozen=True)
class Query:
    start: datetime
    end: datetime
    interval_s: int = 60


def _unix(at: datetime) -> int:
    return int(at.timestamp())


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _datetime(at: datetime) -> str:
    return f"toDateTime({_unix(at)})"


def _datetime64(at: datetime) -> str:
    return f"fromUnixTimestamp64Milli({_ms(at)})"


def _date(at: datetime) -> str:
    return f"toDate('{at.astimezone(UTC):%Y-%m-%d}')"


# The plugin's back-end macro table (pkg/macros/macros.go): name -> (arguments, SQL).
MACROS: dict[str, tuple[int, Callable[[Query, list[str]], str]]] = {
    "fromTime": (0, lambda q, a: _datetime(q.start)),
    "toTime": (0, lambda q, a: _datetime(q.end)),
    "fromTime_ms": (0, lambda q, a: _datetime64(q.start)),
    "toTime_ms": (0, lambda q, a: _datetime64(q.end)),
    "timeFilter": (
        1,
        lambda q, a: f"{a[0]} >= {_datetime(q.start)} AND {a[0]} <= {_datetime(q.end)}",
    ),
    "timeFilter_ms": (
        1,
        lambda q, a: f"{a[0]} >= {_datetime64(q.start)} AND {a[0]} <= {_datetime64(q.end)}",
    ),
    "dateFilter": (1, lambda q, a: f"{a[0]} >= {_date(q.start)} AND {a[0]} <= {_date(q.end)}"),
    "dateTimeFilter": (
        2,
        lambda q, a: (
            f"({a[0]} >= {_date(q.start)} AND {a[0]} <= {_date(q.end)}) AND "
            f"({a[1]} >= {_datetime(q.start)} AND {a[1]} <= {_datetime(q.end)})"
        ),
    ),
    "timeInterval": (
        1,
        lambda q, a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {q.interval_s} second)",
    ),
    "timeInterval_ms": (
        1,
        lambda q, a: (
            f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {q.interval_s * 1000} millisecond)"
        ),
    ),
    "interval_s": (0, lambda q, a: str(q.interval_s)),
}
MACROS["dt"] = MACROS["dateTimeFilter"]


def backend_macros(sql: str, query: Query) -> str:
    # Longest names first; a name must end at a word boundary ($__timeFilter vs $__timeFilter_ms).
    for name in sorted(MACROS, key=len, reverse=True):
        arity, expand = MACROS[name]
        pattern = re.compile(rf"\$__{name}\b")
        while match := pattern.search(sql):
            args: list[str] = []
            end = match.end()
            if end < len(sql) and sql[end] == "(":
                args = [a.strip() for a in _macro_args(sql, end)]
                depth = 0
                for i in range(end, len(sql)):
                    depth += {"(": 1, ")": -1}.get(sql[i], 0)
                    if depth == 0:
                        end = i + 1
                        break
            assert len(args) == arity, f"$__{name} takes {arity} argument(s), got {args}"
            sql = sql[: match.start()] + expand(query, args) + sql[end:]
    return sql


def global_variables(sql: str, query: Query) -> str:
    """Grafana's ``${__from}`` and ``${__to}``: the range's bounds, Unix milliseconds."""
    return sql.replace("${__from}", str(_ms(query.start))).replace("${__to}", str(_ms(query.end)))


def render(sql: str, query: Query, selections: Selections) -> str:
    """The SQL ClickHouse receives; fails on anything the plugin would leave unexpanded."""
    sql = global_variables(conditional_all(sql, selections), query)
    sql = backend_macros(template_variables(sql, selections), query)
    leftover = re.search(r"\$\S*", sql)
    assert leftover is None, f"macro the plugin does not define: {leftover.group()!r} in\n{sql}"
    return sql


# -- the dashboard -------------------------------------------------------------------------------


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in DASHBOARD["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # rows
    return found


def query_panels() -> list[dict[str, Any]]:
    return [p for p in panels() if p["type"] != "row"]


def panel(title: str) -> dict[str, Any]:
    (found,) = [p for p in query_panels() if p["title"] == title]
    return found


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in DASHBOARD["templating"]["list"]}


def anomaly_annotation() -> dict[str, Any]:
    (found,) = [
        a for a in DASHBOARD["annotations"]["list"] if a.get("datasource", {}).get("type") == PLUGIN
    ]
    return found


def _duration(text: str) -> timedelta:
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    assert re.fullmatch(r"\d+[smhd]", text), text
    return timedelta(**{units[text[-1]]: int(text[:-1])})


def panel_query(p: dict[str, Any], start: datetime, end: datetime) -> Query:
    """The range and interval Grafana gives a panel: its own relative range, its min interval."""
    if p.get("timeFrom"):
        start = end - _duration(p["timeFrom"])
    interval = _duration(p["interval"]) if p.get("interval") else timedelta(minutes=1)
    return Query(start, end, int(interval.total_seconds()))


def datasource_uid() -> str:
    (ds,) = DATASOURCES["datasources"]
    return str(ds["uid"])


def _tables(sql: str) -> set[str]:
    return set(re.findall(r"\b(?:FROM|JOIN)\s+([A-Za-z_][\w.]*)", sql, flags=re.IGNORECASE))


def test_dashboard_structure() -> None:
    assert DASHBOARD["uid"] == "tollgate-finops"
    assert DASHBOARD["title"] and 36 <= DASHBOARD["schemaVersion"] <= 41
    uid = datasource_uid()
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids collide"
    for p in query_panels():
        assert p["datasource"] == {"type": PLUGIN, "uid": uid}, p["title"]
        grid = p["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": PLUGIN, "uid": uid}, p["title"]
            assert t["editorType"] == "sql" and t["rawSql"].strip(), p["title"]
            assert t["refId"], p["title"]
            # queryType and format agree (the plugin maps timeseries -> 0, table -> 1).
            assert (t["queryType"], t["format"]) in {("timeseries", 0), ("table", 1)}, p["title"]
            if p["type"] == "timeseries":
                assert t["queryType"] == "timeseries", p["title"]
            tables = _tables(t["rawSql"])
            assert tables and tables <= ROLLUPS | SMALL_TABLES | SHARED_VIEWS, (p["title"], tables)
            assert not tables & RAW_TABLES, f"{p['title']} scans raw events"
    # No two panels overlap on the grid.
    cells: dict[tuple[int, int], str] = {}
    for p in query_panels():
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]

    found = variables()
    assert set(found) == {"feature", "model"}
    for name, v in found.items():
        assert v["type"] == "query" and v["datasource"] == {"type": PLUGIN, "uid": uid}, name
        assert v["query"]["editorType"] == "sql" and "usage_minute" in v["query"]["rawSql"], name
        assert v["includeAll"] and v["multi"] and v["current"]["value"] == ["$__all"], name
        assert v["refresh"] == 2, name  # re-read on time range change
    # The variables filter the panels on the minute rollup.
    filtered = [p["title"] for p in query_panels() if "$feature" in json.dumps(p["targets"])]
    assert {"Spend", "Spend by model", "Spend by feature", "Savings decomposition"} <= set(filtered)

    annotation = anomaly_annotation()
    assert annotation["datasource"] == {"type": PLUGIN, "uid": uid} and annotation["enable"]
    sql = annotation["target"]["rawSql"]
    assert annotation["target"]["editorType"] == "sql"
    assert "alert_events" in sql and "status = 'firing'" in sql
    assert "kind != 'budget_threshold'" in sql
    daily = panel("Daily cost, last 30 days")
    assert daily["timeFrom"] == "30d" and daily["id"] in annotation["filter"]["ids"]


def test_provisioning_points_at_the_compose_services() -> None:
    (ds,) = DATASOURCES["datasources"]
    assert ds["type"] == PLUGIN and ds["uid"] == datasource_uid()
    clickhouse = COMPOSE["services"][ds["jsonData"]["host"]]
    assert clickhouse["image"].startswith("clickhouse/clickhouse-server:")
    assert any(str(p).endswith(f":{ds['jsonData']['port']}") for p in clickhouse["ports"])
    assert ds["jsonData"]["protocol"] == "http"  # 8123 is the HTTP interface
    env = clickhouse["environment"]
    assert ds["jsonData"]["username"] == env["CLICKHOUSE_USER"]
    assert ds["jsonData"]["defaultDatabase"] == env["CLICKHOUSE_DB"]
    assert ds["secureJsonData"]["password"] == env["CLICKHOUSE_PASSWORD"]
    # The sink writes to the same database Grafana reads.
    sink_url = COMPOSE["x-tollgate-env"]["TOLLGATE_CLICKHOUSE_URL"]
    assert sink_url.endswith(f"@{ds['jsonData']['host']}:8123/{env['CLICKHOUSE_DB']}")

    grafana = COMPOSE["services"]["grafana"]
    assert PLUGIN in grafana["environment"]["GF_INSTALL_PLUGINS"].split(",")
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = (REPO / source).resolve()
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    (provider,) = PROVIDERS["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == DASHBOARD_FILE.parent.resolve()


def test_every_query_renders_without_leftover_macros() -> None:
    start = datetime(2023, 5, 1, tzinfo=UTC)
    end = start + timedelta(days=1)
    for selections in (EVERYTHING, {"feature": ["a'b", "c"], "model": ["m"]}):
        for p in query_panels():
            for t in p["targets"]:
                sql = render(t["rawSql"], panel_query(p, start, end), selections)
                assert f">= toDateTime({_unix(panel_query(p, start, end).start)})" in sql or (
                    "budget_decisions" in sql
                ), p["title"]
    rendered = render(
        panel("Spend")["targets"][0]["rawSql"],
        Query(start, end),
        {"feature": ["a'b", "c"], "model": ["m"]},
    )
    assert "IN ('a\\'b','c')" in rendered and "model_served IN ('m')" in rendered
    assert "1=1" in render(panel("Spend")["targets"][0]["rawSql"], Query(start, end), EVERYTHING)


# -- the warehouse -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    client: Any
    day: datetime
    tag: str

    @property
    def start(self) -> datetime:
        return self.day

    @property
    def end(self) -> datetime:
        return self.day + timedelta(days=1)

    def t(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def run(self, title: str, selections: Selections = EVERYTHING) -> list[dict[str, Any]]:
        p = panel(title)
        (target,) = p["targets"]
        return self.query(target["rawSql"], panel_query(p, self.start, self.end), selections)

    def query(self, sql: str, query: Query, selections: Selections) -> list[dict[str, Any]]:
        result = self.client.query(render(sql, query, selections))
        return [dict(zip(result.column_names, row, strict=True)) for row in result.result_rows]

    def variable(self, name: str, selections: Selections = EVERYTHING) -> list[str]:
        sql = variables()[name]["query"]["rawSql"]
        return [
            row[next(iter(row))] for row in self.query(sql, Query(self.start, self.end), selections)
        ]


D = Decimal


def _usage(
    f: Fixture,
    at: datetime,
    user: str,
    feature: str | None,
    served: str,
    tier: str | None,
    cost: str,
    baseline: str,
    requested: str | None,
    *,
    asked: str | None = None,
    cache_saved: str = "0",
    prompt_cache_saved: str = "0",
    cache_hit: bool = False,
    status: str = "ok",
) -> list[Any]:
    return [
        uuid.uuid4().hex,
        at,
        uuid.uuid4().hex,
        f.t(user),
        f.t(feature) if feature else None,
        tier,
        "openai",
        "gateway",
        asked or served,
        served,
        "gpt-4",
        1000,
        100,
        0,
        D(cost),
        D(baseline),
        D(requested) if requested is not None else None,
        D(cache_saved),
        D(prompt_cache_saved),
        requested is None,
        cache_hit,
        status,
        500 if status != "ok" else 200,
        None,  # team: set from TEAMS
    ]


USAGE_COLUMNS = [
    "event_id", "ts", "request_id", "user_id", "feature", "tier", "provider", "source",
    "model_requested", "model_served", "baseline_model", "prompt_tokens", "completion_tokens",
    "cached_tokens", "cost_usd", "baseline_cost_usd", "requested_cost_usd", "cache_saved_usd",
    "prompt_cache_saved_usd", "price_unknown", "cache_hit", "status", "http_status", "team",
]  # fmt: skip
TEAMS = {"alice": "red", "bob": "blue"}
REQUEST_COLUMNS = ["event_id", "ts", "request_id", "user_id", "feature", "team", "endpoint",
                   "model_requested", "tier", "status", "reason", "blocked_scope"]  # fmt: skip


@pytest.fixture(scope="module")
def warehouse(clickhouse: Any) -> Fixture:
    migrate(clickhouse)
    day = private_day(before=51, after=42)
    f = Fixture(clickhouse, day, f"gf{random.randrange(16**6):06x}")
    at = day + timedelta(hours=10, seconds=20)
    minute = timedelta(minutes=1)
    earlier = day - timedelta(days=3) + timedelta(hours=12)
    usage = [
        _usage(f, at, "alice", "chat", "gpt-4o-mini", "economy", "0.15", "30", "2.5", asked="gpt-4o"),
        _usage(f, at + minute, "alice", "chat", "gpt-4o", "standard", "0", "30", "2.5",
               cache_saved="2.5", cache_hit=True),
        _usage(f, at + 2 * minute, "bob", "search", "gpt-4o", "standard", "1.875", "30", "2.5",
               prompt_cache_saved="0.625"),
        _usage(f, at + 3 * minute, "bob", "search", "mystery-model", None, "0", "0", None),
        _usage(f, at + 4 * minute, "carol", None, "gpt-4o-mini", "economy", "0.05", "1", "0.05",
               status="error"),
        _usage(f, earlier, "alice", "chat", "gpt-4o", "standard", "1", "12", "1"),
        _usage(f, earlier + minute, "dave", "agent", "gpt-4o", None, "0", "0", None,
               status="dispatcher_lost"),
        _usage(f, earlier + 2 * minute, "dave", "agent", "gpt-4o", None, "0", "0", None,
               status="timeout"),
    ]  # fmt: skip
    for row in usage:
        user = row[3].removeprefix(f"{f.tag}-")
        row[-1] = f.t(TEAMS[user]) if user in TEAMS else None
    clickhouse.insert("usage_events", usage, column_names=USAGE_COLUMNS)

    def outcome(n: int, after: int, feature: str, kind: str, value: str | None) -> list[Any]:
        # the outcome of call n (1-based, as in the table above), posted by its user
        call = usage[n - 1]
        return [uuid.uuid4().hex, at + after * minute, call[2], call[3], f.t(feature), kind,
                D(value) if value is not None else None]  # fmt: skip

    outcomes = [
        outcome(1, 10, "chat", "success", None),
        outcome(2, 11, "chat", "failure", None),
        outcome(3, 12, "search", "success", "5"),
        outcome(5, 13, "search", "success", "3"),  # carol's call failed: never served
        outcome(7, 14, "agent", "success", "4"),  # its dispatcher died: maybe served
        outcome(8, 15, "agent", "success", "7"),  # timed out: never served
    ]
    clickhouse.insert(
        "outcome_events",
        outcomes,
        column_names=["event_id", "ts", "request_id", "user_id", "feature", "outcome", "value_usd"],
    )

    def request(after: int, user: str, feature: str | None, model: str, status: str,
                reason: str) -> list[Any]:  # fmt: skip
        team = f.t(TEAMS[user]) if user in TEAMS else None
        return [uuid.uuid4().hex, at + after * minute, uuid.uuid4().hex, f.t(user),
                f.t(feature) if feature else None, team, "/v1/chat/completions", model,
                "standard", status, reason, f"user:{f.t(user)}"]  # fmt: skip

    clickhouse.insert(
        "request_events",
        [
            request(1, "alice", "chat", "gpt-4o", "blocked", "budget_exceeded"),
            request(5, "alice", "chat", "gpt-4o", "blocked", "budget_exceeded"),
            request(6, "carol", None, "gpt-4o-mini", "blocked", "budget_exceeded"),
            request(7, "bob", "search", "gpt-4o", "rejected", "invalid_request_error"),
        ],
        column_names=REQUEST_COLUMNS,
    )

    def alert(ts: datetime, kind: str, status: str) -> list[Any]:
        scope = f"feature:{f.t('chat')}"
        return [uuid.uuid4().hex, ts, f"{kind}|{scope}", kind, scope, "warning", status, 9.0,
                1.0, 20.0, "usd", 60, ts, ts, f"{kind} test", {}]  # fmt: skip

    clickhouse.insert(
        "alert_events",
        [
            alert(at + 2 * minute, "cost_per_request", "firing"),
            alert(at + 3 * minute, "budget_threshold", "firing"),
            alert(at + 5 * minute, "volume_spike", "resolved"),
        ],
        column_names=[
            "event_id", "ts", "alert_key", "kind", "scope", "severity", "status", "score",
            "expected", "observed", "unit", "window_seconds", "first_seen", "last_seen",
            "message", "details",
        ],
    )  # fmt: skip

    def decision(
        ts: datetime, scope: str, state: str, spent: str, limit: str, resets: datetime
    ) -> list[Any]:
        return [uuid.uuid4().hex, ts, scope, state, D(spent), D(limit), "month",
                ts.replace(day=1, hour=0, minute=0, second=0), resets, ts, None, "spend"]  # fmt: skip

    later = day + timedelta(days=40)
    clickhouse.insert(
        "budget_decisions",
        [
            decision(day + timedelta(hours=9), f"user:{f.t('alice')}", "open", "2", "10", later),
            decision(day + timedelta(hours=11), f"user:{f.t('alice')}", "warn", "8", "10", later),
            decision(day + timedelta(hours=12), f"feature:{f.t('chat')}", "blocked", "12", "10",
                     later),
            # A period that ended before the end of the range: open again at $0.
            decision(day + timedelta(hours=1), f"team:{f.t('old')}", "blocked", "5", "5",
                     day + timedelta(hours=5)),
            # A period that ended more than 35 days earlier: history, not status.
            decision(day - timedelta(days=50), f"team:{f.t('ancient')}", "warn", "9", "10",
                     day - timedelta(days=40)),
            # A decision after the end of the range is not the state at its end.
            decision(day + timedelta(days=2), f"user:{f.t('alice')}", "blocked", "11", "10",
                     later),
        ],
        column_names=[
            "event_id", "ts", "scope", "state", "spent_usd", "limit_usd", "period",
            "period_start", "resets_at", "counted_through", "threshold", "reason",
        ],
    )  # fmt: skip
    return f


def test_every_panel_variable_and_annotation_query_runs(warehouse: Fixture) -> None:
    f = warehouse
    selections = [
        EVERYTHING,
        {"feature": [f.t("chat"), "(none)"], "model": ALL},
        {"feature": ALL, "model": ["gpt-4o", "mystery-model"]},
    ]
    for chosen in selections:
        for p in query_panels():
            rows = f.run(p["title"], chosen)
            assert rows or chosen is not EVERYTHING, f"{p['title']} is empty on the fixture"
            if p["targets"][0]["queryType"] == "timeseries" and rows:
                # The plugin (sqlds) needs a "time" column, sorted for its long-to-wide step.
                times = [r["time"] for r in rows]
                assert times == sorted(times), p["title"]
        for name in variables():
            assert f.variable(name, chosen), name
        marks = f.query(anomaly_annotation()["target"]["rawSql"], Query(f.start, f.end), chosen)
        assert {"time", "text", "tags"} <= set(marks[0]), "annotation columns"


def test_headline_stats(warehouse: Fixture) -> None:
    f = warehouse

    def value(title: str, selections: Selections = EVERYTHING) -> Any:
        (row,) = f.run(title, selections)
        return row if len(row) > 1 else next(iter(row.values()))

    assert value("Spend") == D("2.075")
    assert value("Baseline cost") == D("91")
    assert value("Savings vs baseline") == D("88.925")
    assert value("Savings %") == pytest.approx(88.925 / 91)
    assert value("Requests") == 5
    assert value("Error rate") == pytest.approx(0.2)
    assert value("Cache hit rate") == pytest.approx(0.2)
    assert value("Cache savings") == {"Cache hits": D("2.5"), "Prompt cache": D("0.625")}
    # The variables filter: a feature, the unattributed requests, a model.
    assert value("Spend", {"feature": [f.t("chat")], "model": ALL}) == D("0.15")
    assert value("Spend", {"feature": ["(none)"], "model": ALL}) == D("0.05")
    assert value("Spend", {"feature": ALL, "model": ["gpt-4o"]}) == D("1.875")
    assert value("Requests", {"feature": [f.t("search")], "model": ["gpt-4o"]}) == 1

    # The same totals as the reports API (app/warehouse/reports.py) on the same range.
    window = reports.Range(f.start, f.end)
    summary = reports.summary(f.client, window)
    assert (summary.cost_usd, summary.baseline_cost_usd) == (value("Spend"), value("Baseline cost"))


def test_spend_over_time(warehouse: Fixture) -> None:
    f = warehouse
    by_model: dict[str, Decimal] = {}
    for row in f.run("Spend by model"):
        by_model[row["model"]] = by_model.get(row["model"], D(0)) + row["spend"]
    assert by_model == {"gpt-4o-mini": D("0.2"), "gpt-4o": D("1.875"), "mystery-model": D(0)}
    rows = f.run("Spend by feature")
    assert [r["time"].minute for r in rows] == [0, 1, 2, 3, 4]  # one-minute buckets, in order
    assert [(r["feature_name"], r["spend"]) for r in rows] == [
        (f.t("chat"), D("0.15")),
        (f.t("chat"), D(0)),
        (f.t("search"), D("1.875")),
        (f.t("search"), D(0)),
        ("(none)", D("0.05")),
    ]

    accumulated = f.run("Accumulated savings vs baseline")
    assert [r["Accumulated savings"] for r in accumulated] == [
        D("29.85"),
        D("59.85"),
        D("87.975"),
        D("87.975"),
        D("88.925"),
    ]
    assert accumulated[-1]["Accumulated spend"] == D("2.075")
    assert accumulated[-1]["Accumulated baseline cost"] == D("91")

    health = f.run("Requests and error rate")
    assert [r["Requests"] for r in health] == [1, 1, 1, 1, 1]
    assert [r["Error rate"] for r in health] == [0, 0, 0, 0, 1]
    routing = f.run("Routing health: economy-tier share")
    assert [r["Economy-tier share"] for r in routing] == [1, 0, 0, 0, 1]
    assert [r["Down-tiered share"] for r in routing] == [1, 0, 0, None, 0]

    daily = f.run("Daily cost, last 30 days")
    assert [(r["time"].date(), r["Spend"], r["Baseline cost"]) for r in daily] == [
        ((f.day - timedelta(days=3)).date(), D("1"), D("12")),
        (f.day.date(), D("2.075"), D("91")),
    ]


def test_savings_decomposition_matches_the_reports_api(warehouse: Fixture) -> None:
    f = warehouse
    parts = {r["Component"]: r["Saved (USD)"] for r in f.run("Savings decomposition")}
    assert parts == {
        "Model choice": D("83.45"),
        "Routing": D("2.35"),
        "Prompt cache": D("0.625"),
        "Cache": D("2.5"),
    }
    assert sum(parts.values()) == D("88.925")
    decomposition = reports.savings(f.client, reports.Range(f.start, f.end))["decomposition"]
    assert {k: D(v) for k, v in decomposition.items()} == {
        "model_choice_usd": parts["Model choice"],
        "routing_usd": parts["Routing"],
        "prompt_cache_usd": parts["Prompt cache"],
        "cache_usd": parts["Cache"],
    }
    # One feature: alice's cached chat call and the down-tiered one.
    chat = {
        r["Component"]: r["Saved (USD)"]
        for r in f.run("Savings decomposition", {"feature": [f.t("chat")], "model": ALL})
    }
    assert chat == {
        "Model choice": D("55"),
        "Routing": D("2.35"),
        "Prompt cache": D(0),
        "Cache": D("2.5"),
    }


def test_top_users_and_cost_per_outcome(warehouse: Fixture) -> None:
    f = warehouse
    users = f.run("Top users by spend")
    assert [(u["User"], u["Spend"], u["Requests"], u["Errors"]) for u in users] == [
        (f.t("bob"), D("1.875"), 2, 0),
        (f.t("alice"), D("0.15"), 2, 0),
        (f.t("carol"), D("0.05"), 1, 1),
    ]
    assert users[1]["Savings"] == D("59.85")
    api = reports.breakdown(f.client, reports.Range(f.start, f.end), "user", limit=3)
    assert [(r["user"], D(r["cost_usd"])) for r in api] == [(u["User"], u["Spend"]) for u in users]

    outcomes = {r["Feature"]: r for r in f.run("Cost per successful outcome by feature")}
    assert set(outcomes) == {f.t("search"), f.t("chat"), f.t("agent"), "(none)"}
    search, chat, none = outcomes[f.t("search")], outcomes[f.t("chat")], outcomes["(none)"]
    # carol's success was posted for a call that failed: not one of search's successes
    assert (search["Spend"], search["Successes"], search["Cost per success"]) == (
        D("1.875"),
        1,
        D("1.875"),
    )
    assert (search["Outcomes"], search["Outcomes on failed calls"]) == (1, 1)
    assert search["Value"] == D("5") and search["ROI"] == pytest.approx(5 / 1.875)
    assert (chat["Outcomes"], chat["Successes"], chat["Success rate"]) == (2, 1, 0.5)
    assert chat["Cost per success"] == D("0.15") and chat["ROI"] is None
    assert (none["Requests"], none["Outcomes"], none["Cost per success"]) == (1, 0, None)
    # dave's calls were before the range: the outcome of the one whose dispatcher died
    # counts, the one of the call that timed out does not; no call in range, no cost
    agent = outcomes[f.t("agent")]
    assert (agent["Requests"], agent["Outcomes"], agent["Successes"], agent["Value"]) == (
        0,
        1,
        1,
        D("4"),
    )
    assert (agent["Outcomes on failed calls"], agent["Cost per success"]) == (1, None)

    # Every figure is the reports API's on the same range.
    api_rows = {r["feature"]: r for r in reports.outcomes(f.client, reports.Range(f.start, f.end))}
    assert set(api_rows) == set(outcomes)
    for name, row in outcomes.items():
        api = api_rows[name]
        assert D(api["cost_usd"]) == row["Spend"], name
        assert api["requests"] == row["Requests"], name
        assert (api["outcomes"], api["successes"]) == (row["Outcomes"], row["Successes"]), name
        assert api["outcomes_on_failed_calls"] == row["Outcomes on failed calls"], name
        assert D(api["value_usd"]) == row["Value"], name
        api_cost = api["cost_per_success_usd"]
        assert (D(api_cost) if api_cost is not None else None) == row["Cost per success"], name
        assert api["success_rate"] == (
            pytest.approx(row["Success rate"]) if row["Success rate"] is not None else None
        ), name
    only_chat = f.run(
        "Cost per successful outcome by feature", {"feature": [f.t("chat")], "model": ALL}
    )
    assert [r["Feature"] for r in only_chat] == [f.t("chat")]


def test_budget_status_alerts_and_annotations(warehouse: Fixture) -> None:
    f = warehouse
    mine = {r["Scope"]: r for r in f.run("Budget cap status") if f.tag in r["Scope"]}
    assert list(mine) == [
        f"feature:{f.t('chat')}",  # most used first
        f"user:{f.t('alice')}",
        f"team:{f.t('old')}",
    ]
    chat, alice, old = mine.values()
    assert (chat["State"], chat["Spent"], chat["Limit"], chat["Used"]) == (
        "blocked",
        D("12"),
        D("10"),
        pytest.approx(1.2),
    )
    assert (alice["State"], alice["Spent"], alice["Used"]) == ("warn", D("8"), pytest.approx(0.8))
    assert (old["State"], old["Spent"], old["Used"]) == ("open", D(0), 0)
    # The reports API reads the same state when "now" is the end of the range (it has no
    # notion of decisions after now, so alice's later decision is left out of its input here).
    api = {
        r["scope"]: r
        for r in reports.budgets(f.client, now=f.end)
        if f.tag in r["scope"] and r["scope"] != f"user:{f.t('alice')}"
    }
    assert {s: (r["state"], D(r["spent_usd"])) for s, r in api.items()} == {
        s: (r["State"], r["Spent"]) for s, r in mine.items() if s != f"user:{f.t('alice')}"
    }

    alerts = [a for a in f.run("Recent alerts") if f.tag in a["Scope"]]
    assert [(a["Kind"], a["Status"]) for a in alerts] == [
        ("volume_spike", "resolved"),  # newest first
        ("budget_threshold", "firing"),
        ("cost_per_request", "firing"),
    ]

    annotation = anomaly_annotation()["target"]["rawSql"]
    marks = [
        m for m in f.query(annotation, Query(f.start, f.end), EVERYTHING) if f.tag in m["text"]
    ]
    assert len(marks) == 1 and marks[0]["text"].startswith("cost_per_request on feature:")
    assert marks[0]["tags"].split(",") == ["cost_per_request", "warning"]


def test_variables_list_the_rollups_values(warehouse: Fixture) -> None:
    f = warehouse
    assert f.variable("feature") == ["(none)", f.t("chat"), f.t("search")]
    assert f.variable("model") == ["gpt-4o", "gpt-4o-mini", "mystery-model"]
    assert f.variable("model", {"feature": [f.t("search")], "model": ALL}) == [
        "gpt-4o",
        "mystery-model",
    ]


def test_budget_refusals_and_spend_by_team_match_the_reports_api(warehouse: Fixture) -> None:
    f = warehouse
    window = reports.Range(f.start, f.end)
    refused = f.run("Calls refused by budget caps (402)")
    assert [(r["time"].minute, r["Refused (402)"]) for r in refused] == [(1, 1), (5, 1), (6, 1)]
    assert sum(r["Refused (402)"] for r in refused) == reports.summary(f.client, window).refused
    # The feature and model variables filter it (the model asked for: none was served).
    chat = f.run("Calls refused by budget caps (402)", {"feature": [f.t("chat")], "model": ALL})
    assert [r["Refused (402)"] for r in chat] == [1, 1]
    mini = f.run("Calls refused by budget caps (402)", {"feature": ALL, "model": ["gpt-4o-mini"]})
    assert [(r["time"].minute, r["Refused (402)"]) for r in mini] == [(6, 1)]

    teams = f.run("Spend by team")
    assert [
        (t["Team"], t["Spend"], t["Requests"], t["Errors"], t["Refused (402)"]) for t in teams
    ] == [
        (f.t("blue"), D("1.875"), 2, 0, 0),
        (f.t("red"), D("0.15"), 2, 0, 2),
        ("(none)", D("0.05"), 1, 1, 1),
    ]
    assert teams[1]["Savings"] == D("59.85")
    api = reports.breakdown(f.client, window, "team")
    assert [
        (r["team"], D(r["cost_usd"]), r["requests"], r["errors"], r["refused"], D(r["savings_usd"]))
        for r in api
    ] == [
        (t["Team"], t["Spend"], t["Requests"], t["Errors"], t["Refused (402)"], t["Savings"])
        for t in teams
    ]
