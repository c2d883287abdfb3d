"""The `tollgate` command line: thin wrappers over the modules that own each job."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, NoReturn

import click
from pydantic import ValidationError
from wcwidth import wcswidth

from app.pricing.catalog import usd_text
from app.settings import Settings, describe_settings


def _settings() -> Settings:
    from app.logs import configure_logging

    try:
        settings = Settings()
    except ValidationError as exc:  # values are hidden: some settings are secrets
        problems = [
            f"TOLLGATE_{'_'.join(str(p) for p in error['loc'][:1]).upper()}"
            f"{''.join(f'[{p}]' for p in error['loc'][1:])}: {error['msg']}"
            for error in exc.errors()
        ]
        _fail("invalid settings:\n  " + "\n  ".join(problems))
    except (FileNotFoundError, OSError, ValueError) as exc:
        _fail(f"invalid settings: {exc}")
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tollgate", prog_name="tollgate")
def main() -> None:
    """Tollgate: real-time FinOps gateway for LLM traffic."""


# -- kafka -------------------------------------------------------------------
@main.group()
def kafka() -> None:
    """Run a local single-node Kafka (KRaft) from Maven Central jars."""


@kafka.command("start")
def kafka_start() -> None:
    """Start the local broker (fetches the jars the first time)."""
    from devtools.kafka_local import LauncherError, LocalKafka

    settings = _settings()
    try:
        result = LocalKafka(settings).start()
    except LauncherError as exc:
        _fail(str(exc))
        return
    if result.already_running:
        click.echo(f"Kafka already running on {result.bootstrap} (pid {result.pid})")
        return
    if result.downloaded:
        click.echo(f"fetched Kafka {settings.kafka_version} jars in {result.download_seconds:.1f}s")
    kind = "first start" if result.downloaded else "warm start"
    click.echo(
        f"Kafka {settings.kafka_version} ready on {result.bootstrap} (pid {result.pid}); "
        f"{kind}: {result.start_seconds:.1f}s to ready; log {result.log_file}"
    )


@kafka.command("stop")
def kafka_stop() -> None:
    """Stop the local broker."""
    from devtools.kafka_local import LauncherError, LocalKafka

    try:
        stopped = LocalKafka(_settings()).stop()
    except LauncherError as exc:
        _fail(str(exc))
        return
    click.echo("Kafka stopped" if stopped else "Kafka was not running")


@kafka.command("status")
def kafka_status() -> None:
    """Say whether the local broker runs (exit code 3 when it does not)."""
    from devtools.kafka_local import LocalKafka

    status = LocalKafka(_settings()).status()
    if status.running:
        click.echo(f"Kafka running on {status.bootstrap} (pid {status.pid}); log {status.log_file}")
    else:
        click.echo(f"Kafka not running (would listen on {status.bootstrap})")
        sys.exit(3)


# -- topics ------------------------------------------------------------------
@main.group()
def topics() -> None:
    """Kafka topics."""


@topics.command("ensure")
def topics_ensure() -> None:
    """Create Tollgate's topics if missing; report any that are misconfigured."""
    from app.events.topics import TopicsError, ensure_topics

    settings = _settings()
    try:
        report = asyncio.run(ensure_topics(settings))
    except TopicsError as exc:
        _fail(str(exc))
        return
    for name in report.created:
        click.echo(f"created  {name}")
    for name in report.existing:
        click.echo(f"exists   {name}")
    if not report.ok:
        _fail("topics do not match:\n  " + "\n  ".join(report.problems))


# -- schemas -----------------------------------------------------------------
@main.group()
def schemas() -> None:
    """Avro event schemas (schemas/)."""


@schemas.command("register")
def schemas_register() -> None:
    """Give changed schemas new fixed ids and freeze them under schemas/history/."""
    from app.events.codec import SchemaCatalog

    added = SchemaCatalog().register_changes()
    for version in added:
        click.echo(f"id {version.schema_id}: {version.name} v{version.version} -> {version.file}")
    if not added:
        click.echo("no schema changed")


