"""Unit tests of devtools/kafka_local.py that need no broker, no JDK and no network.

Real processes stand in for the broker (a Python process whose argv looks like
``java ... kafka.Kafka <server.properties>``) and for ``mvn``/``java`` (shell scripts on
PATH), so pid handling, signals and the download bookkeeping run for real.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from devtools import kafka_local
from devtools.kafka_local import (
    COMPLETE_MARKER,
    DEFAULT_POM,
    POM_FILE,
    LauncherError,
    LocalKafka,
    parse_bootstrap,
    pid_alive,
    render_server_properties,
    tail,
)


# -- helpers -----------------------------------------------------------------------------------
def free_ports(count: int = 2) -> list[int]:
    """Distinct TCP ports that are free right now (sockets held open together)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port() -> int:
    return free_ports(1)[0]


def parse_properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key] = value
    return props


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    port, controller_port = free_ports(2)
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "kafka_cache_dir": tmp_path / "cache",
        "kafka_bootstrap": f"127.0.0.1:{port}",
        "kafka_controller_port": controller_port,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def fake_jars(kafka: LocalKafka) -> None:
    """Pretend a complete download happened."""
    kafka.libs_dir.mkdir(parents=True)
    (kafka.libs_dir / "kafka_2.13-4.1.1.jar").touch()
    (kafka.dist_dir / COMPLETE_MARKER).touch()


def fake_formatted_storage(kafka: LocalKafka) -> None:
    kafka.data_dir.mkdir(parents=True)
    (kafka.data_dir / "meta.properties").write_text("node.id=1\n")


@contextlib.contextmanager
def fake_broker(
    kafka: LocalKafka, code: str = "import time; time.sleep(120)"
) -> Iterator[subprocess.Popen[str]]:
    """A process whose command line is ``java -c <code> kafka.Kafka <server.properties>``,
    recorded in the pid file; killed with its process group on exit."""
    kafka.home.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(
        ["java", "-c", code, "kafka.Kafka", str(kafka.server_properties)],
        executable=sys.executable,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        kafka.pid_file.write_text(f"{proc.pid}\n")
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory put first on PATH, holding a harmless fake ``java``."""
    bin_dir = tmp_path / "bin"
    write_script(bin_dir / "java", 'echo "fake java $*"\nexit 0\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    yield bin_dir


def fake_mvn(bin_dir: Path, calls: Path, slf4j: str = "1.7.36") -> None:
    """A fake ``mvn`` that records its arguments and "downloads" two jars."""
    write_script(
        bin_dir / "mvn",
        f"""echo "$*" >> "{calls}"
for arg in "$@"; do
  case "$arg" in
    -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}" ;;
  esac
