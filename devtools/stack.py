"""`make up` / `tollgate up`: run the whole local stack in the foreground.

Owns process supervision only: which services start, in which order, how
readiness is probed, how a service that exits is restarted (``Supervisor``:
with a capped backoff for as long as `up` runs, said on the terminal and in
``<state dir>/up-status.json``, which `tollgate status` reads), and how Ctrl-C
stops everything without orphans. Each service's own logic lives in its module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
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
    """How `up` restarts a service (or the broker it started) that exits on its own: for as
    long as `up` runs, after the next wait of ``backoff_s`` (the last one repeats: the cap)."""

    backoff_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
    stable_after_s: float = 60.0  # a run at least this long starts the backoff over
    crash_loop_exits: int = 5  # this many exits ...
    crash_loop_window_s: float = 120.0  # ... within this window: said to be crash-looping


@dataclass
class _Watch:
    """One component's restarts: the backoff step, and when it is due to start again."""

    started_at: float
    exits: list[float] = field(default_factory=list)  # times of recent exits
    consecutive: int = 0  # exits since the last stable run: the backoff step
    restart_at: float | None = None
    restarts: int = 0
    # Said to be crash-looping: kept over its restarts (probe 56: the mark vanished at each
    # one) until a run lasts ``stable_after_s``.
    looping: bool = False

    def exited(self, now: float, policy: RestartPolicy) -> tuple[float, bool]:
        """Schedule the restart of an exit at ``now``: (its delay, whether it crash-loops)."""
        if now - self.started_at >= policy.stable_after_s:
            self.consecutive = 0
        self.exits = [t for t in self.exits if now - t < policy.crash_loop_window_s]
        self.exits.append(now)
        delay = policy.backoff_s[min(self.consecutive, len(policy.backoff_s) - 1)]
        self.consecutive += 1
        self.restart_at = now + delay
        return delay, len(self.exits) >= policy.crash_loop_exits


