"""A spend worker whose consumer loses fetched records does not stop counting (issue 10).

Observed under load with random SIGKILLs: a worker restarted right after a kill stopped
consuming some usage partitions for good. Its table recovery still waited for the last
records of a changelog partition (highwater never reached), so Faust kept the stream
partitions paused; the records had been fetched (the consumer position stood past them) and
dropped, and nothing fetches a partition again by itself. ``dropping_worker`` makes that
certain: it drops the first fetched batch of every partition of the spend changelog (its
recovery) and of every usage partition (its last events, with no traffic after them). The
worker must notice a partition that does not progress while records remain, fetch it again
from where it stands, and count every event exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import WorkerProcess, wait_worker_ready
from tests.integration.test_spend_worker_crash import (
    UsageSender,
    committed_offsets,
    end_offsets,
    expected_spend,
    publish_policies,
    send_markers,
    wait_for_exact_spend,
)

pytestmark = pytest.mark.integration


def test_records_lost_by_the_consumer_are_fetched_again(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    publish_policies(kafka_settings)
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log")
    worker.start()
    sender = UsageSender(kafka_settings, seed=23)
    try:
        wait_worker_ready(kafka_settings)
        sent = asyncio.run(sender.send(sender.records(150), rate_per_s=0, resend=0.1))
        wait_for_exact_spend(kafka_settings, expected_spend(kafka_settings, at_least=sent))
    finally:
        worker.kill()  # the spend changelog now holds every bucket: the next worker recovers it

    log = tmp_path / "dropping.log"
    dropping = WorkerProcess(
        kafka_settings,
        log,
        argv=("-m", "tests.integration.dropping_worker"),
        TOLLGATE_SPEND_STALL_S="2",
    )
    dropping.start()
    try:
        # Sent while the worker recovers: they arrive in its first usage fetch, which is
        # dropped, and nothing comes after them.
        sent += asyncio.run(sender.send(sender.records(100), rate_per_s=0, resend=0.1))
        sent += send_markers(kafka_settings, sender)
        wait_for_exact_spend(
            kafka_settings, expected_spend(kafka_settings, at_least=sent), timeout_s=120
        )
        text = log.read_text(errors="replace")
        assert "-spend-changelog/" in text, "no changelog records were dropped: test is void"
        assert ".usage/" in text, "no usage records were dropped: test is void"
        total = asyncio.run(end_offsets(kafka_settings))
        wait_until = asyncio.run(_commits_reach(kafka_settings, total))
        assert wait_until, "the worker's offsets stopped short of the end"
    finally:
        dropping.stop()


async def _commits_reach(settings: Settings, total: int, timeout_s: float = 60) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if await committed_offsets(settings) >= total:
            return True
        await asyncio.sleep(1)
    return False
