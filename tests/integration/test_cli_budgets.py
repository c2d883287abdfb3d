"""`tollgate budgets` against real Kafka and a real dispatcher: a scope without a policy is an
error (not "removed" with exit 0), and --url goes through the dispatcher with the admin key."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner

from app.budgets.periods import period_of
from app.budgets.policy import evaluate, parse_policy
from app.budgets.spend import decision_record
from app.cli import main
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.attribution import hash_key
from app.settings import Settings
from tests.integration.harness import running_stack

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    base = {
        "TOLLGATE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
        "TOLLGATE_STATE_DIR": str(settings.state_dir),
    }
    result = CliRunner().invoke(main, ["budgets", *args], env={**base, **env})
    return result.exit_code, result.output


async def publish_decision(settings: Settings, scope: str, spent_nanos: int) -> None:
    policy = parse_policy(scope, {"limit_usd": 5})
    now = datetime.now(UTC)
    record = decision_record(
        scope, policy, period_of("month", now), spent_nanos, now,
        evaluate(spent_nanos, policy), now, "spend",
    )  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        value = EventCodec().encode("BudgetDecision", record)
        await producer.send_and_wait(settings.topic("budget.decisions"), value, key=scope.encode())
    finally:
        await producer.stop()


def test_budgets_through_kafka_name_scopes_without_a_policy(kafka_settings: Settings) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    code, output = cli(kafka_settings, "rm", "user:nobody")
    assert code == 1 and "user:nobody has no budget policy" in output and "removed" not in output
    code, output = cli(kafka_settings, "status", "user:nobody")
    assert code == 1 and "no budget policy" in output
    assert cli(kafka_settings, "set", "user:ann", "--monthly", "5")[0] == 0
    code, output = cli(kafka_settings, "status", "user:ann")
    assert code == 0 and "no spend recorded yet" in output
    # The spend, exactly (session 14's probe: $0.020025 was printed "$0.0200", hiding the
    # overshoot of a $0.02 cap).
    asyncio.run(publish_decision(kafka_settings, "user:ann", 20_025_000))
    code, output = cli(kafka_settings, "status", "user:ann")
    assert code == 0 and "$0.020025 of $5 per month" in output, output
    code, output = cli(kafka_settings, "rm", "user:ann")
    assert code == 0 and "removed user:ann" in output
    code, output = cli(kafka_settings, "rm", "user:ann")
    assert code == 1, "removed twice"


def test_budgets_through_the_dispatcher_with_the_admin_key(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        f"keys:\n"
        f"  - {{id: ops, sha256: {hash_key('sk-admin')}, user_id: ops, admin: true}}\n"
        f"  - {{id: bo, sha256: {hash_key('sk-bo')}, user_id: bo}}\n"
    )
    asyncio.run(ensure_topics(kafka_settings))
    # A shell without the Kafka exports: the CLI must not need them with --url.
    nowhere = Settings(
        kafka_bootstrap="127.0.0.1:1", topic_prefix="unused", state_dir=tmp_path / "cli"
    )
    with running_stack(kafka_settings, keys_file=keys) as stack:
        url = ("--url", stack.url)
        code, output = cli(nowhere, "set", "feature:chat", "--daily", "12.5", *url)
        assert code == 1 and "HTTP 401" in output and "--key" in output
        code, output = cli(
            nowhere, "set", "feature:chat", "--daily", "12.5", *url, "--key", "sk-bo"
        )
        assert code == 1 and "HTTP 403" in output
        code, output = cli(
            nowhere, "set", "feature:chat", "--daily", "12.5", *url, "--key", "sk-admin"
        )
        assert code == 0, output
        assert "warning" not in output
        code, output = cli(nowhere, "set", "key:nope", "--daily", "1", *url, "--key", "sk-admin")
        assert code == 0 and "warning: the keys file has no key with id 'nope'" in output
        capped = httpx.put(
            f"{stack.url}/v1/budgets/key:bo",
            json={"limit_usd": 1},
            headers={"Authorization": "Bearer sk-admin"},
        ).json()
        assert capped["scope"] == "key:bo" and "warning" not in capped
        admin = {"TOLLGATE_ADMIN_KEY": "sk-admin"}  # the key from the environment
        code, output = cli(nowhere, "list", *url, **admin)
        assert code == 0 and "feature:chat" in output and "12.5" in output
        code, output = cli(nowhere, "status", "feature:chat", *url, **admin)
        assert code == 0 and "open" in output and "of $12.5 per day" in output
        code, output = cli(nowhere, "status", "user:nobody", *url, **admin)
        assert code == 1 and "no budget policy" in output
        code, output = cli(nowhere, "rm", "user:nobody", *url, **admin)
        assert code == 1 and "no budget policy to remove" in output
        code, output = cli(nowhere, "rm", "feature:chat", *url, **admin)
        assert code == 0 and "removed feature:chat" in output
        code, output = cli(nowhere, "list", *url, **admin)
        assert code == 0 and "feature:chat" not in output
