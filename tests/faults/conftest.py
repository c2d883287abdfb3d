"""Fixtures of the fault tests: the broker under test, a fresh stack per test, the table.

``--faults=ci`` (the default, part of ``make test``) runs the rows marked ``faults_ci``
at a smaller scale; ``--faults=full`` (``make test-faults``) runs every row at full
scale. The fault table is printed at the end of the run, and written as Markdown to
``--fault-table PATH`` when given.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TestBroker
from tests.faults.harness import FAULT_ROWS, FaultStack, KafkaNode


@pytest.fixture(scope="session")
def fault_mode(request: pytest.FixtureRequest) -> str:
    return str(request.config.getoption("--faults"))


@pytest.fixture
def kafka_node(kafka_broker: TestBroker) -> KafkaNode:
    """The broker, as a process the test may kill or stall (only one this session runs)."""
    launcher = kafka_broker.launcher
    if launcher is None:
        pytest.skip("the broker is not run by this session; cannot kill or stall it")
    node = KafkaNode(launcher.bootstrap, launcher.controller_port, launcher.home.parent)
    yield node
    node.ensure_running()  # whatever the test did, later tests get their broker back


@pytest.fixture
def make_stack(
    kafka_bootstrap: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., FaultStack]]:
    stacks: list[FaultStack] = []

    def make(**kwargs: Any) -> FaultStack:
        stack = FaultStack(kafka_bootstrap, tmp_path / f"stack{len(stacks)}", **kwargs)
        stacks.append(stack)
        return stack

    yield make
    report = getattr(request.node, "rep_call", None)
    for i, stack in enumerate(stacks):
        stack.stop()
        if report is not None and report.failed:
            # Kept out of the shared temp dir (other pytest runs prune it): the report names it.
            kept = Path(".tollgate/fault-logs") / f"{request.node.name}-{i}"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(stack.root / "logs", kept, dirs_exist_ok=True)
            print(f"\nlogs of {request.node.name}: {kept.resolve()}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--faults") == "full":
        return
    skip = pytest.mark.skip(reason="runs in `make test-faults` (--faults=full)")
    for item in items:
        if "tests/faults/" in item.nodeid and item.get_closest_marker("faults_ci") is None:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    before = len([r for r in FAULT_ROWS if r.outcome != "?"])
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
        outcome = (
            "xfail"
            if hasattr(report, "wasxfail") and report.skipped
            else "XPASS"
            if hasattr(report, "wasxfail")
            else report.outcome
        )
        for row in FAULT_ROWS[before:]:
            if row.outcome == "?":
                row.outcome = outcome
    return report


def fault_table() -> str:
    lines = [
        "| fault | requests | answered | lost | duplicated | recovery | test |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in FAULT_ROWS:
        recovery = "—" if row.recovery_s is None else f"{row.recovery_s:.1f} s"
        lines.append(
            f"| {row.fault} | {row.requests} | {row.answered} | {row.lost} | {row.duplicated} "
            f"| {recovery} | {row.outcome} |"
        )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not FAULT_ROWS:
        return
    table = fault_table()
    terminalreporter.write_sep("=", "fault table")
    terminalreporter.write_line(table)
    for row in FAULT_ROWS:
        if row.detail:
            terminalreporter.write_line(f"  {row.fault}: {row.detail}")
    path = config.getoption("--fault-table")
    if path:
        Path(path).write_text(table + "\n")