# -- budgets -----------------------------------------------------------------
class DispatcherApi:
    """The dispatcher's HTTP API for the CLI (``--url``): JSON in, JSON out, errors as exits."""

    def __init__(self, url: str, key: str | None) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            _fail(f"--url {url!r} is not an http(s) URL; e.g. --url http://127.0.0.1:8700")
        self.url = url.rstrip("/")
        self.key = key

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
        """(status, JSON body) of a 2xx or 404; any other answer ends the command with its
        error message."""
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(
            self.url + urllib.parse.quote(path, safe="/:*"),
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read() or b"{}")
            except ValueError:
                payload = {}
            error = payload.get("error") if isinstance(payload, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            if exc.code == 404 and isinstance(error, dict):
                return 404, payload
            hint = ""
            if exc.code in (401, 403):
                hint = " (give an admin key: --key or TOLLGATE_ADMIN_KEY)"
            _fail(f"{method} {self.url}{path}: HTTP {exc.code}: {message or exc.reason}{hint}")
        except OSError as exc:
            _fail(
                f"no dispatcher at {self.url} ({exc}); is `tollgate serve` (or `make up`) running?"
            )


def _dispatcher_options(command: Any) -> Any:
    """``--url`` (go through a dispatcher's HTTP API) and ``--key`` (its admin key)."""
    command = click.option(
        "--key",
        default=None,
        help="Admin API key for --url (default TOLLGATE_ADMIN_KEY); needed when the "
        "dispatcher has a keys file.",
    )(command)
    return click.option(
        "--url",
        default=None,
        metavar="URL",
        help="Go through the dispatcher's HTTP API at URL (e.g. http://127.0.0.1:8700) "
        "instead of reading and writing Kafka directly.",
    )(command)


def _api(settings: Settings, url: str, key: str | None) -> DispatcherApi:
    secret = key or (settings.admin_key.get_secret_value() if settings.admin_key else None)
    return DispatcherApi(url, secret)


@main.group()
def budgets() -> None:
    """Budget caps (published to Kafka; every dispatcher and the spend worker follow them).

    Without --url the commands talk to Kafka (TOLLGATE_KAFKA_BOOTSTRAP, TOLLGATE_TOPIC_PREFIX);
    with --url they go through a dispatcher, which checks the admin key.
    """


@budgets.command("set")
@click.argument("scope")
@click.option("--monthly", type=str, help="Monthly limit in USD.")
@click.option("--daily", type=str, help="Daily limit in USD.")
@click.option(
    "--window",
    type=str,
    help="Fixed window length, e.g. 1h (with --limit): epoch-aligned windows (00:00-01:00 UTC, ...), not rolling.",
)
@click.option("--limit", "window_limit", type=str, help="Limit in USD for --window.")
@click.option("--thresholds", default="0.5,0.8,1.0", show_default=True, help="Soft thresholds.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA zone of day/month.")
@click.option("--upgrade-url", default=None, help="Shown in the 402 body.")
@click.option("--upgrade-prompt", default=None, help="Shown in the 402 body.")
@_dispatcher_options
def budgets_set(
    scope: str,
    monthly: str | None,
    daily: str | None,
    window: str | None,
    window_limit: str | None,
    thresholds: str,
    timezone: str,
    upgrade_url: str | None,
    upgrade_prompt: str | None,
    url: str | None,
    key: str | None,
) -> None:
    """Cap SCOPE (global, user:ID, feature:NAME, user:* for every user), e.g. --monthly 50."""
    from app.budgets.admin import PolicyAdmin, policy_record
    from app.budgets.policy import PolicyError, parse_policy
    from app.metering.attribution import KeyStore, key_cap_warning

    chosen = [
        (p, v) for p, v in (("month", monthly), ("day", daily), ("window", window_limit)) if v
    ]
    if len(chosen) != 1:
        _fail("give exactly one of --monthly, --daily, or --window with --limit")
    period, limit = chosen[0]
    body: dict[str, object] = {"period": period, "limit_usd": limit, "timezone": timezone}
    try:
        body["thresholds"] = [float(t) for t in thresholds.split(",") if t]
    except ValueError:
        _fail(f"--thresholds {thresholds!r}: use fractions like 0.5,0.8")
    if window:
        body["window"] = window
    body.update(
        {k: v for k, v in (("upgrade_url", upgrade_url), ("upgrade_prompt", upgrade_prompt)) if v}
    )
    settings = _settings()
    try:
        policy = parse_policy(scope, body)  # the same checks, before anything is sent
    except PolicyError as exc:  # its message names the field, most often first
        _fail(str(exc) if str(exc).startswith(exc.field) else f"{exc.field}: {exc}")
    scope = policy.scope  # as calls are attributed (trimmed, NFC)
    if url:
        _, answer = _api(settings, url, key).call("PUT", f"/v1/budgets/{scope}", body)
        warning = answer.get("warning")
    else:
        asyncio.run(PolicyAdmin(settings).publish(scope, policy_record(policy, "cli")))
        keys = KeyStore.load(settings.keys_file) if settings.keys_file else None
        warning = key_cap_warning(scope, keys)
    click.echo(f"{scope}: ${usd_text(policy.limit_usd)} per {policy.period} ({policy.timezone})")
    if warning:
        click.echo(f"warning: {warning}", err=True)


@budgets.command("list")
@_dispatcher_options
def budgets_list(url: str | None, key: str | None) -> None:
    """Every budget policy."""
    from app.budgets.policy import PolicyBody, PolicyBook, PolicyError, parse_policy

    settings = _settings()
    try:
        if url:
            _, listing = _api(settings, url, key).call("GET", "/v1/budgets")
            book = PolicyBook()
            for row in listing.get("budgets", []):
                fields = {  # what a policy says (a newer dispatcher may answer more)
                    k: v
                    for k, v in row.items()
                    if v is not None and k in PolicyBody.model_fields and k != "window_seconds"
                }
                if row.get("window_seconds"):
                    fields["window"] = row["window_seconds"]
                book.put(parse_policy(row["scope"], fields))
        else:
            book = _kafka_policies(settings)
    except PolicyError as exc:
        _fail(str(exc))
        return
    for policy in sorted(book.all(), key=lambda p: p.scope):
        click.echo(
            scope_line(
                policy.scope,
                f"${usd_text(policy.limit_usd):<10} per {policy.period:<6} {policy.timezone}",
            )
        )


SCOPE_COLUMN = 32  # the scope's column in `budgets list` and `budgets status`


def scope_line(scope: str, rest: str) -> str:
    """One scope's line: the scope in its column, then ``rest``. A longer scope (ids may be
    256 characters) is printed whole on a line of its own, as `budgets rm` takes it, and
    ``rest`` below it in its column (a newcomer's probe saw it push the figures out of line)."""
    if columns(scope) <= SCOPE_COLUMN:
        return f"{pad(scope, SCOPE_COLUMN)} {rest}"
    return f"{scope}\n{'':<{SCOPE_COLUMN}} {rest}"


def columns(text: str) -> int:
    """How many terminal columns ``text`` takes: a CJK character takes two (probe 52: a
    Chinese user's figures sat 9 columns right of the others')."""
    width = wcswidth(text)
    return len(text) if width < 0 else width  # -1: a character it cannot measure


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (on its left if ``right``)."""
    fill = " " * max(0, width - columns(text))
    return fill + text if right else text + fill


def _kafka_policies(settings: Settings) -> Any:
    from app.budgets.admin import PolicyAdmin

    return asyncio.run(PolicyAdmin(settings).policies())


def _no_policy(scope: str) -> str:
    return (
        f"{scope} has no budget policy (nor a default such as user:*); "
        "`tollgate budgets list` shows the capped scopes"
    )


@budgets.command("status")
@click.argument("scope", required=False)
@_dispatcher_options
def budgets_status(scope: str | None, url: str | None, key: str | None) -> None:
    """Spent, limit and state per capped scope (exit 1 if SCOPE has no policy).

    Without --url: as the spend worker last decided. With --url: as that dispatcher sees it
    (the worker's count plus its own spend since and its requests in flight).
    """
    from app.budgets.admin import PolicyAdmin
    from app.budgets.policy import PolicyError, default_status_problem, validate_scope
    from app.pricing.catalog import nanos_to_usd

    settings = _settings()
    if scope is not None:
        try:
            scope = validate_scope(scope)
        except PolicyError as exc:
            _fail(str(exc))
        problem = default_status_problem(scope)  # as the API refuses it (probe 56)
        if problem is not None:
            _fail(problem)
    if url:
        api = _api(settings, url, key)
        if scope is None:
            scopes = [r["scope"] for r in api.call("GET", "/v1/budgets")[1].get("budgets", [])]
            scopes = [s for s in scopes if not s.endswith(":*")]  # defaults do not spend
        else:
            scopes = [scope]
        for name in scopes:
            code, status = api.call("GET", f"/v1/budgets/{name}/status")
            if code == 404:
                _fail(_no_policy(name))
            click.echo(
                scope_line(
                    name,
                    f"{status['state']:<8} ${status['spent_usd']} of ${status['limit_usd']} "
                    f"per {status['period']}; resets {status['resets_at']}",
                )
            )
        return
    admin = PolicyAdmin(settings)
    try:
        book = asyncio.run(admin.policies())
        decisions = asyncio.run(admin.read("budget.decisions"))
    except PolicyError as exc:
        _fail(str(exc))
        return
    if scope is not None and book.policy_for(scope) is None:
        _fail(_no_policy(scope))
    for name in sorted(decisions) if scope is None else [scope]:
        d = decisions.get(name)
        if d is None:
            click.echo(scope_line(name, "open     no spend recorded yet in this period"))
            continue
        spent, limit = nanos_to_usd(d["spent_usd_nanos"]), nanos_to_usd(d["limit_usd_nanos"])
        click.echo(
            scope_line(
                name,
                f"{d['state']:<8} ${usd_text(spent)} of ${usd_text(limit)} per {d['period']}; "
                f"resets {d['resets_at'].isoformat() if d['resets_at'] else '-'}",
            )
        )


@budgets.command("rm")
@click.argument("scope")
@_dispatcher_options
def budgets_rm(scope: str, url: str | None, key: str | None) -> None:
    """Remove SCOPE's policy (exit 1 if it has none)."""
    from app.budgets.admin import PolicyAdmin, deletion_record
    from app.budgets.policy import PolicyError, validate_scope

    settings = _settings()
    try:
        scope = validate_scope(scope)
        if url:
            code, _ = _api(settings, url, key).call("DELETE", f"/v1/budgets/{scope}")
            if code == 404:
                _fail(f"{scope} has no budget policy to remove; `tollgate budgets list` shows them")
        else:
            if scope not in _kafka_policies(settings).policies:
                _fail(f"{scope} has no budget policy to remove; `tollgate budgets list` shows them")
            asyncio.run(PolicyAdmin(settings).publish(scope, deletion_record(scope, "cli")))
    except PolicyError as exc:
        _fail(str(exc))
    click.echo(f"removed {scope}")


# -- warehouse -------------------------------------------------------------------
@main.group()
def db() -> None:
    """The ClickHouse warehouse (embedded chdb unless TOLLGATE_CLICKHOUSE_URL is set)."""


@db.command("migrate")
def db_migrate() -> None:
    """Create or upgrade the warehouse tables (idempotent)."""
    from app.warehouse.clickhouse import WarehouseError, connect, describe, migrate

    settings = _settings()
    try:
        client = connect(settings)
        applied = migrate(client)
        click.echo(
            f"{describe(client)} at {settings.clickhouse_dsn}: "
            + (f"applied {', '.join(applied)}" if applied else "up to date")
        )
        client.close()
    except WarehouseError as exc:
        _fail(str(exc))


@main.command("report")
@click.option("--since", default="30d", show_default=True, help="Window, e.g. 30d, 12h, 90m.")
@click.option(
    "--by",
    default="model",
    show_default=True,
    help="model, user, team, feature, tier, provider",
)
@click.option("--from", "start", help="Start (ISO 8601), instead of --since.")
@click.option("--to", "end_at", help="End (ISO 8601, exclusive); default now.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=None,
    help="Rows of the breakdown (the biggest first) [default: 20; csv: every row].",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def report(
    since: str, by: str, start: str | None, end_at: str | None, limit: int | None, fmt: str
) -> None:
    """The finance sentence, savings, spend by a dimension, outcomes and budgets.

    Read from the warehouse through the reports server (`tollgate sink`). csv prints the
    breakdown table only, every row of it unless --limit is given (paged; rows spending the
    same may reorder between pages while usage is still arriving); json prints every
    report. The table adds an "(all others)" row when --limit leaves rows out: their
    requests and spend.
    """
    import csv
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    from datetime import UTC, datetime

    from app.warehouse.reports import MINUTE, ReportError, parse_since, parse_time

    if (
        start is not None
        and click.get_current_context().get_parameter_source("since")
        is not click.core.ParameterSource.DEFAULT
    ):
        _fail("give --since or --from, not both (--from starts the range at a date)")
    settings = _settings()
    try:
        end = datetime.now(UTC)
        end = parse_time(
            end_at, "to", end - (end - datetime(1970, 1, 1, tzinfo=UTC)) % MINUTE + MINUTE
        )
        begin = parse_time(start, "from", end - parse_since(since))
        window = {"from": begin.isoformat(), "to": end.isoformat()}
    except ReportError as exc:
        _fail(str(exc))

    from app.http.security import internal_token, token_path

    # The stack's token, if this directory has one: creating a new one here (run away from
    # the stack) left a state dir behind and sent a token the reports server refuses.
    has_token = settings.internal_token is not None or token_path(settings).exists()
    token = internal_token(settings) if has_token else None
    no_token = (
        f"no internal token at {token_path(settings).absolute()}: the reports server answers "
        "only the token of the stack it runs in. Run `tollgate report` in the directory "
        "`make up` runs in, or set TOLLGATE_STATE_DIR to its state directory (or "
        "TOLLGATE_INTERNAL_TOKEN / TOLLGATE_INTERNAL_TOKEN_FILE)"
    )

    def fetch(name: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        url = f"{settings.reports_url}/v1/reports/{name}?{query}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and token is None:
                _fail(no_token)
            _fail(json.loads(exc.read()).get("error", {}).get("message", str(exc)))
        except OSError as exc:
            _fail(
                f"no reports server at {settings.reports_url} ({exc}); is `tollgate sink` "
                "(or `make up`) running?"
            )

    # csv is a spreadsheet's input: every row (it printed the top 20 of 55 users without a
    # word: a newcomer probe), fetched a page at a time
    page = fetch("breakdown", **window, by=by, limit=str(limit or (1000 if fmt == "csv" else 20)))
    breakdown = page["rows"]
    while fmt == "csv" and limit is None and page.get("more"):
        page = fetch("breakdown", **window, by=by, limit="1000", offset=str(page["next_offset"]))
        breakdown += page["rows"]
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(breakdown[0]) if breakdown else [by])
        writer.writeheader()
        writer.writerows({k: _spreadsheet_safe(v) for k, v in row.items()} for row in breakdown)
        return
    summary = fetch("summary", **window)
    savings = fetch("savings", **window)
    outcomes = fetch("outcomes", **window)["features"]
    budgets = fetch("budgets")["scopes"]
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "summary": summary,
                    "savings": savings,
                    "breakdown": {
                        "by": by,
                        "rows": breakdown,
                        "more": page.get("more"),
                        "others": page.get("others"),
                        "total": page.get("total"),
                    },
                    "outcomes": outcomes,
                    "budgets": budgets,
                },
                indent=2,
            )
        )
        return
    click.echo(summary["sentence"])
    if summary.get("refused"):
        click.echo(
            f"{summary['refused']:,} calls refused by budget caps (402: in neither the requests "
            "nor the errors)"
        )
    parts = savings["decomposition"]
    click.echo(f"\nSavings vs {savings['baseline_model']}: ${savings['savings_usd']}")
    for label, key in (
        ("model choice", "model_choice_usd"),
        ("routing to cheaper models", "routing_usd"),
        ("provider prompt caching", "prompt_cache_usd"),
        ("cache hits", "cache_usd"),
    ):
        click.echo(f"  {label:<28} ${parts[key]}")
    cache, routing = savings["cache"], savings["routing"]
    click.echo(
        f"Cache hit rate {_percent(cache['hit_rate'])}; {_percent(routing['downtiered_share'])} "
        f"of requests served by a cheaper model than asked"
        + (
            f", {_percent(routing['downtiered_success_share'])} of those with an outcome succeeded"
            if routing["downtiered_with_outcome"]
            else ""
        )
    )
    if routing.get("escalated"):
        click.echo(
            f"{routing['escalated']} failed answers escalated to a dearer tier; those first "
            f"attempts cost ${routing['escalated_cost_usd']} (in the cost, not the requests)"
        )
    if routing.get("explored"):
        click.echo(
            f"{routing['explored']} calls sent to economy to learn (routing.exploration_rate)"
            + (
                f", {_percent(routing['explored_success_share'])} of those with an outcome "
                "succeeded"
                if routing["explored_with_outcome"]
                else ""
            )
        )
    others = page.get("others")
    _table(
        f"Spend by {by}",
        breakdown + ([{by: "(all others)", **others}] if page.get("more") and others else []),
        [
            (by, by),
            ("requests", "requests"),
            ("cost $", "cost_usd"),
            ("baseline $", "baseline_cost_usd"),
            ("refused", "refused"),
        ],
    )
    _table(
        "Cost per successful outcome",
        outcomes,
        [
            ("feature", "feature"),
            ("cost $", "cost_usd"),
            ("outcomes", "outcomes"),
            ("successes", "successes"),
            ("$ / success", "cost_per_success_usd"),
            ("on failed calls", "outcomes_on_failed_calls"),
        ],
    )
    _table(
        "Budgets",
        budgets,
        [
            ("scope", "scope"),
            ("state", "state"),
            ("spent $", "spent_usd"),
            ("limit $", "limit_usd"),
            ("resets at", "resets_at"),
        ],
    )


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


