"""How long an admin's budget change holds the event loop while it is saved, in process.

An admin's ``PUT``/``DELETE /v1/budgets/{scope}`` is in the saved budget view
(``<state dir>/budget-view.json``) before it is answered. The view keeps up to 10,000 usage
events the gate holds as not yet counted by the spend worker; the whole file is written each
time. This bench holds ``--events`` such events (each on a capped scope, none counted by a
decision, so none is pruned), then times ``--changes`` policy changes two ways:

| path | what it is |
|---|---|
| ``on the loop (before)`` | what the handler did until review 63's fix: ``snapshot.record`` then ``snapshot.save()`` (document, JSON and file written on the event loop, no pruning; the JSON is today's ``BudgetSnapshot.encode``: one ``orjson.dumps``) |
| ``off the loop (now)`` | the handler's ``_save_policy_change``: the change recorded, then ``BudgetViewSaver.save()`` (copies of the view's dicts taken on the loop; the prune, the JSON and the file in a thread), awaited |

The two paths take turns, change by change, so both see the same load. For each change: ``answer`` is the wall time until the save returns (the handler could
answer), ``loop stall`` the longest gap a ticker task on the same loop saw during it
(``asyncio.sleep(0)`` in a loop: the longest time nothing else could run). Wall time, noisy
on a shared machine: the process CPU time and the load average are printed beside them.

Run ``python -m bench.budget_view_save`` (``--events N``, ``--changes N``, ``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from app.budgets.admin import policy_record
from app.budgets.gate import BudgetGate
from app.budgets.policy import PolicyBook, parse_policy
from app.clock import Clock
from app.events.codec import EventCodec
from app.http.budget_snapshot import BudgetSnapshot, Uncounted
from app.http.server import BudgetViewSaver, _save_policy_change


def held_view(path: Path, events: int) -> tuple[BudgetSnapshot, BudgetGate]:
    book = PolicyBook()
    book.put(parse_policy("user:*", {"limit_usd": 1000}))
    gate = BudgetGate(book, Clock(None))
    snapshot = BudgetSnapshot(path, EventCodec())
    now_ms = int(time.time() * 1000)
    for n in range(events):  # 100 users, 3 partitions, no decision yet: all wait
        entry = Uncounted((f"user:u{n % 100}", "global"), 1_000_000, now_ms + n, n % 3, n)
        snapshot.held(f"evt_{n:032x}", entry)
    snapshot.save()
    return snapshot, gate


async def ticker(state: dict[str, float]) -> None:
    """Until ``state["stop"]``: the longest gap between two of its turns on the loop."""
    last = time.perf_counter()
    while not state["stop"]:
        await asyncio.sleep(0)
        now = time.perf_counter()
        state["longest"], last = max(state["longest"], now - last), now


async def timed(change: Any, n: int, figures: dict[str, Any]) -> None:
    """``change(n)``, a coroutine saving the n-th change, timed with a ticker beside it."""
    state = {"longest": 0.0, "stop": 0.0}
    tick = asyncio.create_task(ticker(state))
    await asyncio.sleep(0)  # the ticker runs first
    cpu, started = time.process_time(), time.perf_counter()
    await change(n)
    figures["answer_s"].append(time.perf_counter() - started)
    figures["cpu_s"] += time.process_time() - cpu
    state["stop"] = 1.0
    await tick
    figures["loop_stall_s"].append(state["longest"])


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "min_ms": round(ms[0], 2),
        "p50_ms": round(statistics.median(ms), 2),
        "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 2),
        "max_ms": round(ms[-1], 2),
    }


async def run(events: int, changes: int, directory: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"events": events, "changes": changes}
    old, _ = held_view(directory / "before.json", events)

    async def before(n: int) -> None:
        record = policy_record(parse_policy(f"user:c{n}", {"limit_usd": 5}), "admin")
        old.record("policies", f"user:c{n}", record)
        old.save()

    snapshot, gate = held_view(directory / "now.json", events)
    components: Any = SimpleNamespace(
        budget_snapshot=snapshot, budget_saver=BudgetViewSaver(snapshot, gate)
    )

    async def now(n: int) -> None:
        record = policy_record(parse_policy(f"user:c{n}", {"limit_usd": 5}), "admin")
        await _save_policy_change(components, f"user:c{n}", record)

    paths = {"on the loop (before)": before, "off the loop (now)": now}
    for path in paths:
        results[path] = {"answer_s": [], "loop_stall_s": [], "cpu_s": 0.0}
    for n in range(changes):  # in turn: both see the same load
        for path, change in paths.items():
            await timed(change, n, results[path])
    saved = json.loads((directory / "now.json").read_text())
    results["saved_uncounted"] = len(saved["uncounted"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as directory:
        results = asyncio.run(run(args.events, args.changes, Path(directory)))
    results["load_average_1m"] = {"start": load, "end": os.getloadavg()[0]}
    print(f"{args.events} held events, {args.changes} changes each; load {load:.2f} at start")
    for path in ("on the loop (before)", "off the loop (now)"):
        figures = results[path]
        print(
            f"{path:22}  answer {summary(figures['answer_s'])}  "
            f"loop stall {summary(figures['loop_stall_s'])}  cpu {figures['cpu_s']:.2f} s"
        )
    print(f"saved view holds {results['saved_uncounted']} uncounted events (none pruned)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
