"""The `tollgate` command line: thin wrappers over the modules that own each job."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import click

from app.settings import Settings, describe_settings


def _settings() -> Settings:
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _fail(message: str) -> None:
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
