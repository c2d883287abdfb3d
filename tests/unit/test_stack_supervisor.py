"""`tollgate up` restarts a service that dies, with backoff, and gives up on a crash loop.

Real child processes that really exit; the supervisor's clock is a counter the test
moves, so backoff and crash-loop windows are checked without waiting on wall time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.settings import Settings
from devtools.kafka_local import LauncherError, StartStopped
from devtools.stack import (
    KafkaKeeper,
    RestartPolicy,
    Service,
    StackStatus,
    Supervisor,
    planned_services,
    python_service,
    stop_started,
    stop_waves,
    without_taken_port,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(tmp_path: Path, name: str, code: str) -> Service:
    return Service(
        name=name,
        argv=[sys.executable, "-c", code],
        host="127.0.0.1",
        port=None,
        url="(no listener)",
        log_file=tmp_path / f"{name}.log",
    )


def read_status(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wait_exit(svc: Service, timeout_s: float = 30) -> None:
    assert svc.process is not None
    svc.process.wait(timeout_s)


def test_a_service_that_dies_is_restarted_with_growing_backoff(tmp_path: Path) -> None:
    dies = service(tmp_path, "dies", "print('about to fail', flush=True); raise SystemExit(3)")
    lives = service(tmp_path, "lives", "import time; time.sleep(600)")
    clock, said = FakeClock(), []
    policy = RestartPolicy(backoff_s=(1, 2, 5), crash_loop_exits=10, crash_loop_window_s=60)
    for s in (dies, lives):
        s.spawn(dict(os.environ))
    supervisor = Supervisor([dies, lives], dict(os.environ), said.append, policy, clock)
    try:
        pids = set()
        for expected_delay in (1, 2, 5, 5):
            assert dies.process is not None
            pids.add(dies.process.pid)
            wait_exit(dies)
            supervisor.check()  # sees the exit, schedules the restart
            assert f"dies exited with code 3; restarting it in {expected_delay}s" in said[-1]
            assert "about to fail" in said[-1], "the message shows the end of its log"
            supervisor.check()
            assert dies.process.poll() is not None, "not restarted before its backoff"
            clock.now += expected_delay
            supervisor.check()  # restarts it
            assert said[-1].startswith("dies restarted")
        assert dies.process is not None and dies.process.pid not in pids, "a new process"
        assert lives.process is not None and lives.process.poll() is None
        assert not any(line.startswith("lives") for line in said), "the others are untouched"
    finally:
        dies.stop()
        lives.stop()


def test_a_crash_loop_is_restarted_with_capped_backoff_until_it_recovers(tmp_path: Path) -> None:
    """A newcomer's probe: after 5 exits within 2 minutes `up` left a service down for good,
    and only a new `tollgate up` brought it back. It is restarted for as long as `up` runs,
    the wait capped; the status file says it is down meanwhile."""
    crashes = tmp_path / "crashes"
    # crashes its first 6 starts (a dependency not there yet), then stays up
    code = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(crashes)!r})\n"
        "n = len(p.read_text()) if p.exists() else 0\n"
        "p.write_text('x' * (n + 1))\n"
        "if n < 6: print(f'crash {n + 1}', flush=True); sys.exit(1)\n"
        "time.sleep(600)\n"
    )
    flaky = service(tmp_path, "flaky", code)
    clock, said = FakeClock(), []
    status = StackStatus(tmp_path / "up-status.json", clock=clock)
    policy = RestartPolicy(backoff_s=(1, 2, 60), crash_loop_exits=3, crash_loop_window_s=600)
    flaky.spawn(dict(os.environ))
    supervisor = Supervisor([flaky], dict(os.environ), said.append, policy, clock, status)
    delays = []
    try:
        for _ in range(6):
            wait_exit(flaky)
            supervisor.check()  # sees the exit, schedules the restart
            delay = float(said[-1].split("restarting it in ", 1)[1].split("s", 1)[0])
            delays.append(delay)
            assert supervisor.down() == ["flaky"]
            (component,) = read_status(tmp_path / "up-status.json")["components"]
            assert component["name"] == "flaky" and component["state"] == "restarting"
            assert component["backoff_s"] == delay and component["last_exit_code"] == 1
            clock.now += delay
            supervisor.check()  # restarts it
            assert said[-1].startswith("flaky restarted")
        assert delays == [1, 2, 60, 60, 60, 60], "capped, never given up"
        assert any("crash-looping" in line for line in said), "said loudly, with its log"
        assert any("crash 6" in line for line in said)
        assert flaky.process is not None
        with pytest.raises(subprocess.TimeoutExpired):
            flaky.process.wait(2)  # the seventh start stays up
        clock.now += 3600
        supervisor.check()
        assert supervisor.down() == []
        (component,) = read_status(tmp_path / "up-status.json")["components"]
        assert (component["state"], component["restarts"]) == ("running", 6)
    finally:
        flaky.stop()


def test_a_stable_run_starts_the_backoff_over(tmp_path: Path) -> None:
    flaky = service(tmp_path, "flaky", "import time; time.sleep(600)")
    clock, said = FakeClock(), []
    policy = RestartPolicy(backoff_s=(1, 7), stable_after_s=60, crash_loop_exits=10)
    flaky.spawn(dict(os.environ))
    supervisor = Supervisor([flaky], dict(os.environ), said.append, policy, clock)
    try:
        for expected_delay, ran_for in ((1, 5), (7, 5), (1, 61)):
            clock.now += ran_for
            assert flaky.process is not None
            os.killpg(flaky.process.pid, signal.SIGKILL)  # dies from outside
            wait_exit(flaky)
            supervisor.check()
            assert f"restarting it in {expected_delay}s" in said[-1], said[-1]
            clock.now += expected_delay
            supervisor.check()
            deadline = time.monotonic() + 30
            while flaky.process.poll() is not None and time.monotonic() < deadline:
                time.sleep(0.05)  # the new process is up
    finally:
        flaky.stop()


# -- the broker `up` started, and listeners that are only nice to have ---------------------------
class FakeKafka:
    """LocalKafka's status()/start() surface: a broker the test kills and `start` revives."""

    def __init__(self, fail_starts: int = 0) -> None:
        self.running, self.starts, self.fail_starts = True, 0, fail_starts

    def status(self) -> Any:
        return SimpleNamespace(running=self.running, pid=4242 if self.running else None)

    def start(self, stop_requested: Callable[[], bool] | None = None) -> Any:
        self.starts += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise LauncherError("port 9093 is taken")
        self.running = True
        return SimpleNamespace(already_running=False, start_seconds=1.5)