TABLE_CELL_WIDTH = 40  # a longer cell (ids may be 256 characters) is shortened in its middle


def middle_ellipsis(text: str, width: int = TABLE_CELL_WIDTH) -> str:
    """``text``, or its start and end around "…" in ``width`` characters: names of one
    family often share a start (a tenant prefix) or an end (a version), so both stay."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2
    return f"{text[: width - 1 - tail]}…{text[len(text) - tail :]}"


def shortened_cells(whole: list[list[str]]) -> list[list[str]]:
    """``whole``'s rows with long cells shortened (``middle_ellipsis``): a 256-character name
    made every row of its table that wide (a newcomer's probe). A column where two different
    names would read the same once shortened (they differ only in their middle: probe 52) is
    left whole: two rows that look alike would be worse than a wide table."""
    by_column = list(zip(*whole, strict=True)) if whole else []
    kept = []
    for column in by_column:
        short = [middle_ellipsis(cell) for cell in column]
        alike = len(set(short)) < len(set(column))
        kept.append(list(column) if alike else short)
    return [list(row) for row in zip(*kept, strict=True)] if kept else [[] for _ in whole]


def _table(title: str, rows: list[dict], heads: list[tuple[str, str]]) -> None:
    click.echo(f"\n{title}")
    if not rows:
        click.echo("  (none in this range)")
        return
    whole = [[("" if r.get(key) is None else str(r.get(key))) for _, key in heads] for r in rows]
    cells = shortened_cells(whole)
    widths = [max(len(h), *(columns(c[i]) for c in cells)) for i, (h, _) in enumerate(heads)]
    first = True
    for line in [[h for h, _ in heads], *cells]:
        text = "  ".join(
            pad(cell, w, right=i > 0) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        click.echo(f"  {text}")
        if first:
            click.echo("  " + "  ".join("-" * w for w in widths))
            first = False
    if cells != whole:
        click.echo(
            f"  (names over {TABLE_CELL_WIDTH} characters are shortened with …; "
            "--format json shows them whole)"
        )


# -- keys and secrets -------------------------------------------------------------
@main.group()
def keys() -> None:
    """API keys (TOLLGATE_KEYS_FILE) and the deployment's shared secrets."""


@keys.command("add")
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False), help="Keys file.")
@click.option("--id", "key_id", required=True, help="Key id (in events as api_key_id).")
@click.option("--user", "user_id", required=True, help="The user the key attributes calls to.")
@click.option("--team", default=None, help="Team (budget scope team:<id>).")
@click.option("--admin", is_flag=True, help="May administer budgets and read reports.")
@click.option("--may-act-for", multiple=True, help="Users it may attribute calls to ('*': any).")
@click.option("--feature", "features", multiple=True, help="Allowed features (default any).")
def keys_add(
    path: str,
    key_id: str,
    user_id: str,
    team: str | None,
    admin: bool,
    may_act_for: tuple[str, ...],
    features: tuple[str, ...],
) -> None:
    """Create a key, store its SHA-256 in the keys file and print the key once (stdout)."""
    from pathlib import Path

    from app.http.security import add_api_key

    try:
        secret = add_api_key(
            Path(path),
            key_id=key_id,
            user_id=user_id,
            team=team,
            admin=admin,
            may_act_for=list(may_act_for),
            features=list(features) or None,
        )
    except ValueError as exc:
        _fail(str(exc))
    click.echo(secret)
    click.echo(
        f"key {key_id!r} for user {user_id!r} added to {path}; only its SHA-256 is stored, "
        "so keep the key printed above now",
        err=True,
    )


