"""`tollgate down` (`make down`) stops the `tollgate up` of its state directory, and nothing
else (probes I and J stopped the stack with a signal by hand: there was no `make down`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import Settings
from devtools.stack import run_stack, stop_stack, up_pid_file

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
