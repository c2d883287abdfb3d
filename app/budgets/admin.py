"""Publishing and reading budget policies (admin API, CLI, start-up YAML file).

Owns the write side of ``tollgate.budget.policies``: every change is one
``BudgetPolicy`` record keyed by scope on the compacted topic; a removal is a
record with ``deleted=true``. Readers rebuild a :class:`PolicyBook` from it.

Budgets file (``TOLLGATE_BUDGETS_FILE``)::

    budgets:
      "user:*":        {period: month, limit_usd: 5, upgrade_url: "https://example.com/upgrade"}
      "feature:chat":  {period: day, limit_usd: 200}
      global:          {period: month, limit_usd: 10000, thresholds: [0.5, 0.8, 0.95]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.budgets.policy import Policy, PolicyBook, PolicyError, parse_policy
from app.events import clients
from app.events.codec import build_codec
from app.events.compacted import CompactedView
from app.events.producer import policy_message, send_now
from app.metering.usage import event_time, new_id
from app.settings import Settings


def policy_record(policy: Policy, updated_by: str | None = None) -> dict[str, Any]:
    return policy.to_record(new_id(), event_time(), updated_by)


def deletion_record(scope: str, updated_by: str | None = None) -> dict[str, Any]:
    return {
        "event_id": new_id(),
        "ts": event_time(),
        "scope": scope,
        "period": "month",
        "window_seconds": None,
        "limit_usd_nanos": 0,
        "thresholds": [1.0],
        "timezone": "UTC",
        "upgrade_url": None,
        "upgrade_prompt": None,
        "deleted": True,
        "updated_by": updated_by,
    }


def load_budgets_file(path: Path) -> list[Policy]:
    """Policies of a budgets YAML file; a bad entry raises PolicyError naming scope and field."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError("budgets_file", f"cannot read budgets file {path}: {exc}") from exc
    entries = document.get("budgets") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise PolicyError("budgets_file", f"{path}: expected a top-level 'budgets:' mapping")
    policies = []
    for scope, body in entries.items():
        try:
            policies.append(parse_policy(str(scope), body))
        except PolicyError as exc:
            raise PolicyError(exc.field, f"{path}: budgets.{scope}: {exc}") from None
    return policies


class PolicyAdmin:
    """Policies and decisions straight from Kafka (the CLI; no dispatcher needed)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = build_codec(settings.schema_registry_url)

    async def publish(self, scope: str, record: dict[str, Any]) -> None:
        producer = clients.producer(self.settings, purpose="budget-admin")
        await producer.start()
        try:
            sent = await send_now(
                producer, policy_message(self.settings, self.codec, scope, record)
            )
            await sent
        finally:
            await producer.stop()

    async def read(self, suffix: str) -> dict[str, dict[str, Any]]:
        view = CompactedView(self.settings, self.settings.topic(suffix), self.codec)
        synced = await view.start(timeout_s=20)
        await view.stop()
        if not synced:
            raise PolicyError(
                "kafka",
                f"could not read {self.settings.topic(suffix)} from {self.settings.kafka_bootstrap}",
            )
        return dict(view.records)

    async def policies(self) -> PolicyBook:
        book = PolicyBook()
        for scope, record in (await self.read("budget.policies")).items():
            book.apply_record(record, scope)
        return book
