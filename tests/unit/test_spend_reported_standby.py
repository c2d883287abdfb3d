"""The spend worker learns the remembered reports of the partitions it actively owns, not
Faust's standby replicas of other workers' partitions (kept in the same table data), and
learns a partition's when a rebalance makes it active. Real Faust objects (the app, its
table data, its partition assignor); only the assignment a broker would give is set here."""

from __future__ import annotations

import asyncio
from pathlib import Path

from faust.assignor.client_assignment import ClientAssignment

from agents.spend import SpendWorker
from app.settings import Settings


def _assign(worker: SpendWorker, actives: list[int], standbys: list[int]) -> None:
    topic = worker.settings.topic("usage")
    worker.app.assignor._assignment = ClientAssignment(  # type: ignore[attr-defined]
        actives={topic: actives}, standbys={topic: standbys}
    )


def test_standby_reports_stay_out_of_memory_until_their_partition_is_promoted(
    tmp_path: Path,
) -> None:
    worker = SpendWorker(Settings(state_dir=tmp_path, topic_partitions=3))
    data = worker.reported_table.data
    data["0|5"] = [["mine", 1000, 0, 5]]
    data["1|7"] = [["standby-a", 1000, 1, 7], ["standby-b", 1001, 1, 8]]
    data["2|9"] = [["elsewhere", 1000, 2, 9]]
    reported = worker.counter.reported

    _assign(worker, actives=[0], standbys=[1, 2])
    asyncio.run(worker._on_recovered())
    assert set(reported.index) == {"mine"}
    assert {p: n for p, n in reported.per_partition.items() if n} == {0: 1}

    # The worker owning partition 1 died: its standby here is promoted.
    _assign(worker, actives=[0, 1], standbys=[2])
    asyncio.run(worker._on_recovered())
    assert set(reported.index) == {"mine", "standby-a", "standby-b"}
    assert reported.first_count("standby-b") == ["standby-b", 1001, 1, 8]
    assert {p: n for p, n in reported.per_partition.items() if n} == {0: 1, 1: 2}

    # And partition 0 moved away (a standby now): its reports leave memory.
    _assign(worker, actives=[1], standbys=[0])
    asyncio.run(worker._on_recovered())
    assert set(reported.index) == {"standby-a", "standby-b"}
    assert len(data) == 3  # the table data itself is Faust's: nothing removed from it
