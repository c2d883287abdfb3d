"""`make up` / `tollgate up`: run the whole local stack in the foreground.

Owns process supervision only: which services start, in which order, how
readiness is probed, how a service that exits is restarted (``Supervisor``:
with backoff, said on the terminal, and given up on when it crash-loops), and
how Ctrl-C stops everything without orphans. Each service's own logic lives in
its module.
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from app.cache.config import CacheSettings
from app.settings import Settings
from devtools.kafka_local import pid_alive, port_open, tail

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
    # An agent's metrics listener: nice to have. Taken by another process, the agent runs
    # without it (as the agent itself does) instead of `up` refusing to start.
    optional_port: bool = False

    def spawn(self, env: dict[str, str]) -> None:
        """Start the process and return at once (no readiness wait)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def start(self, env: dict[str, str], timeout_s: float = 60.0) -> None:
        if self.port is not None and port_open(self.host, self.port):
            raise StackError(
                f"{self.name}: port {self.host}:{self.port} is already in use by another process; "
                "stop it or change the port setting"
            )
        self.spawn(env)
        process = self.process
        assert process is not None

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
        """SIGINT first (every Tollgate service shuts down cleanly on it, as on Ctrl-C:
        the dispatcher flushes its events), then SIGTERM, then SIGKILL."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def without_taken_port(service: Service) -> tuple[Service, str | None]:
    """``service``, or, when its listener is optional and its port already taken, a copy
    without a listener and the warning to print (the agent logs it too and runs on)."""
    if not service.optional_port or service.port is None:
        return service, None
    if not port_open(service.host, service.port):
        return service, None
    warning = (
        f"{service.name}: port {service.host}:{service.port} is already in use by another "
        "process; it runs without its metrics listener (set its metrics port to a free one, "
        "or 0)"
    )
    return replace(service, port=None, url=f"(port {service.port} taken: no metrics)"), warning


@dataclass(frozen=True)
class RestartPolicy:
    """How `up` restarts a service that exits on its own."""

    backoff_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    stable_after_s: float = 60.0  # a run at least this long starts the backoff over
    crash_loop_exits: int = 5  # this many exits ...
    crash_loop_window_s: float = 120.0  # ... within this window: stop restarting it


@dataclass
class _Watch:
    started_at: float
    exits: list[float] = field(default_factory=list)  # times of recent exits
    consecutive: int = 0  # exits since the last stable run: the backoff step
    restart_at: float | None = None
    given_up: bool = False
    restarts: int = 0


class Supervisor:
    """Restarts services that exit, with backoff; gives up on one that crash-loops.

    ``check()`` is one supervision step (``run_stack`` calls it a few times a second).
    A restart only spawns the process: if it dies again, the next steps see it. A
    service given up on stays down and the rest keep running; the terminal says so.
    """

    def __init__(
        self,
        services: list[Service],
        env: dict[str, str],
        echo: Callable[[str], None],
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = services
        self.env = env
        self.echo = echo
        self.policy = policy or RestartPolicy()
        self.clock = clock
        now = clock()
        self.watches = {s.name: _Watch(started_at=now) for s in services}

    def given_up(self) -> list[str]:
        return [name for name, w in self.watches.items() if w.given_up]

    def check(self) -> None:
        now = self.clock()
        for service in self.services:
            watch = self.watches[service.name]
            if watch.given_up:
                continue
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    watch.restart_at = None
                    watch.restarts += 1
                    watch.started_at = now
                    service.spawn(self.env)
                    self.echo(f"{service.name} restarted (restart #{watch.restarts})")
                continue
            process = service.process
            if process is None or process.poll() is None:
                continue
            self._exited(service, watch, process.returncode, now)

    def _exited(self, service: Service, watch: _Watch, code: int, now: float) -> None:
        policy = self.policy
        if now - watch.started_at >= policy.stable_after_s:
            watch.consecutive = 0
        watch.exits = [t for t in watch.exits if now - t < policy.crash_loop_window_s]
        watch.exits.append(now)
        last_lines = tail(service.log_file)
        if len(watch.exits) >= policy.crash_loop_exits:
            watch.given_up = True
            self.echo(
                f"{service.name} exited with code {code}, {len(watch.exits)} times within "
                f"{policy.crash_loop_window_s:.0f}s: it is crash-looping, so it is NOT restarted "
                f"again; the rest of the stack keeps running. Fix the cause (see "
                f"{service.log_file}), then restart `tollgate up`. Last lines:\n{last_lines}"
            )
            return
        delay = policy.backoff_s[min(watch.consecutive, len(policy.backoff_s) - 1)]
        watch.consecutive += 1
        watch.restart_at = now + delay
        self.echo(
            f"{service.name} exited with code {code}; restarting it in {delay:g}s "
            f"(exit {len(watch.exits)} of at most {policy.crash_loop_exits - 1} within "
            f"{policy.crash_loop_window_s:.0f}s). Last lines of {service.log_file}:\n{last_lines}"
        )


class KafkaLike(Protocol):
    def status(self) -> Any: ...

    def start(self) -> Any: ...


class KafkaKeeper:
    """Starts the broker `up` started again when it dies (killed, out of memory): without it
    the services retry for ever against nothing and every call spools. ``check()`` looks
    every ``every_s`` seconds; restarts follow the same backoff and crash-loop rule as the
    services'. ``start()`` blocks until the broker answers (the services wait meanwhile)."""

    def __init__(
        self,
        kafka: KafkaLike,
        echo: Callable[[str], None],
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 2.0,
    ) -> None:
        self.kafka = kafka
        self.echo = echo
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.every_s = every_s
        self.watch = _Watch(started_at=clock())
        self.next_look = clock() + every_s

    def check(self) -> None:
        watch, now = self.watch, self.clock()
        if watch.given_up:
            return
        if watch.restart_at is not None:
            if now >= watch.restart_at:
                watch.restart_at = None
                self._start(now)
            return
        if now < self.next_look:
            return
        self.next_look = now + self.every_s
        if self.kafka.status().running:
            return
        self._down(now, "Kafka exited (its process is gone)")

    def _start(self, now: float) -> None:
        watch = self.watch
        watch.restarts += 1
        try:
            result = self.kafka.start()
        except Exception as exc:  # LauncherError and the like: counted as another exit
            self._down(self.clock(), f"Kafka did not start again: {exc}")
            return
        watch.started_at = self.clock()
        self.next_look = watch.started_at + self.every_s
        self.echo(
            f"Kafka restarted (restart #{watch.restarts}, ready in {result.start_seconds:.1f}s); "
            "the services reconnect on their own"
        )

    def _down(self, now: float, why: str) -> None:
        watch, policy = self.watch, self.policy
        if now - watch.started_at >= policy.stable_after_s:
            watch.consecutive = 0
        watch.exits = [t for t in watch.exits if now - t < policy.crash_loop_window_s]
        watch.exits.append(now)
        if len(watch.exits) >= policy.crash_loop_exits:
            watch.given_up = True
            self.echo(
                f"{why}. It went down {len(watch.exits)} times within "
                f"{policy.crash_loop_window_s:.0f}s, so it is NOT restarted again: the services "
                "keep retrying and the dispatcher spools usage. Fix the cause (see the Kafka "
                "log), then restart `tollgate up`."
            )
            return
        delay = policy.backoff_s[min(watch.consecutive, len(policy.backoff_s) - 1)]
        watch.consecutive += 1
        watch.restart_at = now + delay
        self.echo(f"{why}; restarting it in {delay:g}s (the dispatcher spools usage meanwhile)")


