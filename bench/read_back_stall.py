"""How long a dispatcher's start-up read-back of uncounted usage holds the event loop.

A starting dispatcher reads back the usage in Kafka the spend worker has not counted
(``UncountedUsage.hold_uncounted_usage``), fetches of up to 5,000 events, and holds each at
its budget gate (decode, scopes, the budget periods of each capped scope). Until review 49's
I1 fix a fetch was held whole without a turn of the event loop; now the loop gets a turn
every ``READ_BACK_YIELD_EVERY`` events. This bench reads back ``--fetches`` fetches of
``--events`` usage events (in process: a consumer that hands them over at once, no Kafka)
two ways, in turn:

| path | what it is |
|---|---|
| ``whole fetch (before)`` | ``READ_BACK_YIELD_EVERY`` set past the fetch: no turn inside a fetch |
| ``a turn every N (now)`` | the read-back as it is |

For each read-back: ``took`` (wall time until it returns) and ``loop stall`` (the longest
gap a ticker task on the same loop saw meanwhile: the longest a health check or a call
would have waited), and ``on CPU`` (the longest such gap in this process's CPU time: what
the loop itself held, without the time a loaded machine gave other processes), and the
longest garbage collection meanwhile (a full one, tens of ms, lands in whichever turn it
falls in). Wall time is noisy on a shared machine: the load average is printed.

Run ``PYTHONPATH=. python -m bench.read_back_stall`` (``--events N``, ``--fetches N``,
``--rounds N``, ``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition

from app.budgets.gate import BudgetGate
from app.budgets.policy import PolicyBook, parse_policy
from app.clock import Clock
from app.events import clients
from app.events.codec import EventCodec
from app.events.producer import usage_message
from app.http import uncounted as uncounted_module
from app.http.budget_snapshot import BudgetSnapshot
from app.http.uncounted import UncountedUsage
from app.metering.ingest import ReportedRequests
from app.settings import Settings
from bench.budget_view_save import summary


class FetchedTopic:
    """A usage partition as the read-back's consumer sees it: ``fetch`` events a fetch."""

    def __init__(self, messages: list[Any], fetch: int) -> None:
        self.tp = TopicPartition("usage", 0)
        self.messages, self.fetch, self.read = messages, fetch, 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return {self.tp}

    async def end_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        return {self.tp: len(self.messages)}

    async def beginning_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        return {self.tp: 0}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.read = offset

    def pause(self, tp: TopicPartition) -> None:
        return None

    async def position(self, tp: TopicPartition) -> int:
        return self.read

    async def getmany(self, *tps: Any, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        fetched = self.messages[self.read : self.read + self.fetch]
        self.read += len(fetched)
        return {self.tp: fetched} if fetched else {}


def usage_messages(settings: Settings, codec: EventCodec, count: int) -> list[Any]:
    """``count`` priced usage events of 100 users, each capped (``user:*``) and global."""
    now = datetime.now(UTC)
    values = []
    for user in range(100):
        record = {
            "event_id": f"evt-{user}",
            "request_id": f"req-{user}",
            "ts": now,
            "user_id": f"u{user}",
            "provider": "openai",
            "model_requested": "gpt-4o-mini",
            "model_served": "gpt-4o-mini",
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "cost_usd_nanos": 30_000,
            "price_unknown": False,
        }
        values.append(usage_message(settings, codec, record).value)
    return [SimpleNamespace(value=values[n % 100], partition=0, offset=n) for n in range(count)]


async def ticker(state: dict[str, float]) -> None:
    """Until ``state["stop"]``: the longest gap between two of its turns on the loop, in
    wall time and in this process's CPU time (the part the loop itself held, without the
    time the machine gave other processes meanwhile)."""
    wall, cpu = time.perf_counter(), time.process_time()
    while not state["stop"]:
        await asyncio.sleep(0)
        wall_now, cpu_now = time.perf_counter(), time.process_time()
        state["longest"] = max(state["longest"], wall_now - wall)
        state["longest_cpu"] = max(state["longest_cpu"], cpu_now - cpu)
        wall, cpu = wall_now, cpu_now


class LongestCollection:
    """The longest garbage collection (CPU time) while it is entered: a full collection
    of this process's heap lands in some read-back's turns whatever their length."""

    def __init__(self) -> None:
        self.longest, self._began = 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.longest = max(self.longest, time.process_time() - self._began)

    def __enter__(self) -> LongestCollection:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


async def read_back(directory: Path, messages: list[Any], fetch: int) -> dict[str, float]:
    book = PolicyBook()
    book.put(parse_policy("user:*", {"limit_usd": 1000}))
    book.put(parse_policy("global", {"limit_usd": 100_000, "period": "month"}))
    gate, codec = BudgetGate(book, Clock(None)), EventCodec()
    snapshot = BudgetSnapshot(directory / "budget-view.json", codec)
    settings = Settings(state_dir=directory, start_uncounted_read_s=3600)  # all, however slow
    uncounted = UncountedUsage(settings, gate, codec, ReportedRequests(), snapshot)
    topic = FetchedTopic(messages, fetch)
    clients.consumer = lambda *args, **kwargs: topic  # the read-back's consumer: no Kafka
    state = {"longest": 0.0, "longest_cpu": 0.0, "stop": 0.0}
    tick = asyncio.create_task(ticker(state))
    await asyncio.sleep(0)  # the ticker runs first
    started = time.perf_counter()
    with LongestCollection() as collection:
        held = await uncounted.hold_uncounted_usage()
    took = time.perf_counter() - started
    state["stop"] = 1.0
    await tick
    if held != len(messages):
        raise SystemExit(f"held {held} of {len(messages)} events: the bench is broken")
    return {
        "took_s": took,
        "loop_stall_s": state["longest"],
        "cpu_stall_s": state["longest_cpu"],
        "gc_s": collection.longest,
    }


async def run(events: int, fetches: int, rounds: int, directory: Path) -> dict[str, Any]:
    settings, codec = Settings(state_dir=directory), EventCodec()
    messages = usage_messages(settings, codec, events * fetches)
    every, consumer = uncounted_module.READ_BACK_YIELD_EVERY, clients.consumer
    paths = {"whole fetch (before)": events + 1, f"a turn every {every} (now)": every}
    results: dict[str, Any] = {"events_a_fetch": events, "fetches": fetches, "rounds": rounds}
    for path in paths:
        results[path] = {"took_s": [], "loop_stall_s": [], "cpu_stall_s": [], "gc_s": []}
    try:
        for _ in range(rounds):  # in turn: both see the same load
            for path, yield_every in paths.items():
                uncounted_module.READ_BACK_YIELD_EVERY = yield_every
                figures = await read_back(directory, messages, events)
                for name, value in figures.items():
                    results[path][name].append(value)
    finally:
        uncounted_module.READ_BACK_YIELD_EVERY, clients.consumer = every, consumer
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="events a fetch")
    parser.add_argument("--fetches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        results = asyncio.run(run(args.events, args.fetches, args.rounds, Path(directory)))
    results["load_average_1m"] = {"start": load, "end": os.getloadavg()[0]}
    print(
        f"{args.fetches} fetches of {args.events} events, {args.rounds} read-backs each; "
        f"load {load:.2f} at start"
    )
    for path, figures in results.items():
        if isinstance(figures, dict) and "took_s" in figures:
            print(
                f"{path:24}  took {summary(figures['took_s'])}  "
                f"loop stall {summary(figures['loop_stall_s'])}  "
                f"of it on CPU {summary(figures['cpu_stall_s'])}  "
                f"longest garbage collection {summary(figures['gc_s'])}"
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