@main.group()
def secrets() -> None:
    """Generated secrets for a deployment (docker compose runs `secrets init` once)."""


@secrets.command("init")
@click.argument("directory", type=click.Path(file_okay=False))
def secrets_init(directory: str) -> None:
    """Create DIRECTORY/keys.yaml with an admin key, DIRECTORY/admin-key and
    DIRECTORY/internal-token (mode 0600); files that exist are kept."""
    from pathlib import Path

    from app.http.security import init_secrets

    try:
        created = init_secrets(Path(directory))
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    for name in ("keys.yaml", "admin-key", "internal-token"):
        state = "created" if name in created else "kept"
        click.echo(f"{state:<8} {Path(directory) / name}")
    click.echo(f"the admin key is in {Path(directory) / 'admin-key'} (never printed or logged)")


# -- config ------------------------------------------------------------------
@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the settings table as Markdown.")
def config(markdown: bool) -> None:
    """Show every setting, its environment variable and its effective value."""
    settings = _settings()
    rows = describe_settings()
    if markdown:
        click.echo("| variable | default | what it sets |\n|---|---|---|")
        for row in rows:
            description = row["description"].replace("|", "\\|")
            default = f"`{row['default']}`" if row["default"] else ""
            click.echo(f"| `{row['env']}` | {default} | {description} |")
        return
    for row in rows:
        name = row["env"].removeprefix("TOLLGATE_").lower()
        click.echo(f"{row['env']:<32} {shown_setting(name, getattr(settings, name))}")


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def shown_setting(name: str, value: object) -> str:
    """A setting as `tollgate config` prints it: secrets masked, webhook URLs cut to their host.

    Slack and PagerDuty URLs carry their token in the path, and routing keys, the internal
    token, the admin key and passwords in DSNs are credentials: none is printed.
    """
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        return "(set, hidden)"
    if name == "alert_targets" and value:
        from app.alerts_config import parse_alert_targets

        targets = parse_alert_targets(list(value))  # type: ignore[call-overload]
        return ", ".join(f"{t.name} ({t.format}) {t.redacted_url}" for t in targets)
    if name == "upstreams" and value:
        return ", ".join(
            f"{u.name} {_without_password(u.base_url.split('?')[0])} (key from "
            f"{u.api_key_env or 'none'})"
            for u in value  # type: ignore[attr-defined]
        )
    if isinstance(value, str) and "://" in value:
        return _without_password(value)
    return str(value)


