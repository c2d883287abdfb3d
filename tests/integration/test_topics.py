"""`tollgate topics ensure` against the real broker: creates, is idempotent, reports drift."""

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from app.events.topics import _config_entries, ensure_topics, plan_topics
from app.settings import Settings

pytestmark = pytest.mark.integration


async def test_creates_all_topics_with_partitions_and_cleanup_policy(
    kafka_settings: Settings,
) -> None:
    first = await ensure_topics(kafka_settings)
    plans = plan_topics(kafka_settings)
    assert sorted(first.created) == sorted(p.name for p in plans)
    assert first.ok

    second = await ensure_topics(kafka_settings)
    assert second.created == []
    assert sorted(second.existing) == sorted(p.name for p in plans)
    assert second.ok

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.kafka_bootstrap)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([p.name for p in plans])}
        configs = _config_entries(
            await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, p.name) for p in plans]
            )
        )
    finally:
        await admin.close()
    usage = kafka_settings.topic("usage")
    decisions = kafka_settings.topic("budget.decisions")
    assert len(described[usage]["partitions"]) == kafka_settings.topic_partitions
    assert configs[decisions]["cleanup.policy"] == "compact"
    assert configs[kafka_settings.topic("budget.policies")]["cleanup.policy"] == "compact"
    assert configs[usage]["cleanup.policy"] == "delete"


async def test_reports_a_decisions_topic_that_is_not_compacted(kafka_settings: Settings) -> None:
    decisions = kafka_settings.topic("budget.decisions")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(decisions, 1, 1, topic_configs={"cleanup.policy": "delete"})]
        )
    finally:
        await admin.close()
    report = await ensure_topics(kafka_settings)
    assert not report.ok
    assert any(decisions in p and "compact" in p for p in report.problems)


async def test_reports_drift_of_a_topic_the_broker_has_only_just_created(
    kafka_settings: Settings,
) -> None:
    # Right after topics are created (by us or a racing peer), the broker's metadata lags a
    # few hundred ms: DescribeConfigs answers UNKNOWN_TOPIC_OR_PARTITION and DescribeTopics
    # lists no partitions for a topic that exists. That is "not known yet", never "fine".
    for attempt in range(3):  # the lag follows a burst of creations: make one each time
        settings = kafka_settings.model_copy(
            update={"topic_prefix": f"{kafka_settings.topic_prefix}x{attempt}"}
        )
        await ensure_topics(
            settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}b"})
        )
        decisions = settings.topic("budget.decisions")
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(decisions, 1, 1, topic_configs={"cleanup.policy": "delete"})]
            )
        finally:
            await admin.close()
        report = await ensure_topics(settings)
        assert any(decisions in p and "compact" in p for p in report.problems), report
        assert any(decisions in p and "1 partitions" in p for p in report.problems), report
