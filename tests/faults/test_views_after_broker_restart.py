"""Budget policies and decisions keep flowing after the broker is killed and restarted.

Found by a newcomer probe on `make up`: after `kill -9` of Kafka and a restart, a cap set
through the API or the CLI never reached the gate (404, calls served past it), and new
decisions of the spend worker never reached the dispatcher, for minutes, while `/readyz`
said both views were synced. Events still flowed (the fault table's Kafka row passed): the
compacted views (``app.events.compacted.CompactedView``) had died. After the broker was
killed, the consumer's ``stop()`` in the follower's cleanup raised ``CancelledError``,
which ended the view's task as if it had been told to stop, and nothing restarted it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from app.events.codec import EventCodec
from app.events.compacted import CompactedView
from app.events.topics import ensure_topics
from app.settings import Settings
from tests.faults.harness import KafkaNode
from tests.integration.harness import publish_policy

pytestmark = [pytest.mark.integration, pytest.mark.faults_ci, pytest.mark.timeout(600)]


async def _published(settings: Settings, scope: str, limit: float, timeout_s: float) -> None:
    """Publish a policy, retrying while the broker is still coming back."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await publish_policy(settings, scope, {"period": "month", "limit_usd": limit})
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def _seen(view: CompactedView, scope: str, limit_nanos: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = view.records.get(scope)
        if record is not None and record["limit_usd_nanos"] == limit_nanos:
            return True
        await asyncio.sleep(0.2)
    return False


def test_a_view_sees_new_records_after_the_broker_is_killed_and_restarted(
    kafka_node: KafkaNode, kafka_settings: Settings
) -> None:
    async def scenario() -> None:
        await ensure_topics(kafka_settings)
        view = CompactedView(kafka_settings, kafka_settings.topic("budget.policies"), EventCodec())
        assert await view.start()
        try:
            await _published(kafka_settings, "user:before", 1.0, 30)
            assert await _seen(view, "user:before", 1_000_000_000, 30)
            kafka_node.kill()
            await asyncio.sleep(5)  # down long enough for the view to notice and reconnect
            await asyncio.to_thread(kafka_node.start)
            await _published(kafka_settings, "user:after", 2.0, 120)
            # A healthy view has it within a second; a minute is for a busy machine.
            assert await _seen(view, "user:after", 2_000_000_000, 60), (
                "the view never saw a policy published after the broker restarted"
            )
        finally:
            await view.stop()

    asyncio.run(scenario())
