"""The Kafka topics Tollgate uses, and `tollgate topics ensure`.

Owns the list of topics (name, key, partitions, cleanup policy) from
ARCHITECTURE.md and the idempotent bootstrap that creates them or reports how
an existing topic differs. It does not produce or consume.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from app.events import clients
from app.settings import Settings

CleanupPolicy = Literal["delete", "compact"]


@dataclass(frozen=True)
class TopicSpec:
    suffix: str  # "usage" -> "tollgate.usage"
    value_schema: str
    key: str
    cleanup_policy: CleanupPolicy
    high_volume: bool  # gets settings.topic_partitions, else 1..3 partitions
    description: str
    extra_config: dict[str, str] = field(default_factory=dict)


TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec(
        "requests", "Request", "user_id", "delete", True, "every request seen, incl. blocked"
    ),
    TopicSpec("usage", "Usage", "user_id", "delete", True, "tokens and cost of every LLM call"),
    TopicSpec(
        "budget.policies",
        "BudgetPolicy",
        "scope",
        "compact",
        False,
        "budget policies, latest per scope",
        {"min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
    ),
    TopicSpec(
        "budget.decisions",
        "BudgetDecision",
        "scope",
        "compact",
        False,
        "cap decisions, latest per scope; every dispatcher reads it from the start",
        {"min.cleanable.dirty.ratio": "0.1", "segment.ms": "3600000"},
    ),
    TopicSpec(
        "budget.partials",
        "(JSON, internal)",
        "scope",
        "delete",
        True,
        "per-partition partial spend sums, spend worker to itself",
        {"retention.ms": str(24 * 3600 * 1000)},
    ),
    TopicSpec("alerts", "Alert", "alert_key", "delete", False, "anomaly and budget alerts"),
    TopicSpec(
        "anomaly.state",
        "(engine checkpoint, internal)",
        "agent name",
        "compact",
        False,
        "anomaly models and the usage offsets they have seen, latest per agent",
        {
            "max.message.bytes": str(64 * 1024 * 1024),
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "3600000",
        },
    ),
    TopicSpec("outcomes", "Outcome", "session_id", "delete", False, "business outcomes"),
    TopicSpec(
        "routing.features",
        "(JSON, internal)",
        "request_id",
        "delete",
        True,
        "features (no text) of economy-routed calls and dispatcher-judged labels, "
        "dispatchers to the router learner",
        {"retention.ms": str(3 * 24 * 3600 * 1000)},
    ),
    TopicSpec(
        "routing.state",
        "(router model, internal)",
        "router-model",
        "compact",
        False,
        "the shared router model, latest; every dispatcher restores and follows it",
        {
            "max.message.bytes": str(64 * 1024 * 1024),
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "3600000",
        },
    ),
    TopicSpec(
        "routing.learner",
        "(learner checkpoint, internal)",
        "router-learner",
        "compact",
        False,
        "the router learner's model, offsets and waiting join state, latest",
        {
            "max.message.bytes": str(64 * 1024 * 1024),
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": "3600000",
        },
    ),
    TopicSpec(
        "deadletter",
        "(original bytes)",
        "original key",
        "delete",
        False,
        "undecodable events, with reason and origin in headers",
    ),
)

LOW_VOLUME_PARTITIONS = 3
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


@dataclass(frozen=True)
class TopicPlan:
    name: str
    partitions: int
    replication: int
    config: dict[str, str]


@dataclass
class EnsureReport:
    created: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class TopicsError(RuntimeError):
    """Topics exist but do not match what Tollgate needs."""


def plan_topics(settings: Settings) -> list[TopicPlan]:
    plans = []
    for spec in TOPIC_SPECS:
        partitions = settings.topic_partitions if spec.high_volume else LOW_VOLUME_PARTITIONS
        config = {"cleanup.policy": spec.cleanup_policy, **spec.extra_config}
        plans.append(
            TopicPlan(settings.topic(spec.suffix), partitions, settings.topic_replication, config)
        )
    return plans


#: Right after a topic is created (here or by a racing peer) the broker's metadata lags, a
#: few hundred ms on a busy node: DescribeConfigs answers UNKNOWN_TOPIC_OR_PARTITION and
#: DescribeTopics lists no partitions for a topic that exists. Its drift is checked once
#: the broker describes it, waiting at most this long.
METADATA_WAIT_S = 10.0
METADATA_POLL_S = 0.1


def _config_errors(responses: list[Any]) -> dict[str, int]:
    """topic -> error code, for the topics DescribeConfigs could not describe."""
    return {
        resource[3]: resource[0]
        for response in responses
        for resource in response.resources
        if resource[0]
    }


async def _describe_existing(
    admin: AIOKafkaAdminClient, names: list[str]
) -> tuple[dict[str, Any], dict[str, dict[str, str]], dict[str, int]]:
    """Partitions and configs of topics that exist, once the broker describes them all (or
    at ``METADATA_WAIT_S``); the third item: those it still does not, with an error code."""
    deadline = time.monotonic() + METADATA_WAIT_S
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    while True:
        described = {t["topic"]: t for t in await admin.describe_topics(names)}
        responses = await admin.describe_configs(resources)
        configs, config_errors = _config_entries(responses), _config_errors(responses)
        unknown = {
            name: config_errors.get(name) or described.get(name, {}).get("error_code") or 0
            for name in names
            if name in config_errors or not described.get(name, {}).get("partitions")
        }
        if not unknown or time.monotonic() >= deadline:
            return described, configs, unknown
        await asyncio.sleep(METADATA_POLL_S)


def _config_entries(responses: list[Any]) -> dict[str, dict[str, str]]:
    """topic -> {config name: value} from DescribeConfigs responses of any version."""
    out: dict[str, dict[str, str]] = {}
    for response in responses:
        for resource in response.resources:
            error_code, _msg, _type, name, entries = resource[:5]
            if error_code:
                continue
            out[name] = {entry[0]: entry[1] for entry in entries}
    return out


async def ensure_topics(
    settings: Settings, admin: AIOKafkaAdminClient | None = None
) -> EnsureReport:
    """Create missing topics; report existing ones that differ (never alter them silently)."""
    own_admin = admin is None
    if admin is None:
        admin = clients.admin(settings, purpose="topics", request_timeout_ms=15_000)
        await admin.start()
    report = EnsureReport()
    try:
        plans = plan_topics(settings)
        existing = set(await admin.list_topics())
        missing = [p for p in plans if p.name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(p.name, p.partitions, p.replication, topic_configs=p.config)
                    for p in missing
                ],
                timeout_ms=30000,
            )
            for entry in response.topic_errors:
                name, code = entry[0], entry[1]
                message = entry[2] if len(entry) > 2 else ""
                if code == 0:
                    report.created.append(name)
                elif code == TOPIC_ALREADY_EXISTS:
                    existing.add(name)  # created meanwhile or not yet in metadata: verify it
                else:
                    report.problems.append(
                        f"{name}: could not be created (error {code}: {message})"
                    )
        present = [p for p in plans if p.name in existing]
        report.existing = [p.name for p in present]
        if present:
            described, configs, unknown = await _describe_existing(admin, [p.name for p in present])
            for name, code in unknown.items():
                report.problems.append(
                    f"{name}: exists, but the broker did not describe it within "
                    f"{METADATA_WAIT_S:.0f} s (error {code}); run `tollgate topics ensure` again"
                )
            for plan in present:
                actual_policy = configs.get(plan.name, {}).get("cleanup.policy")
                wanted_policy = plan.config["cleanup.policy"]
                if actual_policy is not None and wanted_policy not in actual_policy.split(","):
                    report.problems.append(
                        f"{plan.name}: cleanup.policy is {actual_policy!r}, Tollgate needs "
                        f"{wanted_policy!r} (fix: kafka-configs --alter --entity-type topics "
                        f"--entity-name {plan.name} --add-config cleanup.policy={wanted_policy})"
                    )
                partitions = len(described.get(plan.name, {}).get("partitions", []))
                if partitions and partitions < plan.partitions:
                    report.problems.append(
                        f"{plan.name}: has {partitions} partitions, fewer than the configured "
                        f"{plan.partitions} (TOLLGATE_TOPIC_PARTITIONS); add partitions or lower it"
                    )
    except KafkaError as exc:
        raise TopicsError(
            f"could not ensure topics on {settings.kafka_bootstrap}: {exc!r}. "
            "Is Kafka running (`tollgate kafka status`)?"
        ) from exc
    finally:
        if own_admin:
            await admin.close()
    return report
