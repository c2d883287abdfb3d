"""`make up` / `tollgate up`: run the whole local stack in the foreground.

Owns process supervision only: which services start, in which order, how
readiness is probed and how Ctrl-C stops everything without orphans. Each
service's own logic lives in its module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.kafka_local import port_open, tail
from app.settings import Settings

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A service of the stack failed to start; the message says which and where its log is."""


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


@dataclass
class Service:
    name: str
    argv: list[str]
    host: str
    port: int | None  # None: a worker without a listener; ready = still alive after start-up
    url: str
    log_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], timeout_s: float = 60.0) -> None:
        if self.port is not None and port_open(self.host, self.port):
            raise StackError(
                f"{self.name}: port {self.host}:{self.port} is already in use by another process; "
                "stop it or change the port setting"
            )
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise StackError(
                    f"{self.name} exited with code {process.returncode} during start-up; "
                    f"see {self.log_file}:\n{tail(self.log_file)}"
                )
            return self.port is None or port_open(self.host, self.port)

        if self.port is None:
            time.sleep(3.0)  # a worker that cannot start (bad config, no Kafka) exits at once
            ready()
            return
        if not wait_until(ready, timeout_s):
            raise StackError(
                f"{self.name} not ready on {self.url} after {timeout_s:.0f}s; see {self.log_file}"
            )

    def stop(self, timeout_s: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def python_service(
    name: str, args: list[str], host: str, port: int | None, log_dir: Path
) -> Service:
    return Service(
        name=name,
        argv=[sys.executable, "-m", "app", *args],
        host=host,
        port=port,
        url=f"http://{host}:{port}" if port is not None else "(no listener)",
        log_file=log_dir / f"{name}.log",
    )


def run_stack(settings: Settings, echo: Callable[[str], None]) -> int:
    """Start everything, print where to look, block until Ctrl-C, stop everything."""
    import asyncio

    from app.kafka_local import LauncherError, LocalKafka
    from app.topics import TopicsError, ensure_topics
    from app.warehouse import WarehouseError

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    log_dir = settings.state_dir / "logs"
    kafka = LocalKafka(settings)
    started_kafka = False
    services: list[Service] = []
    lines: list[str] = []
    try:
        host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
        if port_open(host or "127.0.0.1", int(port)):
            lines.append(f"Kafka        {settings.kafka_bootstrap} (already running, left as is)")
        else:
            echo(f"starting local Kafka {settings.kafka_version} on {settings.kafka_bootstrap} ...")
            result = kafka.start()
            started_kafka = not result.already_running
            how = f"downloaded in {result.download_seconds:.1f}s, " if result.downloaded else ""
            lines.append(
                f"Kafka        {result.bootstrap} ({how}ready in {result.start_seconds:.1f}s; "
                f"log {result.log_file})"
            )
        report = asyncio.run(ensure_topics(settings))
        if not report.ok:
            raise StackError("topics do not match:\n  " + "\n  ".join(report.problems))
        lines.append(
            f"Topics       {len(report.created)} created, {len(report.existing)} already there"
        )
        # chdb is in-process and single-owner: only the sink opens it (it also migrates).
        lines.append(f"ClickHouse   {settings.clickhouse_dsn} (written by the sink)")

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        services = planned_services(settings, log_dir)
        for service in services:
            if stopping:
                break
            echo(f"starting {service.name} ...")
            service.start(env)
            lines.append(f"{service.name:<12} {service.url} (log {service.log_file})")
        echo("\nTollgate is up:\n  " + "\n  ".join(lines))
        echo(
            f"\nTry it:  curl -s {settings.dispatcher_url}/healthz"
            if any(s.name == "dispatcher" for s in services)
            else ""
        )
        echo("Press Ctrl-C to stop everything.")
        while not stopping:
            for service in services:
                if service.process is not None and service.process.poll() is not None:
                    echo(
                        f"{service.name} exited with code {service.process.returncode}; stopping. "
                        f"Last lines of {service.log_file}:\n{tail(service.log_file)}"
                    )
                    stopping = True
            time.sleep(0.3)
        return 0
    except (StackError, LauncherError, TopicsError, WarehouseError) as exc:
        echo(f"error: {exc}")
        return 1
    finally:
        echo("stopping ...")
        for service in reversed(services):
            service.stop()
        if started_kafka:
            kafka.stop()
        echo("stopped.")


def planned_services(settings: Settings, log_dir: Path) -> list[Service]:
    """The HTTP services `up` runs, in start order. Grows as components land."""
    return [
        python_service(
            "simulator", ["simulate"], settings.simulator_host, settings.simulator_port, log_dir
        ),
        python_service("spend-worker", ["worker"], settings.kafka_bootstrap, None, log_dir),
        python_service("sink", ["sink"], settings.reports_host, settings.reports_port, log_dir),
        python_service("anomaly", ["anomaly"], settings.kafka_bootstrap, None, log_dir),
        *(
            [python_service("notifier", ["notify"], settings.kafka_bootstrap, None, log_dir)]
            if settings.alert_targets
            else []
        ),
        python_service(
            "dispatcher", ["serve"], settings.dispatcher_host, settings.dispatcher_port, log_dir
        ),
    ]