done
mkdir -p "$out"
touch "$out/kafka_2.13-4.1.1.jar" "$out/slf4j-api-{slf4j}.jar"
""",
    )


# -- bootstrap and server.properties -----------------------------------------------------------
@pytest.mark.parametrize(
    ("bootstrap", "expected"),
    [
        ("127.0.0.1:9092", ("127.0.0.1", 9092)),
        ("localhost:19092,otherhost:9092", ("localhost", 19092)),
        ("PLAINTEXT://127.0.0.1:9094", ("127.0.0.1", 9094)),
        ("[::1]:9092", ("::1", 9092)),
    ],
)
def test_parse_bootstrap(bootstrap: str, expected: tuple[str, int]) -> None:
    assert parse_bootstrap(bootstrap) == expected


@pytest.mark.parametrize("bad", ["", "127.0.0.1", "host:port", "host:0", "host:70000"])
def test_parse_bootstrap_rejects_garbage(bad: str) -> None:
    with pytest.raises(LauncherError, match="TOLLGATE_KAFKA_BOOTSTRAP"):
        parse_bootstrap(bad)


def test_render_server_properties(tmp_path: Path) -> None:
    data = tmp_path / "state" / "kafka" / "data"
    props = parse_properties(render_server_properties("127.0.0.1", 19092, 19093, data))
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["inter.broker.listener.name"] == "PLAINTEXT"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert "controller.quorum.voters" not in props  # --standalone formats a dynamic quorum
    assert props["log.dirs"] == str(data)
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["num.partitions"] == "1"
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_render_server_properties_ipv6() -> None:
    props = parse_properties(render_server_properties("::1", 9092, 9093, Path("/d")))
    assert props["listeners"] == "PLAINTEXT://[::1]:9092,CONTROLLER://[::1]:9093"
    assert props["controller.quorum.bootstrap.servers"] == "[::1]:9093"


def test_server_properties_rewritten_on_port_change_without_touching_storage(
    tmp_path: Path,
) -> None:
    first = LocalKafka(make_settings(tmp_path, kafka_bootstrap="127.0.0.1:19092"))
    assert first.write_server_properties() is True
    assert first.write_server_properties() is False  # unchanged: not rewritten
    fake_formatted_storage(first)

    moved = LocalKafka(
        make_settings(tmp_path, kafka_bootstrap="127.0.0.1:19192", kafka_controller_port=19193)
    )
    assert moved.write_server_properties() is True
    props = parse_properties(moved.server_properties.read_text())
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19192,CONTROLLER://127.0.0.1:19193"
    assert moved.storage_formatted()
    assert (moved.data_dir / "meta.properties").read_text() == "node.id=1\n"


def test_paths_follow_settings(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path, kafka_version="4.0.0"))
    assert kafka.libs_dir == (tmp_path / "cache" / "kafka-4.0.0" / "libs").resolve()
    assert kafka.home == (tmp_path / "state" / "kafka").resolve()
    status = kafka.status()
    assert status.running is False
    assert status.pid is None
    assert status.log_file == kafka.home / "kafka.log"
    assert status.data_dir == kafka.home / "data"
    assert status.bootstrap == kafka.bootstrap


# -- pid files ---------------------------------------------------------------------------------
def test_stale_pid_of_dead_process(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.home.mkdir(parents=True)
    kafka.pid_file.write_text(f"{dead_pid()}\n")

    status = kafka.status()
    assert (status.running, status.pid) == (False, None)
    assert kafka.pid_file.exists()  # status is read-only
    assert kafka.stop() is False  # nothing to stop ...
    assert not kafka.pid_file.exists()  # ... but the stale file is gone


def test_pid_reused_by_another_process_is_stale_and_left_alone(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.home.mkdir(parents=True)
    kafka.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not java kafka.Kafka

    assert kafka.status().running is False
    assert kafka.stop() is False
    assert not kafka.pid_file.exists()
    assert pid_alive(os.getpid())  # we were not signalled


def test_a_pid_of_a_child_that_exited_and_was_reused_is_judged_by_the_os(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker child of ours that exited stays in the launcher's table of children until
    polled; the pid can then be handed to another process (pids wrap near 32,768): it was
    judged dead by the old child's exit code, and a broker running under that pid was not
    seen (``test_running_broker_detected_and_stopped`` failed 1 run in 11 so)."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    kafka = LocalKafka(make_settings(tmp_path))
    with fake_broker(kafka) as proc:
        monkeypatch.setitem(kafka_local._CHILDREN, proc.pid, exited)  # the old child's pid
        assert pid_alive(proc.pid)
        assert (kafka.status().running, kafka.status().pid) == (True, proc.pid)
    monkeypatch.setitem(kafka_local._CHILDREN, exited.pid, exited)
    pid_alive(exited.pid)  # (whatever the OS says of that pid now: it may be reused)
    assert exited.pid not in kafka_local._CHILDREN


def test_garbled_pid_file(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.home.mkdir(parents=True)
    kafka.pid_file.write_text("not a pid\n")
    assert kafka.status().running is False
    assert kafka.stop() is False
    assert not kafka.pid_file.exists()


def test_broker_of_another_state_dir_is_not_ours(tmp_path: Path) -> None:
    ours = LocalKafka(make_settings(tmp_path / "a"))
    other = LocalKafka(make_settings(tmp_path / "b"))
    with fake_broker(other) as proc:
        ours.home.mkdir(parents=True)
        ours.pid_file.write_text(f"{proc.pid}\n")
        assert ours.status().running is False
        assert other.status().running is True


def test_running_broker_detected_and_stopped(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    with fake_broker(kafka) as proc:
        status = kafka.status()
        assert (status.running, status.pid) == (True, proc.pid)

        again = kafka.start()  # no java, no ports needed: it is already running
        assert again.already_running is True
        assert again.pid == proc.pid
        assert again.downloaded is False

        assert kafka.stop(timeout_s=10) is True
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert not kafka.pid_file.exists()
        assert kafka.status().running is False
        assert kafka.stop() is False


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    ignore_term = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    with fake_broker(kafka, ignore_term) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        assert kafka.stop(timeout_s=0.5) is True
        assert time.monotonic() - started < 10
        assert proc.wait(timeout=5) == -signal.SIGKILL


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path))
    # The fake broker forks a child (same process group) that ignores SIGTERM.
    forks = (
        "import os, signal, time\n"
        "ready_r, ready_w = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    os.write(ready_w, b'x')\n"
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "os.read(ready_r, 1)\n"
        "print(child, flush=True)\n"
        "time.sleep(120)\n"
    )
    with fake_broker(kafka, forks) as proc:
        assert proc.stdout is not None
        grandchild_pid = int(proc.stdout.readline())
        assert pid_alive(grandchild_pid)
        assert kafka.stop(timeout_s=10) is True
        assert proc.wait(timeout=5) == -signal.SIGTERM
        deadline = time.monotonic() + 5
        while pid_alive(grandchild_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(grandchild_pid)


# -- start pre-checks --------------------------------------------------------------------------
def test_port_in_use_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        kafka = LocalKafka(make_settings(tmp_path, kafka_bootstrap=f"127.0.0.1:{port}"))
        with pytest.raises(LauncherError) as info:
            kafka.start()
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "in use by another process" in message
    assert "TOLLGATE_KAFKA_BOOTSTRAP" in message
    if Path("/proc/net/tcp").exists():
        assert f"pid {os.getpid()}" in message


def test_controller_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        kafka = LocalKafka(make_settings(tmp_path, kafka_controller_port=port))
        with pytest.raises(LauncherError, match="TOLLGATE_KAFKA_CONTROLLER_PORT"):
            kafka.start()


def test_non_local_bootstrap_is_refused(tmp_path: Path) -> None:
    kafka = LocalKafka(make_settings(tmp_path, kafka_bootstrap="kafka.prod.internal:9092"))
    with pytest.raises(LauncherError, match="not a local address"):
        kafka.start()


def test_java_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    kafka = LocalKafka(make_settings(tmp_path))
    with pytest.raises(LauncherError) as info:
        kafka.start()
    assert str(info.value).startswith("java not found on PATH: install a JDK 17+")
    assert "openjdk-17" in str(info.value)


def test_mvn_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = kafka_local.shutil.which
    monkeypatch.setattr(
        kafka_local.shutil,
        "which",
        lambda name, *args, **kwargs: None if name == "mvn" else real_which(name, *args, **kwargs),
    )
    kafka = LocalKafka(make_settings(tmp_path))
    with pytest.raises(LauncherError, match=r"^mvn not found on PATH: install Maven"):
        kafka.ensure_jars()


# -- jar download bookkeeping ------------------------------------------------------------------
def test_mvn_failure_reports_its_output(tmp_path: Path, fake_bin: Path) -> None:
    write_script(
        fake_bin / "mvn",
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 "
        '30 31 32 33 34 35; do echo "noise $i"; done\n'
        'echo "[ERROR] Failed to execute goal: Could not resolve dependencies"\n'
        "exit 1\n",
    )
    kafka = LocalKafka(make_settings(tmp_path, kafka_version="9.9.9"))
    with pytest.raises(LauncherError) as info:
        kafka.ensure_jars()
    message = str(info.value)
    assert "mvn failed (exit 1)" in message
    assert "Could not resolve dependencies" in message
    assert "noise 35" in message
    assert "noise 5\n" not in message  # only the tail
    assert not (kafka.dist_dir / COMPLETE_MARKER).exists()
    assert not kafka.libs_dir.exists()


def test_download_once_then_cached(tmp_path: Path, fake_bin: Path) -> None:
    calls = tmp_path / "mvn-calls.txt"
    fake_mvn(fake_bin, calls)
    kafka = LocalKafka(make_settings(tmp_path))

    libs, downloaded, seconds = kafka.ensure_jars()
    assert (libs, downloaded) == (kafka.libs_dir, True)
    assert seconds > 0
    assert (libs / "kafka_2.13-4.1.1.jar").exists()
    assert (kafka.dist_dir / COMPLETE_MARKER).exists()
    [call] = calls.read_text().splitlines()
    assert "dependency:copy-dependencies" in call
    assert "-Dkafka.version=4.1.1" in call
    assert "-Dslf4j.binding=log4j-slf4j-impl" in call

    assert kafka.ensure_jars() == (libs, False, 0.0)
    assert len(calls.read_text().splitlines()) == 1  # mvn not run again


def test_interrupted_download_is_redone(tmp_path: Path, fake_bin: Path) -> None:
    calls = tmp_path / "mvn-calls.txt"
    fake_mvn(fake_bin, calls)
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.libs_dir.mkdir(parents=True)  # jars there, but no marker: the download was cut
    (kafka.libs_dir / "kafka_2.13-4.1.1.jar").touch()

    _, downloaded, _ = kafka.ensure_jars()
    assert downloaded is True
    assert len(calls.read_text().splitlines()) == 1
    assert (kafka.dist_dir / COMPLETE_MARKER).exists()


def test_slf4j2_switches_binding(tmp_path: Path, fake_bin: Path) -> None:
    calls = tmp_path / "mvn-calls.txt"
    fake_mvn(fake_bin, calls, slf4j="2.0.16")
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.ensure_jars()
    first, second = calls.read_text().splitlines()
    assert "-Dslf4j.binding=log4j-slf4j-impl" in first
    assert "-Dslf4j.binding=log4j-slf4j2-impl" in second


def test_default_pom_matches_deploy_pom() -> None:
    """The fallback pom (installed wheel) asks for the same artifacts as deploy/kafka/pom.xml."""

    def coordinates(xml: str) -> tuple[set[tuple[str, str]], dict[str, str]]:
        ns = {"m": "http://maven.apache.org/POM/4.0.0"}
        root = ET.fromstring(xml)
        deps = {
            (
                dep.findtext("m:groupId", namespaces=ns) or "",
                dep.findtext("m:artifactId", namespaces=ns) or "",
            )
            for dep in root.findall("m:dependencies/m:dependency", ns)
        }
        properties = root.find("m:properties", ns)
        assert properties is not None
        props = {child.tag.split("}")[1]: child.text or "" for child in properties}
        props.pop("project.build.sourceEncoding", None)
        return deps, props

    assert coordinates(DEFAULT_POM) == coordinates(POM_FILE.read_text())


# -- start failures (fake java, no broker) ----------------------------------------------------
def test_broker_dying_during_start_reports_log_tail(tmp_path: Path, fake_bin: Path) -> None:
    write_script(
        fake_bin / "java",
        'for i in $(seq 1 40); do echo "log line $i"; done\n'
        'echo "Error: UnsupportedClassVersionError"\n'
        "exit 1\n",
    )
    kafka = LocalKafka(make_settings(tmp_path))
    fake_jars(kafka)
    kafka.home.mkdir(parents=True)
    fake_formatted_storage(kafka)
    with pytest.raises(LauncherError) as info:
        kafka.start()
    message = str(info.value)
    assert "exited with code 1 during start-up" in message
    assert "UnsupportedClassVersionError" in message
    assert "log line 40" in message
    assert "log line 5\n" not in message  # last 30 lines only
    assert not kafka.pid_file.exists()


def test_start_timeout_kills_the_broker(tmp_path: Path, fake_bin: Path) -> None:
    write_script(fake_bin / "java", "exec sleep 120\n")
    kafka = LocalKafka(make_settings(tmp_path, kafka_start_timeout_s=1.0))
    fake_jars(kafka)
    kafka.home.mkdir(parents=True)
    fake_formatted_storage(kafka)
    children_before = set(kafka_local._CHILDREN)  # e.g. the integration tests' broker
    started = time.monotonic()
    with pytest.raises(LauncherError, match=r"did not become ready .* within 1 s"):
        kafka.start()
    assert time.monotonic() - started < 15
    assert not kafka.pid_file.exists()
    assert set(kafka_local._CHILDREN) == children_before, "the timed-out broker was reaped"


def test_a_start_asked_to_stop_stops_the_broker_it_was_starting(
    tmp_path: Path, fake_bin: Path
) -> None:
    """`make down` while `up` (re)starts the broker: the start went on until the broker
    answered or ``kafka_start_timeout_s`` (120 s) passed, past `tollgate down`'s 90 s. Asked
    to stop (``stop_requested``), it stops the broker it spawned and says so."""
    write_script(fake_bin / "java", "exec sleep 120\n")  # never answers
    kafka = LocalKafka(make_settings(tmp_path, kafka_start_timeout_s=20.0))
    fake_jars(kafka)
    kafka.home.mkdir(parents=True)
    fake_formatted_storage(kafka)
    children_before = set(kafka_local._CHILDREN)
    spawned: list[int] = []

    def stop_requested() -> bool:  # asked once the broker's process runs
        pid = kafka_local.read_pid_file(kafka.pid_file)
        if pid is not None:
            spawned.append(pid)
        return pid is not None

    with pytest.raises(kafka_local.StartStopped, match="asked to stop"):
        kafka.start(stop_requested=stop_requested)
    assert spawned and not kafka_local.pid_alive(spawned[0]), "the broker was stopped"
    assert not kafka.pid_file.exists()
    assert set(kafka_local._CHILDREN) == children_before, "and reaped"


def test_log4j_fallback_when_deploy_dir_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_local, "LOG4J_FILE", tmp_path / "missing" / "log4j2.properties")
    kafka = LocalKafka(make_settings(tmp_path))
    kafka.home.mkdir(parents=True)
    config = kafka._log4j_config()
    assert config == kafka.home / "log4j2.properties"
    assert "appender.stdout.type = Console" in config.read_text()


def test_tail(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"{i}\n" for i in range(100)))
    assert tail(log, 3) == "97\n98\n99"
    assert tail(tmp_path / "missing.log") == ""


def test_probe_metadata_reports_an_unreachable_broker(tmp_path: Path) -> None:
    problem = kafka_local.probe_metadata(make_settings(tmp_path), timeout_s=2.0)
    assert problem is not None


async def test_probe_metadata_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    # Called from async code (a fixture, the stack runner): must not hit "asyncio.run()
    # cannot be called from a running event loop".
    problem = kafka_local.probe_metadata(make_settings(tmp_path), timeout_s=2.0)
    assert problem is not None
    assert "running event loop" not in problem