def check_to_the_end(keeper: KafkaKeeper) -> None:
    """One ``keeper.check()``, and a start it began in its thread waited for and taken in
    (as the next turns of run_stack's loop would)."""
    keeper.check()
    if keeper.starting is not None:
        keeper.starting.exception(30)
        keeper.check()
        assert keeper.starting is None


def test_a_broker_that_dies_under_up_is_started_again() -> None:
    kafka, clock, said = FakeKafka(), FakeClock(), []
    policy = RestartPolicy(backoff_s=(1, 2), crash_loop_exits=3, crash_loop_window_s=60)
    keeper = KafkaKeeper(kafka, said.append, policy, clock, every_s=2)
    keeper.check()
    assert kafka.starts == 0 and said == []  # alive: nothing to do
    kafka.running = False  # SIGKILL from outside
    keeper.check()
    assert kafka.starts == 0, "looked at most every 2 s"
    clock.now += 2
    keeper.check()
    assert "Kafka exited" in said[-1] and "restarting it in 1s" in said[-1]
    clock.now += 1
    keeper.check()
    assert "starting Kafka again (restart #1)" in said[-1]
    check_to_the_end(keeper)
    assert kafka.starts == 1 and kafka.running and "Kafka restarted" in said[-1]


def test_a_broker_that_cannot_start_again_is_retried_until_it_starts(tmp_path: Path) -> None:
    kafka, clock, said = FakeKafka(fail_starts=4), FakeClock(), []
    status = StackStatus(tmp_path / "up-status.json", clock=clock)
    policy = RestartPolicy(backoff_s=(1, 5), crash_loop_exits=3, crash_loop_window_s=60)
    keeper = KafkaKeeper(kafka, said.append, policy, clock, every_s=1, status=status)
    kafka.running = False
    states = []
    for _ in range(30):
        clock.now += 1
        check_to_the_end(keeper)
        states.append(read_status(tmp_path / "up-status.json")["components"][0]["state"])
    assert kafka.starts == 5 and kafka.running, said  # four failed tries, then it started
    assert "port 9093 is taken" in "\n".join(said)
    waits = [line.split("restarting it in ", 1)[1] for line in said if "restarting it in" in line]
    delays = [wait.split("s", 1)[0] for wait in waits]
    assert delays == ["1", "5", "5", "5", "5"], said  # capped at the last step, not given up
    assert "went down 5 times within 60s" in said[-3]
    assert "starting Kafka again (restart #5)" in said[-2]
    assert "Kafka restarted" in said[-1]
    assert "restarting" in states and states[-1] == "running"


