"""The `tollgate` command line: thin wrappers over the modules that own each job."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import NoReturn

import click

from app.pricing import usd_text
from app.settings import Settings, describe_settings


def _settings() -> Settings:
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Tollgate: real-time FinOps gateway for LLM traffic."""


# -- kafka -------------------------------------------------------------------
@main.group()
def kafka() -> None:
    """Run a local single-node Kafka (KRaft) from Maven Central jars."""


@kafka.command("start")
def kafka_start() -> None:
    """Start the local broker (fetches the jars the first time)."""
    from app.kafka_local import LauncherError, LocalKafka

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
    from app.kafka_local import LauncherError, LocalKafka

    try:
        stopped = LocalKafka(_settings()).stop()
    except LauncherError as exc:
        _fail(str(exc))
        return
    click.echo("Kafka stopped" if stopped else "Kafka was not running")


@kafka.command("status")
def kafka_status() -> None:
    """Say whether the local broker runs (exit code 3 when it does not)."""
    from app.kafka_local import LocalKafka

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
    from app.topics import TopicsError, ensure_topics

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
    from app.codec import SchemaCatalog

    added = SchemaCatalog().register_changes()
    for version in added:
        click.echo(f"id {version.schema_id}: {version.name} v{version.version} -> {version.file}")
    if not added:
        click.echo("no schema changed")


# -- budgets -----------------------------------------------------------------
@main.group()
def budgets() -> None:
    """Budget caps (published to Kafka; every dispatcher and the spend worker follow them)."""


@budgets.command("set")
@click.argument("scope")
@click.option("--monthly", type=str, help="Monthly limit in USD.")
@click.option("--daily", type=str, help="Daily limit in USD.")
@click.option("--window", type=str, help="Rolling-window length, e.g. 1h (with --limit).")
@click.option("--limit", "window_limit", type=str, help="Limit in USD for --window.")
@click.option("--thresholds", default="0.5,0.8,1.0", show_default=True, help="Soft thresholds.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA zone of day/month.")
@click.option("--upgrade-url", default=None, help="Shown in the 402 body.")
@click.option("--upgrade-prompt", default=None, help="Shown in the 402 body.")
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
) -> None:
    """Cap SCOPE (global, user:ID, feature:NAME, user:* for every user), e.g. --monthly 50."""
    from app.budgets.admin import PolicyAdmin, policy_record
    from app.budgets.policy import PolicyError, parse_policy

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
        policy = parse_policy(scope, body)
        asyncio.run(PolicyAdmin(settings).publish(scope, policy_record(policy, "cli")))
    except PolicyError as exc:
        _fail(f"{exc.field}: {exc}")
    click.echo(f"{scope}: ${usd_text(policy.limit_usd)} per {policy.period} ({policy.timezone})")


@budgets.command("list")
def budgets_list() -> None:
    """Every budget policy."""
    from app.budgets.admin import PolicyAdmin
    from app.budgets.policy import PolicyError

    try:
        book = asyncio.run(PolicyAdmin(_settings()).policies())
    except PolicyError as exc:
        _fail(str(exc))
        return
    for policy in sorted(book.all(), key=lambda p: p.scope):
        click.echo(
            f"{policy.scope:<32} ${usd_text(policy.limit_usd):<10} per {policy.period:<6} "
            f"{policy.timezone}"
        )


@budgets.command("status")
@click.argument("scope", required=False)
def budgets_status(scope: str | None) -> None:
    """Spent, limit and state per capped scope, as the spend worker last decided."""
    from app.budgets.admin import PolicyAdmin
    from app.budgets.policy import PolicyError
    from app.pricing import nanos_to_usd

    admin = PolicyAdmin(_settings())
    try:
        decisions = asyncio.run(admin.read("budget.decisions"))
    except PolicyError as exc:
        _fail(str(exc))
        return
    for name in sorted(decisions) if scope is None else [scope]:
        d = decisions.get(name)
        if d is None:
            click.echo(f"{name:<32} no spend recorded yet")
            continue
        spent, limit = nanos_to_usd(d["spent_usd_nanos"]), nanos_to_usd(d["limit_usd_nanos"])
        click.echo(
            f"{name:<32} {d['state']:<8} ${spent:.4f} of ${usd_text(limit)} per {d['period']}; "
            f"resets {d['resets_at'].isoformat() if d['resets_at'] else '-'}"
        )


