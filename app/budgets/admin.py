"""Publishing and reading budget policies (admin API, CLI, start-up YAML file).

Owns the write side of ``tollgate.budget.policies``: every change is one
``BudgetPolicy`` record keyed by scope on the compacted topic; a removal is a
record with ``deleted=true``. Readers rebuild a :class:`PolicyBook` from it.

Budgets file (``TOLLGATE_BUDGETS_FILE``)::

    budgets:
      "user:*":        {period: month, limit_usd: 5, upgrade_url: "https://example.com/upgrade"}
      "feature:chat":  {period: day, limit_usd: 200}
      global:          {period: month, limit_usd: 10000, thresholds: [0.5, 0.8, 0.95]}

Every dispatcher start publishes each entry of the file only when the entry differs from the
one the file last published for its scope (``budgets_file_action``): a cap changed or removed
through the admin API or the CLI since stays over a restart with the same file; editing the
entry in the file makes it win again. A scope whose policy the file published, and that the
file no longer names, is removed (a deletion record, as the admin API's DELETE); one changed
through the API or CLI since the file published it stays. Records carry the digest of the
file's last entry (``file_digest``: ``NO_FILE_ENTRY`` when there is none; carried on by API
and CLI changes), so every replica and a fresh state dir decide alike from the topic alone,
and replicas starting at once publish the same records. An API or CLI change written before
records carried the digest (BudgetPolicy v1) is kept at the first start that meets it, and the
file's entry then is taken as the one last published: it is published again with that digest
(``adopt``), so a later edit of the entry applies. A dispatcher's API change made before it
read another replica's newer file record of the scope carried the older digest: read back
after that record, it is sent again carrying the newer one (``PolicyBook.apply_record``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml

from app.budgets.policy import (
    FILE_WRITER,
    NO_FILE_ENTRY,
    Policy,
    PolicyBook,
    PolicyError,
    file_digest_of,
    parse_policy,
)
from app.events import clients
from app.events.codec import build_codec
from app.events.compacted import CompactedView
from app.events.producer import policy_message, send_now
from app.metering.usage import event_time, new_id
from app.settings import Settings

log = logging.getLogger(__name__)
FileAction = Literal["publish", "unchanged", "kept", "adopt"]


def policy_record(
    policy: Policy, updated_by: str | None = None, file_digest: str | None = None
) -> dict[str, Any]:
    """A change of ``policy.scope``; ``file_digest``: the scope's last budgets-file entry
    (``PolicyBook.file_digest``), carried on so a restart does not undo this change."""
    return policy.to_record(new_id(), event_time(), updated_by, file_digest)


def file_policy_record(policy: Policy) -> dict[str, Any]:
    """The budgets file's entry ``policy``, published."""
    return policy_record(policy, FILE_WRITER, policy.digest())


def deletion_record(
    scope: str, updated_by: str | None = None, file_digest: str | None = None
) -> dict[str, Any]:
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
        "file_digest": file_digest,
    }


def budgets_file_action(entry: Policy, current: dict[str, Any] | None) -> FileAction:
    """What a dispatcher start does with the budgets file's ``entry``, given the scope's
    latest record on the policies topic (None: never set, or compacted away).

    ``publish``: the entry differs from the one the file last published for the scope (or
    the file never published one): the file's edit wins. ``unchanged``: the scope already
    holds the entry. ``kept``: the file's entry is the one it published before, and an
    admin-API or CLI change (or removal) made since stands. ``adopt``: an API or CLI change
    written before records named the file's entry (it is not known whether the file's entry
    changed since): it stands, and the entry is taken as the one the file published."""
    last = file_digest_of(current)
    if current is None or (last is not None and entry.digest() != last):
        return "publish"
    if last is None:
        return "adopt"
    if not current.get("deleted") and Policy.from_record(current) == entry:
        return "unchanged"
    return "kept"


def file_deletion_record(scope: str) -> dict[str, Any]:
    """The removal of a scope the budgets file published and no longer names."""
    return deletion_record(scope, FILE_WRITER, NO_FILE_ENTRY)


def with_file_digest(record: dict[str, Any], digest: str) -> dict[str, Any]:
    """``record``'s change again (who made it, what it says), carrying ``digest`` as the
    file's last entry: an API or CLI change written before records carried it (``adopt``),
    or one that carried an older entry's (``PolicyBook.apply_record``)."""
    return {**record, "event_id": new_id(), "ts": event_time(), "file_digest": digest}


def apply_budgets_file(
    entries: list[Policy],
    records: dict[str, dict[str, Any]],
    skip: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[dict[str, Any]], list[str]]:
    """The records to publish for ``entries`` given the topic's ``records`` by scope, and the
    scopes whose newer API or CLI change is kept (each logged as a warning). A scope the file
    published (the latest record is the file's) and no longer names is removed. ``skip``:
    scopes this process changed itself since it started (their change stands). The same
    ``entries`` and ``records`` give the same records, whichever replica decides."""
    publish: list[dict[str, Any]] = []
    kept: list[str] = []
    for entry in entries:
        current = records.get(entry.scope)
        if entry.scope in skip:
            action: FileAction = "kept"
        else:
            action = budgets_file_action(entry, current)
        if action == "publish":
            publish.append(file_policy_record(entry))
        elif action == "adopt" and current is not None:
            publish.append(with_file_digest(current, entry.digest()))
            kept.append(entry.scope)
            log.warning(
                "budgets file entry not applied: the scope was changed through the admin API or "
                "CLI by a version that did not record the file's entry; the change is kept and "
                "this entry taken as the file's: edit the file's entry to apply it",
                extra=_change(entry.scope, current),
            )
        elif action == "kept":
            kept.append(entry.scope)
            log.warning(
                "budgets file entry not applied: the scope was changed through the admin API "
                "or CLI after the file last published it; edit the file's entry to apply it",
                extra=_change(entry.scope, current),
            )
    named = {entry.scope for entry in entries}
    for scope in sorted(set(records) - named - set(skip)):
        current = records[scope]
        if current.get("deleted"):
            continue
        if current.get("updated_by") == FILE_WRITER:
            publish.append(file_deletion_record(scope))
            log.warning(
                "budgets file entry removed: the file no longer names the scope",
                extra={"scope": scope},
            )
        elif file_digest_of(current):
            kept.append(scope)
            log.warning(
                "budgets file no longer names the scope, but it was changed through the admin "
                "API or CLI after the file last published it: the change is kept",
                extra=_change(scope, current),
            )
    return publish, kept


def _change(scope: str, current: dict[str, Any] | None) -> dict[str, Any]:
    current = current or {}
    return {
        "scope": scope,
        "changed_by": current.get("updated_by"),
        "deleted": bool(current.get("deleted")),
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
        """Send ``record``; a change with a null ``file_digest`` carries on the scope's (the
        budgets file's last entry), as the admin API's do."""
        if record.get("file_digest") is None:
            carried = (await self.policies()).file_digest(scope)
            record = {**record, "file_digest": carried}
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
