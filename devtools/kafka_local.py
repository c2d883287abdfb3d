"""Local single-node Apache Kafka (KRaft) broker for development and tests, without Docker.

Owns everything about the broker that ``tollgate kafka start|stop|status``, ``make up`` and
the test fixtures run on this machine:

* the broker jars: fetched once from Maven Central with ``mvn`` (``deploy/kafka/pom.xml``)
  into ``settings.kafka_cache_dir / "kafka-<version>" / "libs"``; a marker file written only
  after a complete download tells a finished download from an interrupted one;
* the broker state under ``settings.state_dir / "kafka"``: ``server.properties``,
  ``cluster.id``, the KRaft storage in ``data/`` (formatted once), ``kafka.log`` (the
  broker's stdout and stderr; the previous run's is kept as ``kafka.log.1``) and
  ``kafka.pid``;
* starting the broker as a detached daemon (``java ... kafka.Kafka server.properties`` in
  its own session, so it outlives the CLI), waiting until it answers a real metadata
  request, reporting whether it runs, and stopping it (SIGTERM, then SIGKILL).

The library prints nothing: it returns :class:`StartResult` / :class:`KafkaStatus`,
raises :class:`LauncherError` with a message that says what is wrong and what to do, and
logs progress with :mod:`logging`. POSIX only (process groups, ``fcntl`` locks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.events import clients
from app.settings import Settings

LOG = logging.getLogger(__name__)

#: ``deploy/kafka`` of a source checkout; may be absent in an installed wheel.
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "kafka"
POM_FILE = DEPLOY_DIR / "pom.xml"
LOG4J_FILE = DEPLOY_DIR / "log4j2.properties"

#: Written into the jar directory's parent only after ``mvn`` succeeded.
COMPLETE_MARKER = ".tollgate-complete"
#: SLF4J bindings of log4j 2: for slf4j-api 1.x and for slf4j-api 2.x.
SLF4J1_BINDING = "log4j-slf4j-impl"
SLF4J2_BINDING = "log4j-slf4j2-impl"

MVN_TIMEOUT_S = 900.0
JAVA_TOOL_TIMEOUT_S = 120.0
KILL_WAIT_S = 10.0
POLL_INTERVAL_S = 0.1
PROBE_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 30
NODE_ID = 1
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: JVM flags of Kafka's own ``kafka-run-class.sh`` (besides the heap).
JVM_OPTS = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
JAVA_HINT = "install a JDK 17+ (apt-get install openjdk-17-jre-headless)"
MVN_HINT = "install Maven 3.6+ (apt-get install maven); it fetches the Kafka jars once"
_KAFKA_UUID = re.compile(r"^[A-Za-z0-9_-]{22}$")
_SLF4J_API = re.compile(r"^slf4j-api-(\d+)\.")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Fallback for an installed wheel without ``deploy/kafka`` (keep in sync with that file).
DEFAULT_LOG4J2 = """\
# Written by devtools/kafka_local.py (deploy/kafka/log4j2.properties was not found).
status = warn
name = tollgate-local-kafka
shutdownHook = disable
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.target = SYSTEM_OUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.requestchannel.name = kafka.network.RequestChannel$
logger.requestchannel.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.storage.name = org.apache.kafka.storage.internals.log
logger.storage.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""