class StackStatus:
    """``<state dir>/up-status.json``: each component of the running `up`, ``running``,
    ``restarting`` (down, with when it starts again) or, the broker only, ``starting``
    (being started again, since ``starting_since``), rewritten (atomically) at each change;
    `tollgate status` prints it. Before, the terminal alone said a component was down."""

    def __init__(
        self,
        path: Path | None,
        clock: Callable[[], float] = time.monotonic,
        pid: int | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid  # the `up` it describes
        self.components: dict[str, dict[str, Any]] = {}

    def set(self, name: str, watch: _Watch, **fields: Any) -> None:
        restart_in = None if watch.restart_at is None else watch.restart_at - self.clock()
        self.components[name] = {
            **self.components.get(name, {}),
            "name": name,
            "state": "running" if watch.restart_at is None else "restarting",
            "restarts": watch.restarts,
            "backoff_s": None if restart_in is None else round(max(restart_in, 0.0), 1),
            "restart_at": None
            if restart_in is None
            else datetime.fromtimestamp(time.time() + restart_in, UTC).isoformat(),
            **fields,
        }
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        body = {
            "pid": self.pid,
            "updated_at": datetime.now(UTC).isoformat(),
            "components": list(self.components.values()),
        }
        scratch = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch.write_text(json.dumps(body, indent=2) + "\n")
            os.replace(scratch, self.path)
        except OSError as exc:  # the stack runs on; only `tollgate status` misses it
            log.warning("cannot write %s: %s", self.path, exc)


class Supervisor:
    """Restarts services that exit, with a capped backoff, for as long as `up` runs.

    ``check()`` is one supervision step (``run_stack`` calls it a few times a second).
    A restart only spawns the process: if it dies again, the next steps see it. Each exit
    is said on the terminal with the end of the service's log (a crash loop louder), and
    ``status`` says which services are down meanwhile. It never gives up: a service that
    crashed on a dependency not there yet (Kafka, a port, a disk) comes back once it is.
    """

    def __init__(
        self,
        services: list[Service],
        env: dict[str, str],
        echo: Callable[[str], None],
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        status: StackStatus | None = None,
    ) -> None:
        self.services = services
        self.env = env
        self.echo = echo
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.status = status or StackStatus(None, clock)
        now = clock()
        self.watches = {s.name: _Watch(started_at=now) for s in services}
        for service in services:
            self.status.set(
                service.name,
                self.watches[service.name],
                url=service.url,
                listens=None if service.port is None else [service.host, service.port],
                log=str(service.log_file),
            )

    def down(self) -> list[str]:
        """The services waiting for their restart."""
        return [name for name, w in self.watches.items() if w.restart_at is not None]

    def check(self) -> None:
        now = self.clock()
        for service in self.services:
            watch = self.watches[service.name]
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    watch.restart_at = None
                    watch.restarts += 1
                    watch.started_at = now
                    service.spawn(self.env)
                    self.status.set(service.name, watch, crash_looping=watch.looping)
                    self.echo(f"{service.name} restarted (restart #{watch.restarts})")
                continue
            process = service.process
            if process is None:
                continue
            if process.poll() is None:
                if watch.looping and now - watch.started_at >= self.policy.stable_after_s:
                    watch.looping = False  # it has stayed up: no longer crash-looping
                    self.status.set(service.name, watch, crash_looping=False)
                continue
            self._exited(service, watch, process.returncode, now)

    def _exited(self, service: Service, watch: _Watch, code: int, now: float) -> None:
        policy = self.policy
        delay, looping = watch.exited(now, policy)
        watch.looping = looping or watch.looping
        self.status.set(service.name, watch, last_exit_code=code, crash_looping=watch.looping)
        last_lines = tail(service.log_file)
        if looping:
            self.echo(
                f"{service.name} exited with code {code}, {len(watch.exits)} times within "
                f"{policy.crash_loop_window_s:.0f}s: it is crash-looping; restarting it in "
                f"{delay:g}s (and on, at most {policy.backoff_s[-1]:g}s apart, until it stays "
                f"up; the rest of the stack keeps running). Fix the cause: see "
                f"{service.log_file}. Last lines:\n{last_lines}"
            )
            return
        self.echo(
            f"{service.name} exited with code {code}; restarting it in {delay:g}s. "
            f"Last lines of {service.log_file}:\n{last_lines}"
        )


class KafkaLike(Protocol):
    def status(self) -> Any: ...

    def start(self, stop_requested: Callable[[], bool] | None = None) -> Any: ...


class KafkaKeeper:
    """Starts the broker `up` started again when it dies (killed, out of memory): without it
    the services retry for ever against nothing and every call spools. ``check()`` looks
    every ``every_s`` seconds; restarts follow the same capped backoff as the services', for
    as long as `up` runs. ``kafka.start()`` blocks until the broker answers (up to a minute
    on a loaded machine), so it runs in a thread of its own: ``check()`` returns at once and
    the loop that calls it goes on supervising the services (a newcomer's probe found a
    dispatcher killed during a Kafka restart left dead, not even reaped, until the broker
    answered). The status file says ``starting`` meanwhile. ``close()`` stops a start in
    progress: the broker being started is stopped, not left running after `up` has gone,
    and `tollgate down` need not wait for it to answer (up to 120 s, past its 90 s)."""

    def __init__(
        self,
        kafka: KafkaLike,
        echo: Callable[[str], None],
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 2.0,
        status: StackStatus | None = None,
    ) -> None:
        self.kafka = kafka
        self.echo = echo
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.every_s = every_s
        self.status = status or StackStatus(None, clock)
        self.watch = _Watch(started_at=clock())
        self.next_look = clock() + every_s
        self.starting: Future[Any] | None = None  # the start in progress, in its thread
        # ``close()`` was called: a start in progress stops (its thread reads the flag)
        self.closing = False
        self.status.set("kafka", self.watch)

    def check(self) -> None:
        watch, now = self.watch, self.clock()
        if self.starting is not None:
            if self.starting.done():
                self._started(self.starting)
            return
        if watch.restart_at is not None:
            if now >= watch.restart_at:
                watch.restart_at = None
                self._start()
            return
        if now < self.next_look:
            return
        self.next_look = now + self.every_s
        if self.kafka.status().running:
            return
        self._down(now, "Kafka exited (its process is gone)")

    def stop_starting(self) -> None:
        """Ask a start in progress to stop, and return at once (``close()`` waits for it)."""
        if not self.closing and self.starting is not None and not self.starting.done():
            self.echo("stopping the Kafka start in progress ...")
        self.closing = True

    def close(self) -> None:
        """Stop a start in progress and wait for it to end: LocalKafka stops the broker it
        was starting once a metadata probe under way ends (5 s at most), SIGTERM then,
        after 10 s, SIGKILL."""
        self.stop_starting()
        if self.starting is not None and not self.starting.done():
            with contextlib.suppress(Exception):
                self.starting.exception()

    def _start(self) -> None:
        watch = self.watch
        watch.restarts += 1
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()

        def start() -> None:
            try:
                future.set_result(self.kafka.start(stop_requested=lambda: self.closing))
            except BaseException as exc:  # LauncherError and the like: said by check()
                future.set_exception(exc)

        self.starting = future
        self.status.set(
            "kafka", watch, state="starting", starting_since=datetime.now(UTC).isoformat()
        )
        self.echo(
            f"starting Kafka again (restart #{watch.restarts}); the services keep running "
            "and being restarted meanwhile"
        )
        threading.Thread(target=start, name="kafka-start", daemon=True).start()

    def _started(self, future: Future[Any]) -> None:
        watch = self.watch
        self.starting = None
        try:
            result = future.result()
        except Exception as exc:  # LauncherError and the like: counted as another exit
            self._down(self.clock(), f"Kafka did not start again: {exc}")
            return
        watch.started_at = self.clock()
        self.next_look = watch.started_at + self.every_s
        self.status.set("kafka", watch, crash_looping=False, starting_since=None)
        self.echo(
            f"Kafka restarted (restart #{watch.restarts}, ready in {result.start_seconds:.1f}s); "
            "the services reconnect on their own"
        )

    def _down(self, now: float, why: str) -> None:
        watch, policy = self.watch, self.policy
        delay, looping = watch.exited(now, policy)
        self.status.set("kafka", watch, crash_looping=looping, last_error=why)
        if looping:
            self.echo(
                f"{why}. It went down {len(watch.exits)} times within "
                f"{policy.crash_loop_window_s:.0f}s; restarting it in {delay:g}s (and on, at "
                f"most {policy.backoff_s[-1]:g}s apart, until it stays up: the services keep "
                "retrying and the dispatcher spools usage meanwhile). Fix the cause: see the "
                "Kafka log."
            )
            return
        self.echo(f"{why}; restarting it in {delay:g}s (the dispatcher spools usage meanwhile)")


def stop_waves(services: list[Service]) -> list[list[Service]]:
    """The services in the order `up` stops them, each wave's together: the dispatcher
    first (its last events flushed to Kafka while what reads them still runs), then the
    sink and the agents at once (one after another, each waiting out its own Kafka clients
    with Kafka away, a stop took 46 s on a loaded machine, and up to 20 s each: past
    `tollgate down`'s 90 s), and the simulator last (the dispatcher's upstream until the
    calls in flight end)."""
    first = [s for s in services if s.name == "dispatcher"]
    last = [s for s in services if s.name == "simulator"]
    middle = [s for s in reversed(services) if s.name not in ("dispatcher", "simulator")]
    return [wave for wave in (first, middle, last) if wave]


def stop_started(
    services: list[Service], keeper: KafkaKeeper | None, stop_kafka: Callable[[], object] | None
) -> None:
    """What `up` started, stopped: a restart of the broker in progress (``keeper``) asked
    to stop first, so that it stops while the services do (they took 46 s, one after
    another with Kafka away, on a loaded machine: the broker answered meanwhile, only to be
    stopped), then the services (``stop_waves``), the restart waited for (the broker it
    was starting is stopped, not left), and the broker."""
    if keeper is not None:
        keeper.stop_starting()
    for wave in stop_waves(services):
        if len(wave) == 1:
            wave[0].stop()
            continue
        with ThreadPoolExecutor(len(wave), thread_name_prefix="stop") as pool:
            list(pool.map(Service.stop, wave))
    if keeper is not None:
        keeper.close()
    if stop_kafka is not None:
        stop_kafka()


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
    from devtools.kafka_local import LauncherError, LocalKafka, StartStopped

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
    keeper: KafkaKeeper | None = None
    services: list[Service] = []
    lines: list[str] = []
    try:
        host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
        if port_open(host or "127.0.0.1", int(port)):
            lines.append(f"Kafka        {settings.kafka_bootstrap} (already running, left as is)")
        else:
            echo(f"starting local Kafka {settings.kafka_version} on {settings.kafka_bootstrap} ...")
            result = kafka.start(stop_requested=lambda: stopping)  # `down` meanwhile
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
        status = StackStatus(up_status_file(settings))  # `tollgate status` reads it
        keeper = KafkaKeeper(kafka, echo, status=status) if started_kafka else None
        supervisor = Supervisor(services, env, echo, status=status)
        while not stopping:
            supervisor.check()  # a service that exits is restarted, with backoff
            if keeper is not None:
                keeper.check()  # and so is the broker `up` started
            time.sleep(0.3)
        return 0
    except StartStopped:  # `tollgate down` (or Ctrl-C) while the broker was starting
        echo("stopped while Kafka was starting; the broker being started was stopped")
        return 0
    except (StackError, LauncherError, TopicsError, WarehouseError) as exc:
        echo(f"error: {exc}")
        return 1
    finally:
        echo("stopping ...")
        stop_started(services, keeper, kafka.stop if started_kafka else None)
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
                up_status_file(settings).unlink(missing_ok=True)
        echo("stopped.")


def up_pid_file(settings: Settings) -> Path:
    """Where a running `tollgate up` writes its process id."""
    return settings.state_dir / "up.pid"


def up_status_file(settings: Settings) -> Path:
    """Where a running `tollgate up` says how each component is (``StackStatus``)."""
    return settings.state_dir / "up-status.json"


PROBE_TIMEOUT_S = 2.0  # how long `tollgate status` waits for a component's HTTP answer


@dataclass(frozen=True)
class Probe:
    """One HTTP GET of a component by `tollgate status`: ``answer`` is ``answering`` (any
    HTTP status: the process serves), ``refused`` (nothing listens: not started yet, or
    gone) or ``silent`` (no HTTP answer in time: the kernel accepts connections for a hung
    or stopped process, so a TCP connect alone said "running" for a SIGSTOPped one)."""

    answer: str
    status: int | None = None
    body: bytes = b""
    why: str = ""


def probe_http(host: str, port: int, path: str, timeout_s: float = PROBE_TIMEOUT_S) -> Probe:
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return Probe("answering", response.status, response.read(1 << 16))
    except ConnectionRefusedError:
        return Probe("refused", why="connection refused")
    except TimeoutError:
        return Probe("silent", why=f"no HTTP answer within {timeout_s:g}s")
    except (OSError, http.client.HTTPException) as exc:
        return Probe("silent", why=f"no HTTP answer: {exc or type(exc).__name__}")
    finally:
        connection.close()


def _worker_counting(dispatcher: Probe) -> str | None:
    """Why the spend worker is not counting, as the dispatcher's /readyz says, or None
    (counting, or the dispatcher cannot say)."""
    try:
        checks = json.loads(dispatcher.body)["checks"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(checks, dict) or checks.get("spend_worker_counting") is not False:
        return None
    oldest = checks.get("spend_uncounted_oldest_s")
    waited = f"; spend uncounted for {oldest}s" if oldest is not None else ""
    return f"the dispatcher's /readyz says spend_worker_counting false{waited}"


def print_status(
    settings: Settings, echo: Callable[[str], None], probe_timeout_s: float = PROBE_TIMEOUT_S
) -> int:
    """`tollgate status`: each component of the `up` running here, as its supervisor last
    saw it and as it answers now: a listener must give an HTTP answer to GET /healthz within
    ``probe_timeout_s`` (refused: not answering, starting; silent: not answering, hung), and
    the spend worker, which has no listener, must be counting as the dispatcher's /readyz
    says. 0 when every one runs and answers; 3 when one is down, waiting for its restart (or
    the broker starting again), not answering, crash-looping (until a run of it lasts
    ``RestartPolicy.stable_after_s``), or the worker not counting; 3 also when no `up` runs
    here."""
    pid = running_up(settings)
    if pid is None:
        echo(f"no `tollgate up` is running here ({settings.state_dir})")
        return 3
    try:
        body = json.loads(up_status_file(settings).read_text())
    except (OSError, ValueError):
        body = {}
    if body.get("pid") != pid:
        echo(f"`tollgate up` (process {pid}) is starting; nothing supervised yet")
        return 3
    echo(f"`tollgate up` (process {pid}; {settings.dispatcher_url}/dashboard):")
    components = body.get("components", [])
    probes: dict[tuple[str, int, str], Probe] = {}

    def probe(listens: list[Any], path: str) -> Probe:
        key = (str(listens[0]), int(listens[1]), path)
        if key not in probes:
            probes[key] = probe_http(*key, timeout_s=probe_timeout_s)
        return probes[key]

    dispatcher = next(
        (c for c in components if c["name"] == "dispatcher" and c.get("listens")), None
    )
    down = 0
    for c in components:
        serving = False
        if c["state"] == "restarting":
            why = f"last exit code {c['last_exit_code']}" if "last_exit_code" in c else ""
            why = why or c.get("last_error") or "down"
            at = datetime.fromisoformat(c["restart_at"])
            wait_s = max(0.0, (at - datetime.now(UTC)).total_seconds())
            state = (
                f"restarting in {wait_s:.0f}s (at {at:%H:%M:%S} UTC; {why}; "
                f"restart #{c['restarts'] + 1})"
            )
        elif c["state"] == "starting":  # the broker, started again in the background
            since = datetime.fromisoformat(c["starting_since"])
            for_s = max(0.0, (datetime.now(UTC) - since).total_seconds())
            state = f"starting again (restart #{c['restarts']}, for {for_s:.0f}s)"
        elif c.get("listens"):
            answer = probe(c["listens"], "/healthz")
            if answer.answer == "refused":
                state = f"not answering on {c['url']} (starting, or gone: {answer.why})"
            elif answer.answer == "silent":
                state = f"not answering on {c['url']} ({answer.why}: hung or stopped?)"
            else:
                serving = True
                state = f"running {c['url']}"
        elif c["name"] == "spend-worker" and dispatcher is not None:
            seen = probe(dispatcher["listens"], "/readyz")
            stale = _worker_counting(seen) if seen.answer == "answering" else None
            serving = stale is None
            state = f"worker not counting ({stale})" if stale else "running"
        else:
            serving = True
            state = "running" + (f" {c['url']}" if c.get("url") else "")
        if c.get("crash_looping"):
            serving = False
            state += (
                f", crash-looping (said so until it stays up {RestartPolicy().stable_after_s:g}s)"
            )
        if not serving:
            down += 1
        where = f"; log {c['log']}" if c.get("log") else ""
        echo(f"  {c['name']:<12} {state}{where}")
    return 3 if down else 0


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