def test_an_agent_whose_metrics_port_is_taken_runs_without_it(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        agent = python_service("anomaly", ["anomaly"], "127.0.0.1", port, tmp_path, "/metrics")
        agent.optional_port = True
        adjusted, warning = without_taken_port(agent)
        assert adjusted.port is None and warning is not None
        assert f"127.0.0.1:{port}" in warning and "without" in warning
        dispatcher = python_service("dispatcher", ["serve"], "127.0.0.1", port, tmp_path)
        same, none = without_taken_port(dispatcher)
        assert same is dispatcher and none is None  # its start() still refuses, naming the port
    free = python_service("anomaly", ["anomaly"], "127.0.0.1", port, tmp_path, "/metrics")
    free.optional_port = True
    assert without_taken_port(free) == (free, None)


def test_only_the_agents_listeners_are_optional(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path, alert_targets=({"name": "ops", "url": "https://hooks.example.test/x"},)
    )
    optional = {s.name for s in planned_services(settings, tmp_path) if s.optional_port}
    assert optional == {"anomaly", "router-learn", "notifier"}


class SlowKafka(FakeKafka):
    """A broker whose start blocks until the test releases it, as LocalKafka.start() blocks
    until the broker answers (45-60 s on a loaded machine). Gives up after 20 s so that a
    supervisor that waits for it fails the test instead of hanging it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.stopped_starting = False  # asked to stop, it stopped the broker it was starting

    def start(self, stop_requested: Callable[[], bool] | None = None) -> Any:
        self.entered.set()
        deadline = time.monotonic() + 20
        while not self.release.wait(0.05):
            if stop_requested is not None and stop_requested():
                self.stopped_starting = True
                raise StartStopped("asked to stop while the broker was starting")
            if time.monotonic() > deadline:
                raise LauncherError("the test never let the broker start")
        return super().start()


def test_services_are_restarted_while_the_broker_is_starting_again(tmp_path: Path) -> None:
    """A newcomer's probe (46 F1): `up` restarted Kafka inside its supervision loop, so a
    dispatcher killed meanwhile stayed dead (a zombie, not even reaped) until the broker
    answered, 40-70 s. The broker's start no longer holds the loop: the service comes back
    after its own backoff, and the status file says Kafka is starting meanwhile."""
    kafka, clock, said = SlowKafka(), FakeClock(), []
    status = StackStatus(tmp_path / "up-status.json", clock=clock)
    policy = RestartPolicy(backoff_s=(1,), crash_loop_exits=10)
    dispatcher = service(tmp_path, "dispatcher", "import time; time.sleep(600)")
    dispatcher.spawn(dict(os.environ))
    keeper = KafkaKeeper(kafka, said.append, policy, clock, every_s=1, status=status)
    supervisor = Supervisor([dispatcher], dict(os.environ), said.append, policy, clock, status)

    def step() -> None:  # one turn of run_stack's loop
        supervisor.check()
        keeper.check()

    def states() -> dict[str, str]:
        components = read_status(tmp_path / "up-status.json")["components"]
        return {c["name"]: c["state"] for c in components}

    try:
        kafka.running = False  # SIGKILL from outside
        clock.now += 1
        step()
        assert "Kafka exited" in said[-1]
        clock.now += 1
        step()  # the broker's restart begins ...
        assert kafka.entered.wait(30), "the restart was begun"
        assert not kafka.release.is_set() and kafka.starts == 0, "... and is still going on"
        assert states() == {"kafka": "starting", "dispatcher": "running"}

        assert dispatcher.process is not None
        first = dispatcher.process
        os.killpg(first.pid, signal.SIGKILL)  # the dispatcher dies meanwhile
        wait_exit(dispatcher)
        step()
        assert "dispatcher exited" in said[-1] and "restarting it in 1s" in said[-1], said
        assert states() == {"kafka": "starting", "dispatcher": "restarting"}
        clock.now += 1
        step()
        assert dispatcher.process is not first and dispatcher.process.poll() is None
        assert "dispatcher restarted" in said[-1], said
        assert states() == {"kafka": "starting", "dispatcher": "running"}
        assert not kafka.release.is_set(), "all that while the broker was still starting"

        kafka.release.set()  # the broker answers
        deadline = time.monotonic() + 30
        while not any("Kafka restarted" in line for line in said):
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
            step()
        assert kafka.starts == 1 and kafka.running
        assert states() == {"kafka": "running", "dispatcher": "running"}
    finally:
        kafka.release.set()
        keeper.close()
        dispatcher.stop()


def keeper_starting_again() -> tuple[KafkaKeeper, SlowKafka, list[str]]:
    """A keeper whose broker died and whose start of it again is under way (held)."""
    kafka, clock, said = SlowKafka(), FakeClock(), []
    keeper = KafkaKeeper(kafka, said.append, RestartPolicy(backoff_s=(1,)), clock, every_s=1)
    kafka.running = False
    clock.now += 1
    keeper.check()
    clock.now += 1
    keeper.check()
    assert kafka.entered.wait(30) and keeper.starting is not None
    return keeper, kafka, said


def test_stopping_up_stops_a_broker_start_in_progress() -> None:
    """`make down` (or Ctrl-C) while the broker starts again: ``close()`` waited for the
    start to end, up to ``kafka_start_timeout_s`` (120 s), past `tollgate down`'s 90 s. It
    now asks the start to stop: the broker being started is stopped (not left running after
    `up` has gone), and ``close()`` returns without waiting for it to answer."""
    keeper, kafka, said = keeper_starting_again()
    assert keeper.starting is not None
    keeper.close()
    assert keeper.starting.done() and kafka.stopped_starting, said
    assert not kafka.release.is_set() and kafka.starts == 0 and not kafka.running
    assert "stopping the Kafka start in progress" in said[-1], said


def test_a_stop_asks_the_broker_start_to_stop_before_it_stops_the_services() -> None:
    """`make down` while the broker starts again: the start was asked to stop only after
    every service had stopped, one after another, and with Kafka away that took 46 s on a
    loaded machine (a check by hand: the broker meanwhile answered, to be stopped at once;
    `down` took 52 s of its 90). The start is asked to stop first and stops meanwhile."""
    keeper, kafka, said = keeper_starting_again()
    assert keeper.starting is not None
    asked_while_stopping: list[bool] = []
    stopped: list[str] = []

    class SlowToStop:  # a service that takes its time with Kafka away
        def __init__(self, name: str) -> None:
            self.name = name

        def stop(self) -> None:
            asked_while_stopping.append(keeper.closing)
            stopped.append(self.name)

    services: Any = [SlowToStop("simulator"), SlowToStop("dispatcher")]
    stop_started(services, keeper, lambda: stopped.append("kafka"))
    assert asked_while_stopping == [True, True], "asked before the services were stopped"
    assert stopped == ["dispatcher", "simulator", "kafka"]
    assert "stopping the Kafka start in progress ..." in said, said
    assert keeper.starting.done() and kafka.stopped_starting and not kafka.running


def test_the_sink_and_the_agents_are_stopped_together_between_the_dispatcher_and_the_simulator(
    tmp_path: Path,
) -> None:
    """With Kafka away each service's stop waits out its own Kafka clients: one after
    another, `make down` took 46-48 s of its 90 on a loaded machine (checks by hand), and
    up to 20 s a service could pass it. The dispatcher still stops first (its last events
    flushed while what reads them runs) and the simulator, its upstream, last."""
    services = planned_services(
        Settings(state_dir=tmp_path, alert_targets=({"name": "ops", "url": "https://x.test/a"},)),
        tmp_path,
    )
    waves = [[s.name for s in wave] for wave in stop_waves(services)]
    assert waves == [
        ["dispatcher"],
        ["notifier", "router-learn", "anomaly", "sink", "spend-worker"],
        ["simulator"],
    ]
    together = threading.Barrier(5, timeout=10)  # broken unless all five stop at once
    order: list[str] = []

    def stop(self: Service) -> None:
        if self.name not in ("dispatcher", "simulator"):
            together.wait()
        order.append(self.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Service, "stop", stop)
        stop_started(services, None, None)
    assert order[0] == "dispatcher" and order[-1] == "simulator", order
    assert not together.broken
