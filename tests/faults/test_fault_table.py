"""The fault table: one fault at a time on the real stack, counted by id on every stage.

Each test starts every component as its own process (``tollgate simulate``, ``worker``,
``sink``, ``anomaly``, ``serve``; the broker with ``tollgate kafka start``), drives it
with N concurrent clients (half streamed, each its own user, half through the ``openai``
SDK and half plain HTTP), injects its fault under that load, then counts, by id:
requests answered against Request events, Request events against Usage events (one per
accepted request), events against warehouse rows (one per event id), the spend worker's
count per user against the sum of that user's distinct usage events (to the nano-dollar),
and the anomaly agent's checkpoint against the usage topic (each record observed once).
Lost 0 and duplicated 0, or the test fails with the list of what is missing or doubled.

Durations of a fault (how long a process stays stopped) are the fault itself, so they
are sleeps; everything else polls a condition with a generous deadline. Recovery times
are measured and printed in the table, never asserted.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import (
    Audit,
    FaultStack,
    KafkaNode,
    LoadGenerator,
    anomaly_checkpoint,
    audit_stack,
    record_row,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]


@dataclass(frozen=True)
class Scale:
    clients: int
    warmup: int  # answers before the fault
    after: int  # answers after the fault ends
    kills: int  # repeated SIGKILLs of the dispatcher and of the spend worker
    kafka_down_s: float
    dispatcher_stall_s: float
    worker_stall_s: float  # > the worker's session timeout (10 s)
    sink_stall_s: float  # > the sink's session timeout (10 s)
    anomaly_stall_s: float
    clickhouse_down_s: float
    worker_catchup_s: float  # after this long without catching up, a restarted worker is stuck


SCALES = {
    "ci": Scale(
        clients=8,
        warmup=40,
        after=40,
        kills=2,
        kafka_down_s=20,
        dispatcher_stall_s=10,
        worker_stall_s=25,
        sink_stall_s=25,
        anomaly_stall_s=20,
        clickhouse_down_s=20,
        worker_catchup_s=120,
    ),
    "full": Scale(
        clients=16,
        warmup=100,
        after=100,
        kills=10,
        kafka_down_s=20,
        dispatcher_stall_s=20,
        worker_stall_s=30,
        sink_stall_s=85,
        anomaly_stall_s=30,
        clickhouse_down_s=60,
        worker_catchup_s=300,
    ),
}


@pytest.fixture
def scale(fault_mode: str) -> Scale:
    return SCALES[fault_mode]


def check(audit: Audit) -> None:
    assert not audit.lost and not audit.duplicated, audit.failures()


def caught_up_after(
    stack: FaultStack, component: str, *topics: str, timeout_s: float = 300
) -> float:
    """Seconds until ``component`` committed everything that was on ``topics`` now."""
    ends = stack.end_offsets(*topics)
    return wait_for(
        lambda: stack.check_alive(component) and stack.caught_up(component, ends),
        timeout_s,
        f"the {component} to catch up",
    )


def spool_drained(stack: FaultStack) -> float:
    """Seconds until the dispatcher has delivered everything it spooled."""
    return wait_for(lambda: stack.spool_depth() == 0, 300, "the spool to drain")


def stalled(what: Callable[[], None], resume: Callable[[], None], seconds: float) -> None:
    what()
    try:
        time.sleep(seconds)  # the fault's length: the process is frozen this long
    finally:
        resume()


# -- Kafka ---------------------------------------------------------------------------------
def test_kafka_sigkill(make_stack, kafka_node: KafkaNode, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        kafka_node.kill()
        time.sleep(scale.kafka_down_s)  # the outage: the gateway serves on its spool
        kafka_node.start()
        recovery = spool_drained(stack)
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(f"Kafka SIGKILL, down {scale.kafka_down_s:.0f} s", audit, recovery)
    check(audit)


def test_kafka_sigstop(make_stack, kafka_node: KafkaNode, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        stalled(kafka_node.stall, kafka_node.resume, scale.kafka_down_s)
        recovery = spool_drained(stack)
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(f"Kafka SIGSTOP {scale.kafka_down_s:.0f} s", audit, recovery)
    check(audit)


# -- dispatcher ------------------------------------------------------------------------
@pytest.mark.faults_ci
def test_dispatcher_sigkill_repeated(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    dispatcher = stack["dispatcher"]
    recoveries: list[float] = []
    rng = random.Random(11)
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        for _ in range(scale.kills):
            load.wait_answers(rng.randint(10, 30))  # a random moment under load
            started = time.monotonic()
            dispatcher.kill()
            dispatcher.start()
            wait_for(stack.dispatcher_ready, 120, "the restarted dispatcher")
            load.wait_answers(1)
            recoveries.append(time.monotonic() - started)
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(f"dispatcher SIGKILL x{scale.kills}", audit, recoveries, "kill -> serving again")
    check(audit)


def test_dispatcher_sigstop(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    dispatcher = stack["dispatcher"]
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        stalled(dispatcher.stall, dispatcher.resume, scale.dispatcher_stall_s)
        started = time.monotonic()
        load.wait_answers(1)
        recovery = time.monotonic() - started
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(f"dispatcher SIGSTOP {scale.dispatcher_stall_s:.0f} s", audit, recovery)
    check(audit)


# -- spend worker ----------------------------------------------------------------------
def test_worker_sigkill_repeated(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    worker = stack["worker"]
    recoveries: list[float] = []
    stuck: tuple[int, dict[str, int]] | None = None
    rng = random.Random(10)
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        for kill in range(1, scale.kills + 1):
            load.wait_answers(rng.randint(10, 40))  # a random moment under load
            worker.kill()
            worker.start()
            ends = stack.end_offsets("usage")
            try:
                recoveries.append(
                    caught_up_after(stack, "worker", "usage", timeout_s=scale.worker_catchup_s)
                )
            except AssertionError:
                behind = stack.behind("worker", ends)
                if not behind:  # caught up just as the deadline passed: slow, not stuck
                    recoveries.append(scale.worker_catchup_s)
                    continue
                stuck = (kill, behind)
                break
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load, worker=stuck is None)
    detail = "restart -> caught up"
    if stuck is not None:
        kill, behind = stuck
        detail = f"after kill {kill} the restarted worker stopped consuming: {behind} behind"
        audit.lost.extend(
            f"spend worker: never counted a usage event of {partition}"
            for partition, count in behind.items()
            for _ in range(count)
        )
    kills = scale.kills if stuck is None else stuck[0]
    record_row(f"spend worker SIGKILL x{kills}", audit, recoveries, detail)
    check(audit)


def test_worker_sigstop(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    worker = stack["worker"]
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        stalled(worker.stall, worker.resume, scale.worker_stall_s)
        recovery = caught_up_after(stack, "worker", "usage")
        load.wait_answers(scale.after)
        stack.check_alive("worker")
    audit = audit_stack(stack, load)
    record_row(f"spend worker SIGSTOP {scale.worker_stall_s:.0f} s", audit, recovery)
    check(audit)


# -- sink --------------------------------------------------------------------------------
def test_sink_sigkill(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    sink = stack["sink"]
    recoveries = []
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        for _ in range(2):
            load.wait_answers(scale.warmup)
            sink.kill()
            sink.start()
            recoveries.append(caught_up_after(stack, "sink", "requests", "usage"))
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row("sink SIGKILL x2", audit, recoveries)
    check(audit)


@pytest.mark.faults_ci
def test_sink_sigstop_longer_than_its_session(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    sink = stack["sink"]
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        stalled(sink.stall, sink.resume, scale.sink_stall_s)
        recovery = caught_up_after(stack, "sink", "requests", "usage")
        load.wait_answers(scale.after)
        stack.check_alive("sink")
    audit = audit_stack(stack, load)
    record_row(f"sink SIGSTOP {scale.sink_stall_s:.0f} s", audit, recovery)
    check(audit)


# -- anomaly agent -------------------------------------------------------------------------
def checkpointed_after(stack: FaultStack) -> float:
    """Seconds until the anomaly agent checkpointed everything on the usage topic now."""
    ends = {tp.partition: end for tp, end in stack.end_offsets("usage").items()}

    def covered() -> bool:
        stack.check_alive("anomaly")
        saved = anomaly_checkpoint(stack)
        return saved is not None and all(saved[0].get(p, 0) >= e for p, e in ends.items())

    return wait_for(covered, 300, "an anomaly checkpoint past the fault", every_s=2.0)


def test_anomaly_sigkill(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    agent = stack["anomaly"]
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        checkpointed_after(stack)  # a checkpoint to restore, then events after it
        load.wait_answers(scale.warmup)
        agent.kill()
        agent.start()
        recovery = checkpointed_after(stack)
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row("anomaly agent SIGKILL", audit, recovery, "restart -> checkpoint past the kill")
    check(audit)


def test_anomaly_sigstop(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()
    agent = stack["anomaly"]
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        stalled(agent.stall, agent.resume, scale.anomaly_stall_s)
        recovery = checkpointed_after(stack)
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(f"anomaly agent SIGSTOP {scale.anomaly_stall_s:.0f} s", audit, recovery)
    check(audit)


# -- ClickHouse ----------------------------------------------------------------------------
def chattr_works(tmp: Path) -> bool:
    """``chattr +i`` needs root (CAP_LINUX_IMMUTABLE) and a file system that supports it."""
    if shutil.which("chattr") is None:
        return False
    probe = tmp / "chattr-probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        return False
    try:
        (probe / "x").mkdir()
    except OSError:
        return True
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    return False


class ReadOnlyWarehouse:
    """The engine's table directories made immutable (``chattr +i``): ClickHouse can read
    but cannot create a part, so every insert fails inside ClickHouse with a filesystem
    error (code 1001), as when its disk goes read-only. Embedded chdb has no network
    listener, so this is how its storage becomes unreachable for writes; the sink sees a
    ``DatabaseError`` from the real engine, the same class as from a server that is down."""

    def __init__(self, chdb_dir: Path) -> None:
        self.dirs = [str(p) for p in sorted((chdb_dir / "store").glob("*/*")) if p.is_dir()]
        assert self.dirs, f"no table directories under {chdb_dir}/store"

    def __enter__(self) -> ReadOnlyWarehouse:
        subprocess.run(["chattr", "+i", *self.dirs], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["chattr", "-i", *self.dirs], check=True)


def test_clickhouse_unwritable(make_stack, scale: Scale, tmp_path: Path) -> None:
    if not chattr_works(tmp_path):
        pytest.skip("chattr +i is not permitted here (needs root and ext4/xfs)")
    stack = make_stack()
    stack.start()
    chdb_dir = Path(stack.settings.clickhouse_dsn.removeprefix("chdb://"))
    with LoadGenerator(stack.url, stack.tag, scale.clients) as load:
        load.wait_answers(scale.warmup)
        with ReadOnlyWarehouse(chdb_dir):
            time.sleep(scale.clickhouse_down_s)  # the outage; the sink must hold its batch
            stack.check_alive("sink")
        recovery = caught_up_after(stack, "sink", "requests", "usage")
        load.wait_answers(scale.after)
    audit = audit_stack(stack, load)
    record_row(
        f"ClickHouse unwritable {scale.clickhouse_down_s:.0f} s",
        audit,
        recovery,
        "chdb table dirs chattr +i: every insert fails in the engine",
    )
    check(audit)


# -- upstream ------------------------------------------------------------------------------
@pytest.mark.faults_ci
def test_upstream_500s(make_stack, scale: Scale) -> None:
    stack = make_stack()
    stack.start()

    def every_third_fails(client: int, seq: int) -> dict[str, str]:
        return {"X-Sim-Status": "500"} if seq % 3 == 0 else {}

    with LoadGenerator(stack.url, stack.tag, scale.clients, headers=every_third_fails) as load:
        load.wait_answers(scale.warmup, status=500)
    audit = audit_stack(stack, load)
    record_row("upstream 500 on 1 call in 3", audit, None)
    assert audit.answered_by_status.get(500, 0) >= scale.warmup
    check(audit)


def test_upstream_timeouts(make_stack, scale: Scale) -> None:
    stack = make_stack(component_env={"dispatcher": {"TOLLGATE_UPSTREAM_READ_TIMEOUT_S": "1"}})
    stack.start()

    def every_fourth_hangs(client: int, seq: int) -> dict[str, str]:
        return {"X-Sim-Latency-Ms": "4000"} if seq % 4 == 0 else {}

    with LoadGenerator(stack.url, stack.tag, scale.clients, headers=every_fourth_hangs) as load:
        load.wait_answers(scale.warmup // 2, status=504)
    audit = audit_stack(stack, load)
    record_row("upstream silent > read timeout, 1 call in 4", audit, None)
    check(audit)