@budgets.command("rm")
@click.argument("scope")
def budgets_rm(scope: str) -> None:
    """Remove SCOPE's policy."""
    from app.budgets.admin import PolicyAdmin, deletion_record
    from app.budgets.policy import PolicyError, validate_scope

    try:
        validate_scope(scope)
        asyncio.run(PolicyAdmin(_settings()).publish(scope, deletion_record(scope, "cli")))
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
    from app.warehouse import WarehouseError, connect, describe, migrate

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
@click.option("--since", default="30d", show_default=True, help="Window, e.g. 30d, 12h.")
@click.option(
    "--by", default="model", show_default=True, help="model, user, feature, tier, provider"
)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
def report(since: str, by: str, fmt: str) -> None:
    """The finance sentence and spend by a dimension, from the warehouse (via the sink)."""
    import csv
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    from datetime import UTC, datetime

    from app.reports import ReportError, parse_since

    settings = _settings()
    try:
        start = (datetime.now(UTC) - parse_since(since)).isoformat()
    except ReportError as exc:
        _fail(str(exc))

    def fetch(name: str, **params: str) -> dict:
        query = urllib.parse.urlencode({"from": start, **params})
        url = f"{settings.reports_url}/v1/reports/{name}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            _fail(json.loads(exc.read()).get("error", {}).get("message", str(exc)))
        except OSError as exc:
            _fail(
                f"no reports server at {settings.reports_url} ({exc}); is `tollgate sink` running?"
            )

    summary = fetch("summary")
    rows = fetch("breakdown", by=by)["rows"]
    if fmt == "json":
        click.echo(json.dumps({"summary": summary, "breakdown": rows}, indent=2))
        return
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else [by])
        writer.writeheader()
        writer.writerows(rows)
        return
    click.echo(summary["sentence"])
    click.echo(f"\n{by:<28} {'requests':>9} {'cost $':>14} {'baseline $':>14}")
    for row in rows:
        click.echo(
            f"{row[by]!s:<28} {row['requests']:>9} {row['cost_usd']:>14} {row['baseline_cost_usd']:>14}"
        )


# -- config ------------------------------------------------------------------
@main.command("config")
@click.option("--markdown", is_flag=True, help="Print the settings table as Markdown.")
def config(markdown: bool) -> None:
    """Show every setting, its environment variable and its effective value."""
    settings = Settings()
    rows = describe_settings()
    if markdown:
        click.echo("| variable | default | what it sets |\n|---|---|---|")
        for row in rows:
            click.echo(f"| `{row['env']}` | `{row['default']}` | {row['description']} |")
        return
    for row in rows:
        name = row["env"].removeprefix("TOLLGATE_").lower()
        click.echo(f"{row['env']:<32} {getattr(settings, name)!s}")


# -- services ----------------------------------------------------------------
@main.command("up")
def up() -> None:
    """Run the whole local stack in the foreground; Ctrl-C stops it."""
    from app.stack import run_stack

    settings = _settings()
    sys.exit(run_stack(settings, click.echo))


@main.command("serve")
def serve_dispatcher() -> None:
    """Run the dispatcher (the gateway users point their SDKs at)."""
    from app.server import serve

    settings = _settings()
    click.echo(f"dispatcher on {settings.dispatcher_url}/v1", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))


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

    settings = _settings()
    click.echo(f"ClickHouse sink into {settings.clickhouse_dsn}", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        run_sink(settings)


@main.command("simulate")
@click.option("--host", default=None, help="Bind address (default TOLLGATE_SIMULATOR_HOST).")
@click.option("--port", default=None, type=int, help="Port (default TOLLGATE_SIMULATOR_PORT).")
@click.option("--latency-scale", default=1.0, show_default=True, help="0 = instant answers.")
@click.option("--error-rate", default=0.0, show_default=True, help="Fraction answered 500/429.")
def simulate(host: str | None, port: int | None, latency_scale: float, error_rate: float) -> None:
    """Run the OpenAI-compatible upstream simulator."""
    from app.simulator import SimulatorConfig, serve

    settings = _settings()
    config = SimulatorConfig(latency_scale=latency_scale, error_rate=error_rate)
    bind_host = host or settings.simulator_host
    bind_port = port or settings.simulator_port
    click.echo(f"simulator on http://{bind_host}:{bind_port}/v1", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(bind_host, bind_port, config))


if __name__ == "__main__":
    main()