# -- services ----------------------------------------------------------------
def _spreadsheet_safe(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (``=HYPERLINK(...)``: ids are the
    client's words) prefixed with ``'`` (OWASP's CSV-injection advice); numbers as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


@main.command("up")
def up() -> None:
    """Run the whole local stack in the foreground; Ctrl-C stops it."""
    from devtools.stack import run_stack

    settings = _settings()
    sys.exit(run_stack(settings, click.echo))


@main.command("down")
def down() -> None:
    """Stop the `tollgate up` running on this state directory (as Ctrl-C in its terminal)."""
    from devtools.stack import stop_stack

    sys.exit(stop_stack(_settings(), click.echo))


@main.command("status")
def status() -> None:
    """Each component of the `tollgate up` running here: running, or down and restarting
    (when, and why). Exit code 3 when one is down or no `tollgate up` runs here."""
    from devtools.stack import print_status

    sys.exit(print_status(_settings(), click.echo))


@main.command("serve")
def serve_dispatcher() -> None:
    """Run the dispatcher (the gateway users point their SDKs at)."""
    from app.http.security import ExposureError, check_exposure
    from app.http.server import serve

    settings = _settings()
    try:
        check_exposure(settings)  # serve() checks too; here it is a one-line error, not a trace
    except ExposureError as exc:
        _fail(str(exc))
    if settings.budgets_file:  # read again at start; here a bad one is one line, not a trace
        from app.budgets.admin import load_budgets_file
        from app.budgets.policy import PolicyError

        try:
            load_budgets_file(settings.budgets_file)
        except PolicyError as exc:
            _fail(f"{exc} (TOLLGATE_BUDGETS_FILE: the dispatcher does not start on a bad one)")
    click.echo(f"dispatcher on {settings.dispatcher_url}/v1", err=True)
    asyncio.run(serve(settings, handle_signals=True))


@main.command("worker")
def worker() -> None:
    """Run the spend worker (Faust): spend tables and budget decisions."""
    from agents.spend import run_worker

    settings = _settings()
    click.echo(f"spend worker on {settings.kafka_bootstrap}", err=True)
    run_worker(settings)


@main.command("sink")
def sink() -> None:
    """Run the ClickHouse sink: every event into the warehouse, exactly once."""
    from agents.sink import run_sink
    from app.http.security import ExposureError, internal_token

    settings = _settings()
    try:
        internal_token(settings)  # the report server refuses to run without one
    except ExposureError as exc:
        _fail(str(exc))
    click.echo(f"ClickHouse sink into {settings.clickhouse_dsn}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        run_sink(settings)


@main.command("anomaly")
def anomaly() -> None:
    """Run the anomaly agent: River models over usage, alerts to the alerts topic."""
    from agents.anomaly.agent import run_anomaly_agent

    settings = _settings()
    click.echo(f"anomaly agent on {settings.kafka_bootstrap}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_anomaly_agent(settings))


@main.command("router-learn")
def router_learn() -> None:
    """Run the shared router learner: routed calls and outcomes from Kafka, one model for
    every dispatcher (routing.shared_learning; see docs/SAVINGS.md)."""
    from agents.router_learner import run_router_learner

    settings = _settings()
    click.echo(f"router learner on {settings.kafka_bootstrap}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_router_learner(settings))


@main.command("detect")
@click.argument("csv_file", type=click.Path(dir_okay=False))
@click.option(
    "--kind",
    type=click.Choice(["volume", "cost", "mix"]),
    default="volume",
    show_default=True,
    help="volume: a count or spend per minute; cost: cost per request; mix: economy share.",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write here, not stdout.")
@click.option(
    "--set",
    "options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a detector setting, e.g. --set volume_p_value=1e-4 (repeatable).",
)
def detect(csv_file: str, kind: str, output: str | None, options: tuple[str, ...]) -> None:
    """Run a detector over a timestamp,value CSV; print timestamp,value,score,is_anomaly.

    The same models the anomaly agent runs, for evaluating them on any labelled series
    or replaying history.
    """
    import io

    from agents.anomaly.offline import detect_csv

    overrides: dict[str, object] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name:
            _fail(f"--set {option!r}: use NAME=VALUE, e.g. volume_p_value=1e-4")
        overrides[name] = value
    buffer = io.StringIO()
    try:
        summary = detect_csv(kind, csv_file, buffer, **overrides)
    except FileNotFoundError:
        _fail(f"{csv_file}: no such file")
    except (ValueError, TypeError) as exc:
        _fail(str(exc))
    except OverflowError as exc:  # a value too large for a detector's arithmetic
        _fail(f"{csv_file}: a value is too large to judge ({exc}); check the value column")
    if output:
        try:
            with open(output, "w") as handle:
                handle.write(buffer.getvalue())
        except OSError as exc:
            _fail(f"cannot write {output}: {exc.strerror or exc}")
    else:
        click.echo(buffer.getvalue(), nl=False)
    click.echo(
        f"{summary.rows} rows, {summary.anomalies} anomalous, {summary.warming_up} in warm-up, "
        f"{summary.skipped} out of time order and {summary.missing} without a value (not judged)",
        err=True,
    )


@main.command("notify")
def notify() -> None:
    """Deliver alerts to the on-call webhooks in TOLLGATE_ALERT_TARGETS."""
    from agents.notifier import run_notifier
    from app.alerts_config import parse_alert_targets

    settings = _settings()
    targets = parse_alert_targets(list(settings.alert_targets))
    if not targets:
        _fail(
            "no alert targets: set TOLLGATE_ALERT_TARGETS to a JSON list, e.g. "
            '[{"name": "oncall", "url": "https://hooks.slack.com/...", "format": "slack"}]'
        )
    click.echo(
        f"notifier: {len(targets)} target(s): {', '.join(t.name for t in targets)}", err=True
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_notifier(settings, targets))


@main.command("simulate")
@click.option("--host", default=None, help="Bind address (default TOLLGATE_SIMULATOR_HOST).")
@click.option("--port", default=None, type=int, help="Port (default TOLLGATE_SIMULATOR_PORT).")
@click.option("--latency-scale", default=1.0, show_default=True, help="0 = instant answers.")
@click.option("--error-rate", default=0.0, show_default=True, help="Fraction answered 500/429.")
def simulate(host: str | None, port: int | None, latency_scale: float, error_rate: float) -> None:
    """Run the OpenAI-compatible upstream simulator."""
    from devtools.simulator import SimulatorConfig, serve

    settings = _settings()
    config = SimulatorConfig(latency_scale=latency_scale, error_rate=error_rate)
    bind_host = host or settings.simulator_host
    bind_port = port or settings.simulator_port
    click.echo(f"simulator on http://{bind_host}:{bind_port}/v1", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(bind_host, bind_port, config))


def _register_commands() -> None:
    """Commands that live beside their domain code."""
    from app.routing.cli import route_group
    from devtools.replay import replay_command

    main.add_command(replay_command)
    main.add_command(route_group)


_register_commands()

if __name__ == "__main__":
    main()
