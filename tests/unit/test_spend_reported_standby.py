"""The spend worker learns the remembered reports of the partitions it actively owns, not
Faust's standby replicas of other workers' partitions (kept in the same table data), and
learns a partition's when a rebalance makes it active. Real Faust objects (the app, its
table data, its partition assignor); only the assignment a group leader would send is
given, through the assignor's own hook for it (``on_assignment``)."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from faust.assignor.client_assignment import ClientAssignment, ClientMetadata
from faust.assignor.partition_assignor import PartitionAssignor

from agents.spend import SpendWorker
from app.settings import Settings


def _assign(worker: SpendWorker, actives: list[int], standbys: list[int]) -> None:
    """The member assignment a Faust group leader sends (its client metadata as JSON,
    zlib-compressed), received as the consumer receives it after a rebalance."""
    topic = worker.settings.topic("usage")
    app = worker.app
    assignment = ClientAssignment(actives={topic: actives}, standbys={topic: standbys})
    metadata = ClientMetadata(
        assignment=assignment, url=str(app.conf.canonical_url), changelog_distribution={}
    )
    assignor = app.assignor
    assert isinstance(assignor, PartitionAssignor)  # Faust's own, as the worker's app has
    assignor.on_assignment(
        ConsumerProtocolMemberAssignment(
            assignor.version,
            sorted(assignment.kafka_protocol_assignment(app.tables)),
            zlib.compress(metadata.dumps()),
        )
    )
    assert assignor.assigned_actives() == {(topic, p) for p in actives}
    assert assignor.assigned_standbys() == {(topic, p) for p in standbys}


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
