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
import json
import time
from pathlib import Path

import httpx
import pytest

from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import (
    WorkerProcess,
    raw_messages,
    read_events,
    running_stack,
    send_request_copies,
    wait_worker_ready,
)
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


def test_requests_the_consumer_skipped_are_still_settled(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """Probe M (K3): a restarted worker's Faust consumer skipped a range of Request records
    and delivered the ones after it, so the stall watch saw nothing wrong and Faust committed
    over the hole; requests in it whose dispatcher had died were never opened and never got
    usage nor an estimate. Here the first fetched batch of the requests partition is dropped
    (calls accepted, then their dispatcher gone), and later requests arrive from a new boot
    of that dispatcher: every lost call must still get its estimate."""
    asyncio.run(ensure_topics(kafka_settings))
    with running_stack(kafka_settings) as stack:  # one real Request to copy
        answer = httpx.post(
            f"{stack.url}/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Tollgate-User": "skipped-requests"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        [template] = asyncio.run(raw_messages(kafka_settings, "requests", at_least=1))
    lost = asyncio.run(send_request_copies(kafka_settings, template, 6))
    log = tmp_path / "dropping.log"
    dropping = WorkerProcess(
        kafka_settings,
        log,
        argv=("-m", "tests.integration.dropping_worker"),
        DROPPING_WORKER_TOPICS=".requests",
        TOLLGATE_SPEND_STALL_S="600",  # the stall watch must not be what saves them
        TOLLGATE_SETTLE_GRACE_S="1",
        TOLLGATE_LOG_FORMAT="json",
    )
    dropping.start()
    try:
        wait_worker_ready(kafka_settings)
        deadline = time.monotonic() + 60
        while ".requests/" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "no request records were dropped: test is void"
            time.sleep(0.5)
        asyncio.run(
            send_request_copies(kafka_settings, template, 2, boot_shift_s=3600)
        )  # a new boot
        deadline = time.monotonic() + 90
        while True:
            usage = asyncio.run(read_events(kafka_settings, "usage", at_least=1, settle_s=0.5))
            estimated = {u["request_id"] for u in usage if u["source"] == "settlement"}
            if set(lost) <= estimated:
                break
            assert time.monotonic() < deadline, (
                f"{len(set(lost) - estimated)} of {len(lost)} skipped requests never settled"
            )
            time.sleep(1)
        # in the format asked for, with its fields (Faust's setup replaced it: probe M)
        lines = [json.loads(line) for line in log.read_text(errors="replace").splitlines()
                 if line.startswith("{")]  # fmt: skip
        skipped = [e for e in lines if e.get("msg") == "opening requests the consumer skipped"]
        assert skipped and all("partition" in e and "read" in e for e in skipped), lines[-5:]
        estimates = [e for e in lines if "sent an estimate" in e.get("msg", "")]
        assert {e["request_id"] for e in estimates} >= set(lost)
    finally:
        dropping.stop()