def python_service(
    name: str,
    args: list[str],
    host: str,
    port: int | None,
    log_dir: Path,
    path: str = "",
    *,
    optional_port: bool = False,
) -> Service:
    """``port`` None (or 0: an agent's metrics listener turned off): no listener."""
    port = port or None
    return Service(
        name=name,
        argv=[sys.executable, "-m", "app", *args],
        host=host,
        port=port,
        url=f"http://{host}:{port}{path}" if port is not None else "(no listener)",
        log_file=log_dir / f"{name}.log",
        optional_port=optional_port,
    )


def run_stack(settings: Settings, echo: Callable[[str], None]) -> int:
    """Start everything, print where to look, block until Ctrl-C, stop everything."""
    import asyncio

    from app.events.topics import TopicsError, ensure_topics
    from app.warehouse.clickhouse import WarehouseError
    from devtools.kafka_local import LauncherError, LocalKafka

    running = running_up(settings)
    if running is not None:
        # Started again in the same checkout: it wrote its own pid over the running stack's,
        # failed on the taken ports, and removed the file as it left, so `make down` found
        # nothing to stop and the stack ran on (a newcomer's probe).
        echo(
            f"error: a stack is already running here (`tollgate up`, process {running}; "
            f"{up_pid_file(settings)}): its dashboard is {settings.dispatcher_url}/dashboard. "
            "Stop it first with `make down` (or `tollgate down`)"
        )
        return 1
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    pid_file = up_pid_file(settings)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")  # `tollgate down` (`make down`) stops this
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

        env = stack_env(settings)
        services = planned_services(settings, log_dir)
        for index, planned in enumerate(services):
            if stopping:
                break
            service, warning = without_taken_port(planned)
            services[index] = service
            if warning:
                echo(f"warning: {warning}")
            echo(f"starting {service.name} ...")
            service.start(env)
            lines.append(f"{service.name:<12} {service.url} (log {service.log_file})")
        cache = env.get("TOLLGATE_CACHE")
        cache_on = (
            CacheSettings.model_validate_json(cache).enabled if cache else settings.cache.enabled
        )
        lines.append(
            'Savings      model "auto" is routed to a tier; response cache '
            + ("on (exact repeats at temperature 0)" if cache_on else "off")
        )
        echo("\nTollgate is up:\n  " + "\n  ".join(lines))
        echo(f"Dashboard:   {settings.dispatcher_url}/dashboard")
        echo(
            f"\nTry it:  curl -s {settings.dispatcher_url}/healthz"
            if any(s.name == "dispatcher" for s in services)
            else ""
        )
        echo("Press Ctrl-C to stop everything.")
        supervisor = Supervisor(services, env, echo)
        keeper = KafkaKeeper(kafka, echo) if started_kafka else None
        while not stopping:
            supervisor.check()  # a service that exits is restarted, with backoff
            if keeper is not None:
                keeper.check()  # and so is the broker `up` started
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
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        echo("stopped.")


