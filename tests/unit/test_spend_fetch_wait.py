"""The spend worker lowers Faust's hard-coded fetch wait (1.5 s) so decisions follow usage
within a fraction of a second. It reaches into a Faust hook: this fails if Faust changes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agents.spend import FETCH_MAX_WAIT_MS, SpendWorker, shorten_faust_fetch_wait
from app.settings import Settings


def test_the_worker_consumer_faust_builds_waits_at_most_the_short_fetch(tmp_path: Path) -> None:
    async def build() -> int:
        shorten_faust_fetch_wait()
        worker = SpendWorker(Settings(state_dir=tmp_path))
        thread = worker.app.consumer._thread  # type: ignore[attr-defined]
        consumer = thread._create_worker_consumer(worker.app.transport)
        try:
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()  # never started: closes its client

    assert asyncio.run(build()) == FETCH_MAX_WAIT_MS < 1500
