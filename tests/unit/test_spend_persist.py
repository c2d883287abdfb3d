"""The spend worker's changelog writes: what fails is written again, and only that, until
Kafka has every key (the batch is acknowledged only then). A fake table stands in for
Faust's: this is the retry rule alone, the real writes are covered by the integration tests."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError

import agents.spend
from agents.spend import SpendWorker


class FlakyChangelog:
    """``send_changelog`` as Faust's table offers it; the keys in ``fail`` fail once each."""

    name = "spend"

    def __init__(self, fail: set[str]) -> None:
        self.fail = set(fail)
        self.rounds: list[dict[str, tuple[int, Any, str | None]]] = [{}]

    def send_changelog(
        self, partition: int, key: str, value: Any, value_serializer: str | None = None
    ) -> asyncio.Future[None]:
        if key in self.rounds[-1]:
            self.rounds.append({})
        self.rounds[-1][key] = (partition, value, value_serializer)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key in self.fail:
            self.fail.discard(key)
            future.set_exception(KafkaTimeoutError())
        else:
            future.set_result(None)
        return future


async def test_failed_changelog_writes_are_retried_alone_until_kafka_has_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agents.spend, "PERSIST_BACKOFF_S", (0.0,))
    table = FlakyChangelog(fail={"b", "c"})
    writes = {"a": (0, 1), "b": (1, 2), "c": (0, None)}
    await SpendWorker._persist(None, table, writes)  # type: ignore[arg-type]
    assert table.rounds == [
        {"a": (0, 1, None), "b": (1, 2, None), "c": (0, None, "raw")},
        {"b": (1, 2, None), "c": (0, None, "raw")},
    ], "a removal is a raw tombstone; only what failed is sent again"


async def test_nothing_to_write_sends_nothing() -> None:
    table = FlakyChangelog(fail=set())
    await SpendWorker._persist(None, table, {})  # type: ignore[arg-type]
    assert table.rounds == [{}]