def up_pid_file(settings: Settings) -> Path:
    """Where a running `tollgate up` writes its process id."""
    return settings.state_dir / "up.pid"


def running_up(settings: Settings) -> int | None:
    """The process id of another `tollgate up` running on this state directory, if any."""
    try:
        pid = int(up_pid_file(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid() or not pid_alive(pid) or not _is_up(pid):
        return None
    return pid


def _is_up(pid: int) -> bool:
    """Whether process ``pid`` is a `tollgate up` (a pid file left by a killed one may name
    a process that has nothing to do with it now). Without /proc: assumed so."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return b"up" in argv and any(b"tollgate" in arg or arg == b"app" for arg in argv)


def stop_stack(settings: Settings, echo: Callable[[str], None], timeout_s: float = 90) -> int:
    """Stop the `tollgate up` of this state directory, as Ctrl-C in its terminal does, and
    wait until it has stopped everything it started. 0 also when nothing was running."""
    pid_file = up_pid_file(settings)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        echo(f"no `tollgate up` is running here (no {pid_file})")
        return 0
    if not _is_up(pid):
        echo(f"no `tollgate up` is running here (process {pid} is something else now)")
        pid_file.unlink(missing_ok=True)
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        echo(f"no `tollgate up` is running here (process {pid} has gone)")
        pid_file.unlink(missing_ok=True)
        return 0
    except PermissionError:
        echo(f"error: process {pid} of {pid_file} belongs to another user")
        return 1
    echo(f"stopping the stack (process {pid}) ...")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            echo("stopped.")
            return 0
        time.sleep(0.2)
    echo(f"error: process {pid} is still running after {timeout_s:g}s; see its terminal")
    return 1


def stack_env(settings: Settings) -> dict[str, str]:
    """The environment of every service: the stack runs every savings lever unless the
    configuration says otherwise explicitly: the shared router learner, so its dispatchers
    learn through it (``routing.shared_learning``), and the response cache
    (``cache.enabled``: exact repeats at temperature 0 only, per tenant; see docs/SAVINGS.md)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "shared_learning" not in settings.routing.model_fields_set:
        routing = settings.routing.model_copy(update={"shared_learning": True})
        env["TOLLGATE_ROUTING"] = routing.model_dump_json()
    if "enabled" not in settings.cache.model_fields_set:
        cache = settings.cache.model_copy(update={"enabled": True})
        env["TOLLGATE_CACHE"] = cache.model_dump_json()
    return env


def planned_services(settings: Settings, log_dir: Path) -> list[Service]:
    """The HTTP services `up` runs, in start order. Grows as components land."""
    return [
        python_service(
            "simulator", ["simulate"], settings.simulator_host, settings.simulator_port, log_dir
        ),
        python_service("spend-worker", ["worker"], settings.kafka_bootstrap, None, log_dir),
        python_service("sink", ["sink"], settings.reports_host, settings.reports_port, log_dir),
        # The agents serve only their metrics.
        python_service(
            "anomaly",
            ["anomaly"],
            settings.agents_metrics_host,
            settings.anomaly_metrics_port,
            log_dir,
            "/metrics",
            optional_port=True,
        ),
        python_service(
            "router-learn",
            ["router-learn"],
            settings.agents_metrics_host,
            settings.router_learn_metrics_port,
            log_dir,
            "/metrics",
            optional_port=True,
        ),
        *(
            [
                python_service(
                    "notifier",
                    ["notify"],
                    settings.agents_metrics_host,
                    settings.notifier_metrics_port,
                    log_dir,
                    "/metrics",
                    optional_port=True,
                )
            ]
            if settings.alert_targets
            else []
        ),
        python_service(
            "dispatcher", ["serve"], settings.dispatcher_host, settings.dispatcher_port, log_dir
        ),
    ]
