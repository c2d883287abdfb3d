"""A request event delivered again after its usage was counted must not be settled as lost.

The newcomer probe of session 12 found the warehouse counting calls twice: after worker
kills, every dispatcher boot made the spend worker send `dispatcher_lost` estimates for
hundreds of calls that had finished normally minutes before (588 estimates for 32 calls
really cut off). The estimate has the same event id as the real usage, so the budget kept
one; the warehouse, which dedupes within a second of an event's time, kept both.

The cause: the worker keeps a request "open" until its usage arrives. A Request event
read again after its usage was counted (a worker restarted before committing its requests
offset, a producer's re-send) opened the request again, and nothing would ever close it;
the dispatcher's next boot then "settled" it. Here the re-delivery is a re-send of the very
bytes; a request that really has no usage is the control that settlement did run.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import (
    WorkerProcess,
    publish_policy,
    raw_messages,
    read_events,
    running_stack,
    send_request_copies,
    wait_for_decision,
    wait_worker_ready,
)

pytestmark = pytest.mark.integration
USER = "resent-requests"
CALLS = 5


def test_a_request_resent_after_its_usage_is_never_estimated(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log", TOLLGATE_SETTLE_GRACE_S="1")
    worker.start()
    dispatcher_state = tmp_path / "dispatcher"  # one dispatcher id across its two boots
    try:
        wait_worker_ready(kafka_settings)
        asyncio.run(publish_policy(kafka_settings, f"user:{USER}", {"limit_usd": 1000}))
        with running_stack(kafka_settings, state_dir=dispatcher_state) as stack:
            for _ in range(CALLS):
                answer = httpx.post(
                    f"{stack.url}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"X-Tollgate-User": USER},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
        usage = asyncio.run(read_events(kafka_settings, "usage", at_least=CALLS + 1))
        mine = [u for u in usage if u["user_id"] == USER]
        assert len(mine) == CALLS
        spent = sum(u["cost_usd_nanos"] for u in mine)
        wait_for_decision(  # every call's usage counted (and its request closed)
            kafka_settings, f"user:{USER}", lambda d: d["spent_usd_nanos"] == spent
        )

        requests = [
            m for m in asyncio.run(raw_messages(kafka_settings, "requests", at_least=CALLS))
            if EventCodec().decode(m.value).record["user_id"] == USER
        ]  # fmt: skip
        assert len(requests) == CALLS
        # the same bytes again, and a copy under a new id never answered: to be estimated
        [lost_id] = asyncio.run(
            send_request_copies(kafka_settings, requests[0], 1, resend=requests)
        )

        # The dispatcher boots again: every open request of its first boot is settled.
        with running_stack(kafka_settings, state_dir=dispatcher_state) as stack:
            httpx.post(
                f"{stack.url}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Tollgate-User": "second-boot"},
                timeout=30,
            )
            deadline = time.monotonic() + 90
            while True:
                usage = asyncio.run(read_events(kafka_settings, "usage", at_least=1, settle_s=0.5))
                estimates = [u for u in usage if u["source"] == "settlement"]
                if any(u["request_id"] == lost_id for u in estimates):
                    break
                assert time.monotonic() < deadline, "the control request was never settled"
                time.sleep(1)
    finally:
        worker.stop()
    answered = {u["request_id"] for u in mine}
    wrong = [u["request_id"] for u in estimates if u["request_id"] in answered]
    assert wrong == [], f"{len(wrong)} answered calls were estimated as lost"
    assert [u["request_id"] for u in estimates if u["user_id"] == USER] == [lost_id]
