"""`tollgate down` (`make down`) stops the `tollgate up` of its state directory, and nothing
else (probes I and J stopped the stack with a signal by hand: there was no `make down`);
`tollgate status` says what that `up` runs."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from app.cli import main
from app.settings import Settings
from devtools.stack import (
    KafkaKeeper,
    RestartPolicy,
    Service,
    StackStatus,
    Supervisor,
    run_stack,
    stop_stack,
    up_pid_file,
    up_status_file,
)
from tests.ports import free_port

# A stand-in for `tollgate up`: its command line says so, and SIGTERM stops it.
FAKE_UP = (
    "import signal, time; signal.signal(signal.SIGTERM, lambda *_: exit(0)); "
    "print('ready', flush=True); time.sleep(60)"
)


@pytest.fixture
def fake_up(tmp_path: Path) -> Iterator[tuple[Settings, subprocess.Popen[str]]]:
    """A running stand-in for `tollgate up` of a state directory, its pid file written."""
    settings = Settings(state_dir=tmp_path)
    up = subprocess.Popen(
        [sys.executable, "-c", FAKE_UP, "tollgate", "up"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert up.stdout is not None and up.stdout.readline() == "ready\n"
        up_pid_file(settings).write_text(f"{up.pid}\n")
        yield settings, up
    finally:
        up.kill()
        up.wait()


def test_down_stops_the_stack_that_wrote_the_pid_file(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    settings, up = fake_up
    said: list[str] = []
    assert stop_stack(settings, said.append, timeout_s=30) == 0
    assert up.wait(5) == 0
    assert said[-1] == "stopped."


def test_down_with_nothing_running_or_a_stale_pid_touches_nothing(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    said: list[str] = []
    assert stop_stack(settings, said.append) == 0 and "no `tollgate up`" in said[-1]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        up_pid_file(settings).write_text(f"{other.pid}\n")  # a reused pid: not ours
        assert stop_stack(settings, said.append) == 0
        assert other.poll() is None, "killed a process that is not a `tollgate up`"
        assert not up_pid_file(settings).exists()
    finally:
        other.kill()


def test_up_again_in_the_same_checkout_leaves_the_running_stack_to_down(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    """A second `make up` next to a running one failed on the taken ports and removed the
    pid file as it left: `make down` then said nothing was running, and the stack ran on (a
    newcomer's probe). It now refuses at once, names the running stack, touches nothing."""
    settings, up = fake_up
    said: list[str] = []
    assert run_stack(settings, said.append) == 1
    assert "already running" in said[-1] and str(up.pid) in said[-1], said
    assert "make down" in said[-1]
    assert up_pid_file(settings).read_text() == f"{up.pid}\n"
    assert up.poll() is None
    assert stop_stack(settings, said.append, timeout_s=30) == 0  # and down still stops it
    assert up.wait(5) == 0


def _process(settings: Settings, name: str, code: str) -> Service:
    """A service of ``up`` without a listener: a Python process running ``code``."""
    return Service(
        name,
        [sys.executable, "-c", code],
        "127.0.0.1",
        None,
        "(no listener)",
        settings.state_dir / f"{name}.log",
    )


def test_status_says_which_component_is_down_until_it_is_restarted(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    """`tollgate status`: what the running `up` supervises, each component running or
    restarting (down, and when it starts again); exit code 3 while one is down. Before it,
    only `up`'s terminal said a component was down."""
    settings, up = fake_up
    now = [1000.0]
    status = StackStatus(up_status_file(settings), clock=lambda: now[0], pid=up.pid)
    lives = _process(settings, "lives", "import time; time.sleep(60)")
    dies = _process(settings, "dies", "raise SystemExit(2)")
    env = dict(os.environ)
    for service in (lives, dies):
        service.spawn(env)
    policy = RestartPolicy(backoff_s=(30,))
    supervisor = Supervisor([lives, dies], env, [].append, policy, lambda: now[0], status)

    def tollgate_status() -> tuple[int, str]:
        return _status_of(settings)

    try:
        code, text = tollgate_status()
        assert code == 0, text
        assert f"process {up.pid}" in text
        assert re.search(r"lives +running", text) and re.search(r"dies +running", text), text
        assert dies.process is not None
        dies.process.wait(30)
        supervisor.check()  # sees the exit: restart in 30 s
        code, text = tollgate_status()
        assert code == 3, text
        wait = re.search(r"dies +restarting in (\d+)s \(at .* UTC; last exit code 2;", text)
        assert wait and int(wait[1]) <= 30, text
        assert re.search(r"lives +running", text), text
        now[0] += 30
        supervisor.check()  # restarts it (it dies again; the next check would see it)
        assert "restarting" not in tollgate_status()[1]
    finally:
        lives.stop()
        dies.stop()
    up.kill()
    up.wait()
    code, text = tollgate_status()
    assert code == 3 and "no `tollgate up`" in text, text  # a stale file is not believed


class BrokerStartingAgain:
    """LocalKafka's status()/start() surface: a broker that died, its start held by the test."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def status(self) -> Any:
        return SimpleNamespace(running=False, pid=None)

    def start(self, stop_requested: Any = None) -> Any:
        self.release.wait(30)
        return SimpleNamespace(already_running=False, start_seconds=1.5)


def test_status_says_kafka_is_down_while_up_starts_it_again(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    """`up` starts the broker again in the background (probe 46 F1): meanwhile
    `tollgate status` says Kafka is starting, not running, and exits with 3."""
    settings, up = fake_up
    now = [1000.0]
    status = StackStatus(up_status_file(settings), clock=lambda: now[0], pid=up.pid)
    kafka = BrokerStartingAgain()
    policy = RestartPolicy(backoff_s=(1,))
    keeper = KafkaKeeper(kafka, [].append, policy, lambda: now[0], every_s=1, status=status)
    try:
        now[0] += 1
        keeper.check()  # sees it gone: restart in 1 s
        now[0] += 1
        keeper.check()  # begins the start
        assert keeper.starting is not None and not keeper.starting.done()
        result = CliRunner().invoke(
            main, ["status"], env={"TOLLGATE_STATE_DIR": str(settings.state_dir)}
        )
        assert result.exit_code == 3, result.output
        assert re.search(r"kafka +starting again \(restart #1, for \d+s\)", result.output), (
            result.output
        )
    finally:
        kafka.release.set()
        keeper.close()


def _status_of(settings: Settings) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["status"], env={"TOLLGATE_STATE_DIR": str(settings.state_dir)}
    )
    return result.exit_code, result.output


def _listed(settings: Settings, up_pid: int, *listeners: tuple[str, int | None]) -> Supervisor:
    """A status file as `up` writes it: each (name, port) running, as far as `up` knows."""
    status = StackStatus(up_status_file(settings), pid=up_pid)
    services = [
        Service(
            name,
            ["true"],
            "127.0.0.1",
            port,
            f"http://127.0.0.1:{port}" if port else "(no listener)",
            settings.state_dir / f"{name}.log",
        )
        for name, port in listeners
    ]
    return Supervisor(services, {}, [].append, status=status)


class Answers(http.server.BaseHTTPRequestHandler):
    """GET /healthz: ok; GET /readyz: the server's ``readyz`` body (503 unless ready)."""

    def do_GET(self) -> None:
        readyz = getattr(self.server, "readyz", {"ready": True, "checks": {}})
        if self.path == "/readyz":
            code, body = (200 if readyz["ready"] else 503), readyz
        elif self.path == "/healthz":
            code, body = 200, {"status": "ok"}
        else:
            code, body = 404, {"error": {"type": "not_found"}}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_status_exits_3_while_a_listener_refuses_connections(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    """Probe 56 F1: a dispatcher killed (or crash-looping) between two supervision steps was
    shown as "starting (not answering ... yet)" with exit 0 while its port refused calls."""
    settings, up = fake_up
    _listed(settings, up.pid, ("dispatcher", free_port()))  # nothing listens there
    code, text = _status_of(settings)
    assert code == 3, text
    assert re.search(r"dispatcher +not answering on http://127\.0\.0\.1:\d+ \(starting", text), text


def test_status_says_a_hung_listener_is_not_answering(
    fake_up: tuple[Settings, subprocess.Popen[str]],
    answering: http.server.ThreadingHTTPServer,
) -> None:
    """Probe 56 F3: a SIGSTOPped sink was "running", exit 0: the kernel accepts a TCP
    connection for a stopped process. A socket that accepts and never answers is one."""
    settings, up = fake_up
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections complete; nobody reads or answers them
        _listed(
            settings,
            up.pid,
            ("sink", hung.getsockname()[1]),
            ("simulator", answering.server_address[1]),
        )
        code, text = _status_of(settings)
    assert code == 3, text
    assert re.search(r"sink +not answering on http://127\.0\.0\.1:\d+ \(no HTTP answer", text), text
    assert re.search(r"simulator +running http://", text), text


def test_status_says_the_spend_worker_is_not_counting_as_the_dispatcher_sees_it(
    fake_up: tuple[Settings, subprocess.Popen[str]],
    answering: http.server.ThreadingHTTPServer,
) -> None:
    """Probe 56 F3: a stopped spend worker was "running", exit 0, while the dispatcher's
    /readyz said spend_worker_counting: false. The worker has no listener: its count is
    read there."""
    settings, up = fake_up
    port = answering.server_address[1]
    _listed(settings, up.pid, ("spend-worker", None), ("dispatcher", port))
    answering.readyz = {  # type: ignore[attr-defined]
        "ready": True,
        "checks": {"spend_worker_counting": False, "spend_uncounted_oldest_s": 41.5},
    }
    code, text = _status_of(settings)
    assert code == 3, text
    assert re.search(r"spend-worker +worker not counting \(.*41\.5s", text), text
    assert re.search(r"dispatcher +running http://", text), text
    answering.readyz = {"ready": True, "checks": {"spend_worker_counting": True}}  # type: ignore[attr-defined]
    code, text = _status_of(settings)
    assert code == 0, text
    assert re.search(r"spend-worker +running", text), text


def test_a_crash_looping_service_stays_marked_while_it_restarts(
    fake_up: tuple[Settings, subprocess.Popen[str]],
) -> None:
    """Probe 56 F1: the crash-looping mark vanished at each restart, and status said exit 0
    for the seconds each attempt lived. It stays, with exit 3, until a run lasts
    ``stable_after_s``."""
    settings, up = fake_up
    now = [1000.0]
    status = StackStatus(up_status_file(settings), clock=lambda: now[0], pid=up.pid)
    flaky = _process(settings, "flaky", "raise SystemExit(1)")
    env = dict(os.environ)
    flaky.spawn(env)
    policy = RestartPolicy(backoff_s=(1,), crash_loop_exits=2, stable_after_s=60)
    supervisor = Supervisor([flaky], env, [].append, policy, lambda: now[0], status)
    try:
        for _ in range(2):
            assert flaky.process is not None
            flaky.process.wait(30)
            supervisor.check()  # sees the exit
            now[0] += 1
            supervisor.check()  # starts it again
        flaky.stop()
        flaky.argv = [sys.executable, "-c", "import time; time.sleep(60)"]  # fixed: it stays
        now[0] += 1
        supervisor.check()  # the exit of the stopped run
        now[0] += 1
        supervisor.check()  # starts it again: it lives now
        code, text = _status_of(settings)
        assert code == 3, text
        assert re.search(r"flaky +running \(no listener\), crash-looping", text), text
        now[0] += 60
        supervisor.check()  # a run of stable_after_s: no longer crash-looping
        code, text = _status_of(settings)
        assert code == 0, text
        assert re.search(r"flaky +running \(no listener\);", text), text
        assert "crash-looping" not in text, text
    finally:
        flaky.stop()
