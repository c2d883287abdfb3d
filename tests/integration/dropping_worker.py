"""``tollgate worker`` whose Faust consumer drops records it has fetched, once per partition.

The condition behind the restarted spend worker that stopped counting (issue 10): Faust's
consumer can drop records it has already fetched (the consumer position has moved past them)
— records fetched before a rebalance that ran ahead of a seek, a stale read offset, a
partition paused mid-batch — and nothing fetches them again. When the dropped records are
the tail of a changelog partition under recovery, the recovery waits for them for ever and
the worker never counts again; when they are the tail of a usage partition, those events
stay uncounted until more traffic arrives.

This worker makes the condition certain instead of occasional: the first fetched batch of
every partition of the spend table's changelog, and the first fetched batch of every usage
partition after the worker is ready, are dropped. Run as a process by
``test_spend_worker_stall.py`` (``python -m tests.integration.dropping_worker``); never by the
product. It wraps a Faust method on purpose: if Faust changes it, the test fails loudly
here (AttributeError), which is the signal to re-check the guarantee.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from faust.transport.consumer import Consumer

from agents.spend import run_worker
from app.logs import configure_logging
from app.settings import Settings

_getmany = Consumer.getmany
_dropped_once: set[Any] = set()


# Which topics lose their first fetched batch (suffixes); the requests test sets ".requests".
DROPS = tuple(os.environ.get("DROPPING_WORKER_TOPICS", "-spend-changelog,.usage").split(","))


def _drops(topic: str) -> bool:
    return topic.endswith(DROPS)


async def _dropping_getmany(
    self: Consumer,
    timeout: float,  # noqa: ASYNC109 (Faust's signature)
) -> AsyncIterator[tuple[Any, Any]]:
    dropping: set[Any] = set()
    async for tp, message in _getmany(self, timeout=timeout):
        if _drops(tp.topic) and (tp in dropping or tp not in _dropped_once):
            # One fetched batch of this partition is lost, as Faust loses records.
            _dropped_once.add(tp)
            dropping.add(tp)
            print(
                f"dropping_worker: dropped {tp.topic}/{tp.partition}@{message.offset}",
                file=sys.stderr,
                flush=True,
            )
            continue
        yield tp, message


Consumer.getmany = _dropping_getmany  # type: ignore[method-assign]

if __name__ == "__main__":
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)  # as `tollgate worker` does
    run_worker(settings)