#: Fallback for an installed wheel without ``deploy/kafka`` (keep in sync with that file).
DEFAULT_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by devtools/kafka_local.py (deploy/kafka/pom.xml was not found). -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tollgate</groupId>
  <artifactId>tollgate-local-kafka</artifactId>
  <version>1.0.0</version>
  <packaging>pom</packaging>
  <properties>
    <kafka.version>4.1.1</kafka.version>
    <log4j.version>2.24.3</log4j.version>
    <slf4j.binding>log4j-slf4j-impl</slf4j.binding>
  </properties>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>${kafka.version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>${log4j.version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>${slf4j.binding}</artifactId>
      <version>${log4j.version}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>3.8.1</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""

T = TypeVar("T")

#: Brokers spawned by this Python process, so that they can be reaped (no zombies) and
#: are not garbage-collected while running (which would warn).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class LauncherError(Exception):
    """The local broker cannot be fetched, started or stopped; the message says what to do."""


class StartStopped(LauncherError):
    """A start asked to stop (`tollgate down`, Ctrl-C) before the broker answered: the
    broker being started was stopped."""


def _stop_if_requested(stop_requested: Callable[[], bool] | None) -> None:
    if stop_requested is not None and stop_requested():
        raise StartStopped(
            "the Kafka start was asked to stop (`tollgate down` or Ctrl-C) before the broker "
            "answered; a broker it had spawned is stopped"
        )


@dataclass(frozen=True)
class KafkaStatus:
    running: bool
    pid: int | None
    bootstrap: str
    log_file: Path
    data_dir: Path


@dataclass(frozen=True)
class StartResult:
    already_running: bool
    pid: int
    bootstrap: str
    downloaded: bool
    download_seconds: float
    start_seconds: float
    log_file: Path


# -- pure helpers ----------------------------------------------------------------------------
def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first ``host:port`` of a bootstrap list.

    Accepts ``PLAINTEXT://`` prefixes and bracketed IPv6 (``[::1]:9092``).
    """
    first = bootstrap.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    if first.startswith("["):
        host, sep, rest = first[1:].partition("]")
        port_text = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port_text = first.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LauncherError(
            f"cannot read host:port from kafka_bootstrap={bootstrap!r}: "
            "set TOLLGATE_KAFKA_BOOTSTRAP to e.g. 127.0.0.1:9092"
        )
    return host, int(port_text)


def host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prop(value: str) -> str:
    """Escape a value for a Java ``.properties`` file."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n")
    return "\\" + escaped if escaped.startswith((" ", "\t")) else escaped


def render_server_properties(host: str, port: int, controller_port: int, data_dir: Path) -> str:
    """The ``server.properties`` of a single-node KRaft broker+controller for dev and tests."""
    broker = host_port(host, port)
    controller = host_port(host, controller_port)
    props = {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
        "advertised.listeners": f"PLAINTEXT://{broker}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.quorum.bootstrap.servers": controller,
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
    }
    lines = [
        "# Written by devtools/kafka_local.py: a single-node KRaft broker for dev and tests.",
        "# Regenerated when settings change; edits here are overwritten.",
        *(f"{key}={_prop(value)}" for key, value in props.items()),
    ]
    return "\n".join(lines) + "\n"


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ("" if it does not exist)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _text_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-blank lines of a tool's output, without terminal colours."""
    kept = [line for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:  # our own child: poll() is exact, and reaps it
        if child.poll() is None:
            return True
        # It exited (reaped now, or before): the pid is free, and may already be another
        # process's (pids wrap). The OS says which, below; the old child's exit code does not.
        del _CHILDREN[pid]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def process_argv(pid: int) -> list[str] | None:
    """The command line of ``pid`` (None if it cannot be read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
        try:  # no /proc (macOS): ask ps; arguments with spaces are split, good enough here
            out = subprocess.run(
                ["ps", "-o", "args=", "-p", str(pid)],
                capture_output=True,
                text=True,
                check=False,
                timeout=5,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return out.split() or None
    except OSError:
        return None
    return [arg.decode("utf-8", "replace") for arg in raw.split(b"\0") if arg] or None


def is_broker_process(pid: int, server_properties: Path) -> bool:
    """True if ``pid`` is a live ``java ... kafka.Kafka <server_properties>`` process."""
    if not pid_alive(pid):
        return False
    argv = process_argv(pid)
    if not argv:
        return False
    return (
        Path(argv[0]).name.startswith("java")
        and "kafka.Kafka" in argv
        and str(server_properties) in argv
    )


def read_pid_file(pid_file: Path) -> int | None:
    """The pid in ``pid_file``, or None if it is missing or garbled."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def find_listener_pid(port: int) -> int | None:
    """Best effort (Linux ``/proc``): the pid of a process listening on TCP ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            for fd in (proc_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc_dir.name)
        except OSError:
            continue
    return None


def _describe_pid(pid: int | None) -> str:
    if pid is None:
        return ""
    argv = process_argv(pid) or ["?"]
    command = " ".join(argv)
    return f" (pid {pid}: {command[:120]}{'…' if len(command) > 120 else ''})"


def require_tool(name: str, hint: str) -> str:
    """Absolute path of executable ``name`` on PATH, else :class:`LauncherError`."""
    path = shutil.which(name)
    if path is None:
        raise LauncherError(f"{name} not found on PATH: {hint}")
    return path


def slf4j_api_major(libs: Path) -> int | None:
    """Major version of the ``slf4j-api`` jar in ``libs`` (None if there is none)."""
    for jar in libs.glob("slf4j-api-*.jar"):
        match = _SLF4J_API.match(jar.name)
        if match:
            return int(match.group(1))
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (serialises launchers of one state or cache dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _describe_cluster(
    settings: Settings, bootstrap: str | None, timeout_s: float
) -> dict[str, Any]:
    admin = clients.admin(
        settings,
        purpose="kafka-launcher",
        request_timeout_ms=int(timeout_s * 1000),  # a probe: its answer is due within timeout_s
        bootstrap=bootstrap,
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            return await admin.describe_cluster()
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def probe_metadata(
    settings: Settings, timeout_s: float = PROBE_TIMEOUT_S, *, bootstrap: str | None = None
) -> str | None:
    """A real Kafka metadata round trip: None if the broker answers with itself, else why not.
    ``bootstrap``: the address to probe, if not ``settings.kafka_bootstrap``."""
    try:
        cluster = _run_coroutine(_describe_cluster(settings, bootstrap, timeout_s))
    except Exception as exc:  # any failure just means "not ready yet"
        return f"{type(exc).__name__}: {exc}"
    if not cluster.get("brokers"):
        return "metadata lists no brokers yet"
    return None


# -- the launcher ----------------------------------------------------------------------------
class LocalKafka:
    """Fetch, start, stop and inspect the local single-node broker described by ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.version = settings.kafka_version
        self.host, self.port = parse_bootstrap(settings.kafka_bootstrap)
        self.controller_port = settings.kafka_controller_port
        self.bootstrap = host_port(self.host, self.port)
        self.home = settings.state_dir.resolve() / "kafka"
        self.data_dir = self.home / "data"
        self.server_properties = self.home / "server.properties"
        self.log_file = self.home / "kafka.log"
        self.pid_file = self.home / "kafka.pid"
        self.cluster_id_file = self.home / "cluster.id"
        self.dist_dir = settings.kafka_cache_dir.resolve() / f"kafka-{self.version}"
        self.libs_dir = self.dist_dir / "libs"

    # -- jars ----------------------------------------------------------------------------------
    def jars_complete(self) -> bool:
        """True if a previous download finished (marker written after success)."""
        return (self.dist_dir / COMPLETE_MARKER).is_file() and any(
            self.libs_dir.glob("kafka_2.13-*.jar")
        )

    def ensure_jars(self) -> tuple[Path, bool, float]:
        """Fetch the broker jars once; returns (libs dir, downloaded now?, seconds it took)."""
        if self.jars_complete():
            return self.libs_dir, False, 0.0
        mvn = require_tool("mvn", MVN_HINT)
        require_tool("java", JAVA_HINT)
        with _file_lock(self.dist_dir / ".lock"):
            if self.jars_complete():  # another launcher finished it while we waited
                return self.libs_dir, False, 0.0
            LOG.info(
                "fetching Kafka %s jars from Maven Central with mvn, first time only… (into %s)",
                self.version,
                self.libs_dir,
            )
            started = time.monotonic()
            (self.dist_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            partial = self.dist_dir / "libs.partial"
            shutil.rmtree(partial, ignore_errors=True)
            self._mvn_copy(mvn, partial, SLF4J1_BINDING)
            major = slf4j_api_major(partial)
            if major is not None and major >= 2:
                LOG.info("Kafka %s uses slf4j-api %d.x: switching binding", self.version, major)
                shutil.rmtree(partial)
                self._mvn_copy(mvn, partial, SLF4J2_BINDING)
            if not any(partial.glob("kafka_2.13-*.jar")):
                raise LauncherError(
                    f"mvn succeeded but left no kafka_2.13 jar in {partial}: "
                    f"check {self._pom()} and retry"
                )
            shutil.rmtree(self.libs_dir, ignore_errors=True)
            partial.rename(self.libs_dir)
            (self.dist_dir / COMPLETE_MARKER).write_text(f"Apache Kafka {self.version}\n")
            seconds = time.monotonic() - started
            LOG.info("Kafka %s jars ready in %.1f s", self.version, seconds)
            return self.libs_dir, True, seconds

    def _pom(self) -> Path:
        if POM_FILE.is_file():
            return POM_FILE
        fallback = self.dist_dir / "pom.xml"
        if not fallback.is_file() or fallback.read_text() != DEFAULT_POM:
            _write_atomic(fallback, DEFAULT_POM)
        return fallback

    def _mvn_copy(self, mvn: str, out_dir: Path, binding: str) -> None:
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(self._pom()),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={out_dir}",
            f"-Dkafka.version={self.version}",
            f"-Dslf4j.binding={binding}",
        ]
        LOG.debug("running %s", shlex.join(cmd))
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.dist_dir,
                timeout=MVN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            output = exc.output if isinstance(exc.output, str) else ""
            raise LauncherError(
                f"mvn did not finish within {MVN_TIMEOUT_S:.0f} s fetching Kafka {self.version}: "
                "check that Maven Central (repo.maven.apache.org) is reachable and retry. "
                f"Last lines of its output:\n{_text_tail(output)}"
            ) from exc
        if proc.returncode != 0:
            raise LauncherError(
                f"mvn failed (exit {proc.returncode}) fetching Kafka {self.version} jars: check "
                "that Maven Central is reachable and that org.apache.kafka:kafka_2.13:"
                f"{self.version} exists (TOLLGATE_KAFKA_VERSION), then retry. "
                f"Last lines of mvn's output:\n{_text_tail(proc.stdout)}"
            )

    # -- configuration and storage ---------------------------------------------------------
    def write_server_properties(self) -> bool:
        """Write ``server.properties`` if it is missing or differs; True if it was written.

        Existing storage is kept: a port change does not re-format ``data/``.
        """
        text = render_server_properties(self.host, self.port, self.controller_port, self.data_dir)
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            current: str | None = self.server_properties.read_text()
        except OSError:
            current = None
        if current == text:
            return False
        if current is not None:
            LOG.info("settings changed: rewriting %s (storage kept)", self.server_properties)
        _write_atomic(self.server_properties, text)
        return True

    def storage_formatted(self) -> bool:
        return (self.data_dir / "meta.properties").is_file()

    def _log4j_config(self) -> Path:
        if LOG4J_FILE.is_file():
            return LOG4J_FILE
        fallback = self.home / "log4j2.properties"
        if not fallback.is_file() or fallback.read_text() != DEFAULT_LOG4J2:
            _write_atomic(fallback, DEFAULT_LOG4J2)
        return fallback

    def _run_java_tool(self, java: str, libs: Path, main: str, *args: str) -> str:
        cmd = [
            java,
            f"-Dlog4j2.configurationFile={self._log4j_config()}",
            "-cp",
            str(libs / "*"),
            main,
            *args,
        ]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.home,
                timeout=JAVA_TOOL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LauncherError(
                f"{main} {' '.join(args[:1])} did not finish within {JAVA_TOOL_TIMEOUT_S:.0f} s"
            ) from exc
        if proc.returncode != 0:
            raise LauncherError(
                f"{main} {' '.join(args[:1])} failed (exit {proc.returncode}); if the jars in "
                f"{libs} are damaged, delete {self.dist_dir} and retry. Last lines of its "
                f"output:\n{_text_tail(proc.stdout)}"
            )
        return proc.stdout

    def _format_storage(self, java: str, libs: Path) -> None:
        """Format KRaft storage in ``data/`` unless it already is (never re-formats)."""
        if self.storage_formatted():
            return
        if self.data_dir.exists():  # a format that never finished: nothing in it to keep
            shutil.rmtree(self.data_dir)
        cluster_id = (
            self.cluster_id_file.read_text().strip() if self.cluster_id_file.is_file() else ""
        )
        if not _KAFKA_UUID.match(cluster_id):
            output = self._run_java_tool(java, libs, "kafka.tools.StorageTool", "random-uuid")
            ids = [line.strip() for line in output.splitlines() if _KAFKA_UUID.match(line.strip())]
            if not ids:
                raise LauncherError(
                    f"StorageTool random-uuid printed no cluster id:\n{_text_tail(output)}"
                )
            cluster_id = ids[-1]
            _write_atomic(self.cluster_id_file, cluster_id + "\n")
        LOG.info("formatting KRaft storage in %s (cluster id %s)", self.data_dir, cluster_id)
        self._run_java_tool(
            java,
            libs,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.server_properties),
            "--standalone",
        )

    # -- processes -------------------------------------------------------------------------
    def _our_pid(self, *, clean: bool) -> int | None:
        """The pid of our running broker, per ``kafka.pid`` or else per the port's listener.

        With ``clean``, a stale pid file is removed and a lost one rewritten.
        """
        pid = read_pid_file(self.pid_file)
        if pid is not None and is_broker_process(pid, self.server_properties):
            return pid
        if clean and self.pid_file.exists():
            LOG.info("removing stale pid file %s (pid %s is not our broker)", self.pid_file, pid)
            self.pid_file.unlink(missing_ok=True)
        orphan = self._listener_if_ours(self.port)
        if orphan is not None and clean:
            LOG.info("found our broker (pid %d) without its pid file: adopting it", orphan)
            _write_atomic(self.pid_file, f"{orphan}\n")
        return orphan

    def _listener_if_ours(self, port: int) -> int | None:
        if not port_open(self.host, port):
            return None
        owner = find_listener_pid(port)
        if owner is not None and is_broker_process(owner, self.server_properties):
            return owner
        return None

    def _check_ports_free(self) -> None:
        """Raise :class:`LauncherError` if another process listens on our ports."""
        for port, what, env in (
            (self.port, "Kafka", "TOLLGATE_KAFKA_BOOTSTRAP"),
            (self.controller_port, "KRaft controller", "TOLLGATE_KAFKA_CONTROLLER_PORT"),
        ):
            if not port_open(self.host, port):
                continue
            use_it = (
                " If it is a Kafka broker you want to use, set TOLLGATE_KAFKA_BOOTSTRAP to its "
                "address and do not start a local one."
                if port == self.port
                else ""
            )
            raise LauncherError(
                f"port {host_port(self.host, port)} ({what} port) is in use by another process"
                f"{_describe_pid(find_listener_pid(port))}, not by this launcher's broker."
                f"{use_it} Otherwise stop that process or pick a free port with {env}."
            )

    def _spawn(self, java: str, libs: Path) -> subprocess.Popen[bytes]:
        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_name(self.log_file.name + ".1"))
        cmd = [
            java,
            *shlex.split(self._settings.kafka_heap_opts),
            *JVM_OPTS,
            f"-Dlog4j2.configurationFile={self._log4j_config()}",
            "-cp",
            str(libs / "*"),
            "kafka.Kafka",
            str(self.server_properties),
        ]
        LOG.debug("starting %s", shlex.join(cmd))
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,  # a daemon: survives the CLI and its Ctrl-C
                close_fds=True,
            )
        _CHILDREN[proc.pid] = proc
        _write_atomic(self.pid_file, f"{proc.pid}\n")
        return proc

    def _wait_ready(
        self,
        proc: subprocess.Popen[bytes],
        started: float,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        timeout_s = self._settings.kafka_start_timeout_s
        deadline = started + timeout_s
        last = "port not open yet"
        while True:
            _stop_if_requested(stop_requested)
            code = proc.poll()
            if code is not None:
                _CHILDREN.pop(proc.pid, None)
                self.pid_file.unlink(missing_ok=True)
                raise LauncherError(
                    f"Kafka exited with code {code} during start-up. "
                    f"Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            if port_open(self.host, self.port):
                remaining = max(0.5, min(PROBE_TIMEOUT_S, deadline - time.monotonic()))
                problem = probe_metadata(self._settings, remaining, bootstrap=self.bootstrap)
                if problem is None:
                    return
                last = problem
            if time.monotonic() >= deadline:
                raise LauncherError(
                    f"Kafka did not become ready on {self.bootstrap} within {timeout_s:.0f} s "
                    f"(last check: {last}); it was stopped. Raise TOLLGATE_KAFKA_START_TIMEOUT_S "
                    f"on a slow machine. Last lines of {self.log_file}:\n{tail(self.log_file)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _terminate(self, pid: int, timeout_s: float) -> None:
        """SIGTERM the broker's process group, wait, then SIGKILL it."""
        try:
            own_group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return

        def signal_group(sig: signal.Signals) -> None:
            with contextlib.suppress(ProcessLookupError):
                if own_group:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)

        signal_group(signal.SIGTERM)
        if not self._wait_exit(pid, timeout_s):
            LOG.warning("Kafka (pid %d) did not stop within %.0f s: killing it", pid, timeout_s)
            signal_group(signal.SIGKILL)
            if not self._wait_exit(pid, KILL_WAIT_S):
                raise LauncherError(f"Kafka (pid {pid}) is still alive after SIGKILL")
        if own_group:  # anything left in the broker's group
            signal_group(signal.SIGKILL)
        child = _CHILDREN.pop(pid, None)
        if child is not None:  # dead by now: reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)

    @staticmethod
    def _wait_exit(pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    # -- public API ------------------------------------------------------------------------
    def start(self, stop_requested: Callable[[], bool] | None = None) -> StartResult:
        """Start the broker (fetching jars and formatting storage the first time) and wait
        until it answers metadata requests. Idempotent: an already running broker is reused.

        ``stop_requested`` is asked between the steps and while waiting (every 0.1 s, or
        after a metadata probe of up to 5 s): once it says so, the broker being started is
        stopped and :class:`StartStopped` raised (`tollgate down` while `up` starts the
        broker waited for the whole start, up to ``kafka_start_timeout_s``: 120 s).
        """
        if self.host not in LOCAL_HOSTS:
            raise LauncherError(
                f"kafka_bootstrap={self._settings.kafka_bootstrap!r} is not a local address: the "
                "local launcher only runs a broker on 127.0.0.1/localhost. Use that broker as is, "
                "or set TOLLGATE_KAFKA_BOOTSTRAP=127.0.0.1:9092 for a local one."
            )
        self.home.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.home / ".lock"):
            pid = self._our_pid(clean=True)
            if pid is not None:
                LOG.info("Kafka already running on %s (pid %d)", self.bootstrap, pid)
                return StartResult(
                    already_running=True,
                    pid=pid,
                    bootstrap=self.bootstrap,
                    downloaded=False,
                    download_seconds=0.0,
                    start_seconds=0.0,
                    log_file=self.log_file,
                )
            self._check_ports_free()
            java = require_tool("java", JAVA_HINT)
            libs, downloaded, download_seconds = self.ensure_jars()
            _stop_if_requested(stop_requested)
            self.write_server_properties()
            self._format_storage(java, libs)
            _stop_if_requested(stop_requested)
            started = time.monotonic()
            proc = self._spawn(java, libs)
            LOG.info(
                "Kafka %s starting on %s (pid %d); log %s",
                self.version,
                self.bootstrap,
                proc.pid,
                self.log_file,
            )
            try:
                self._wait_ready(proc, started, stop_requested)
            except BaseException:  # timeout, Ctrl-C, a stop: do not leave a half-started daemon
                if proc.poll() is None:
                    self._terminate(proc.pid, KILL_WAIT_S)
                self.pid_file.unlink(missing_ok=True)
                raise
            seconds = time.monotonic() - started
            LOG.info("Kafka ready on %s in %.1f s", self.bootstrap, seconds)
            return StartResult(
                already_running=False,
                pid=proc.pid,
                bootstrap=self.bootstrap,
                downloaded=downloaded,
                download_seconds=download_seconds,
                start_seconds=seconds,
                log_file=self.log_file,
            )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker (controlled shutdown, SIGKILL after ``timeout_s``).

        True if it was running and is now stopped; False if it was not running.
        """
        if not self.home.is_dir():
            return False
        with _file_lock(self.home / ".lock"):
            pid = self._our_pid(clean=True)
            if pid is None:
                return False
            LOG.info("stopping Kafka (pid %d)…", pid)
            self._terminate(pid, timeout_s)
            self.pid_file.unlink(missing_ok=True)
            LOG.info("Kafka stopped")
            return True

    def status(self) -> KafkaStatus:
        """Whether our broker runs (read-only: a stale or lost pid file is left as it is)."""
        pid = self._our_pid(clean=False)
        return KafkaStatus(
            running=pid is not None,
            pid=pid,
            bootstrap=self.bootstrap,
            log_file=self.log_file,
            data_dir=self.data_dir,
        )
