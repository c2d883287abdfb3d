"""Kafka clients, built one way from the one ``Settings``.

Owns how Tollgate connects to Kafka: which brokers (``settings.kafka_bootstrap``), the
client id a broker logs for each role (``<topic_prefix>-<purpose>``), and the settings every
client of a kind shares, stated once here:

- **producers** always wait for every in-sync replica (``acks="all"``) and are idempotent:
  everything Tollgate writes (usage, policies, decisions, checkpoints, dead letters) is
  something a reader counts or restores from, so a retried send must neither lose nor
  duplicate a record;
- **consumers** never auto-commit (a reader commits, or records its offsets in a
  checkpoint, only once what it did with a record is durable), start from the earliest
  offset when they have none, and read uncommitted: no producer of ours uses transactions
  (at-least-once, readers de-duplicate by ``event_id``), so ``read_committed`` adds nothing;
- every client gets the same request timeout unless its call site says otherwise.

Role-specific choices (a batch size, a larger request for a checkpoint, a shorter timeout
so a dead broker shows sooner) are keyword arguments at the call site, next to the reason.
``Settings`` has no TLS or SASL options yet; when it gets them, they are added here once.

Does not own: what is written or read (``codec.py``, ``producer.py``, ``consumer.py``),
waiting out an outage (``kafka_retry.py``), or the clients Faust builds for the spend
worker from its ``App`` configuration. ``tests/unit/test_kafka_clients_owned.py`` fails
if an aiokafka client is constructed anywhere else in ``app/``, ``agents/`` or ``devtools/``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from app.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: aiokafka's own default, stated so that every client visibly shares it.
REQUEST_TIMEOUT_MS = 40_000
#: aiokafka's defaults for the sizes a role may raise (a state checkpoint needs more).
MAX_REQUEST_BYTES = 1024 * 1024
MAX_PARTITION_FETCH_BYTES = 1024 * 1024
MAX_FETCH_BYTES = 50 * 1024 * 1024
PRODUCER_BATCH_BYTES = 16 * 1024

OffsetReset = Literal["earliest", "latest"]


def client_id(settings: Settings, purpose: str) -> str:
    """What a broker logs for this client, e.g. ``tollgate-clickhouse-sink``."""
    return f"{settings.topic_prefix}-{purpose}"


def _connection(settings: Settings, purpose: str, bootstrap: str | None) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap or settings.kafka_bootstrap,
        "client_id": client_id(settings, purpose),
    }


def producer(
    settings: Settings,
    *,
    purpose: str,
    linger_ms: int = 0,
    max_batch_size: int = PRODUCER_BATCH_BYTES,
    max_request_size: int = MAX_REQUEST_BYTES,
    request_timeout_ms: int = REQUEST_TIMEOUT_MS,
) -> AIOKafkaProducer:
    """A producer that loses nothing Kafka acknowledged and writes a retried record once."""
    return AIOKafkaProducer(
        **_connection(settings, purpose, None),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=max_batch_size,
        max_request_size=max_request_size,
        request_timeout_ms=request_timeout_ms,
    )


def consumer(
    settings: Settings,
    *topics: str,
    purpose: str,
    group_id: str | None,
    auto_offset_reset: OffsetReset = "earliest",
    max_poll_records: int | None = None,
    max_partition_fetch_bytes: int = MAX_PARTITION_FETCH_BYTES,
    fetch_max_bytes: int = MAX_FETCH_BYTES,
    request_timeout_ms: int = REQUEST_TIMEOUT_MS,
) -> AIOKafkaConsumer:
    """A consumer of ``topics`` (none: the caller assigns or subscribes later).

    ``group_id=None`` is said at the call site on purpose: without a group, aiokafka assigns
    every partition to this one consumer (a view that reads a whole topic); with one, the
    group shares the partitions and keeps the committed offsets.
    """
    return AIOKafkaConsumer(
        *topics,
        **_connection(settings, purpose, None),
        group_id=group_id,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
        auto_offset_reset=auto_offset_reset,
        max_poll_records=max_poll_records,
        max_partition_fetch_bytes=max_partition_fetch_bytes,
        fetch_max_bytes=fetch_max_bytes,
        request_timeout_ms=request_timeout_ms,
    )


def admin(
    settings: Settings,
    *,
    purpose: str,
    request_timeout_ms: int = REQUEST_TIMEOUT_MS,
    bootstrap: str | None = None,
) -> AIOKafkaAdminClient:
    """An admin client (topics, consumer-group offsets, cluster metadata).

    ``bootstrap``: a broker other than the configured one, for the local launcher probing
    the address it started; everything else talks to ``settings.kafka_bootstrap``.
    """
    return AIOKafkaAdminClient(
        **_connection(settings, purpose, bootstrap), request_timeout_ms=request_timeout_ms
    )


STOP_TIMEOUT_S = 10.0


async def within(awaitable: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await ``awaitable`` for at most ``timeout_s``, else raise ``TimeoutError`` at once.

    Unlike ``asyncio.wait_for``, it does not wait for the abandoned call to finish being
    cancelled (a ``stop()`` that hangs would hang the caller too). A call cancelled from
    inside (not by the caller) is a ``RuntimeError``, never a ``CancelledError``."""
    task = asyncio.ensure_future(awaitable)
    done, _pending = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # no unread error
        raise TimeoutError(f"{what} took longer than {timeout_s:.0f} s")
    if task.cancelled():  # by aiokafka itself, not by our caller: an error, not a stop order
        raise RuntimeError(f"{what} was cancelled from within")
    return task.result()


async def stop_within(client: Any, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop an aiokafka client, giving up after ``timeout_s`` (False then): a follower that
    must start over (a new client, reading again) cannot wait for a stop that hangs.

    After the broker was killed, a consumer's ``stop()`` itself raises ``CancelledError``
    (its fetch task was cancelled under it). Let through, that ended the follower's task
    as if it had been told to stop: a compacted view then never read again, while its
    ``synced`` flag stayed set (test_views_after_broker_restart.py)."""
    try:
        await within(client.stop(), timeout_s, "stopping a Kafka client")
    except TimeoutError as exc:
        log.warning("%s; abandoned", exc, extra={"client": type(client).__name__})
        return False
    except Exception:  # a client that fails to stop cleanly is stopped all the same
        return True
    return True
