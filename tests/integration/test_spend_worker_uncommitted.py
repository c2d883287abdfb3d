"""A spend worker SIGKILLed before its first offset commit loses no spend.

Found by ``bench/budget.py``'s worker-kill measurement. Under steady load, a worker killed
within its first commit interval (``broker_commit_interval`` 0.5 s), then restarted at
once: its successor counts the usage partitions that had no committed offset yet only from
about where they stood when it was assigned them (after the dead member's session timeout),
so every event produced in between is never counted, while the partition of the readiness
probe (committed before the kill) comes out exact. A worker started after the same events
with no predecessor consuming them counts them all.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import WorkerProcess, wait_worker_ready
from tests.integration.test_spend_worker_crash import (
    UsageSender,
    expected_spend,
    publish_policies,
    wait_for_exact_spend,
)

pytestmark = pytest.mark.integration


def test_a_worker_killed_before_its_first_commit_loses_no_spend(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    publish_policies(kafka_settings)
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    worker.start()
    wait_worker_ready(kafka_settings)  # only the probe's partition has a committed offset
    sender = UsageSender(kafka_settings, seed=5)
    records = sender.records(600)
    sent: list[int] = []
    sending = threading.Thread(
        target=lambda: sent.append(asyncio.run(sender.send(records, rate_per_s=40, resend=0)))
    )
    try:
        sending.start()
        time.sleep(0.2)  # counting the load, nothing of it committed yet
        worker.kill()
        worker.start()
        sending.join(600)
        assert sent, "the load generator failed"
        wait_for_exact_spend(
            kafka_settings, expected_spend(kafka_settings, at_least=sent[0]), timeout_s=120
        )
    finally:
        worker.stop()
