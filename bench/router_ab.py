"""Router cost, this tree against another checkout, in one process, interleaved.

On a busy shared machine ``bench.savings_overhead`` run for two versions one after the
other measures the machine's load as much as the code (runs of the same code differ by
50 %). This loads both versions' ``app`` packages into one process (the other one from
``OTHER``, e.g. ``git worktree add --detach /tmp/old <commit>`` or a ``git archive`` copy),
lets each router learn the same 600 GSM8K outcomes over five features, checks that they
decide the same on 200 of the bodies, then times ``Router.route`` on the overhead
benchmark's 2,000 bodies in chunks of 50 calls, alternating which version goes first,
with the thread's CPU time; then ``Router.learn`` of one outcome per body (one round:
both routers learn the same outcomes). Slow phases of the machine hit both sides of a pair alike, so
the per-pair ratio is steady where the absolute figures are not.

Run ``python -m bench.router_ab OTHER [--rounds 6]`` from this tree's root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
CHUNK = 50


def _load(root: Path) -> tuple[Any, list[dict[str, Any]]]:
    """A router of the tree at ``root`` that has learned, and the benchmark's bodies; the
    tree's modules are then moved aside in ``sys.modules`` so the next tree can load."""
    sys.path.insert(0, str(root))
    try:
        from app.routing import Router, RoutingSettings
        from bench.router_quality import DEFAULT_DATA, load
        from bench.savings_overhead import FEATURES, build_requests

        examples = load(DEFAULT_DATA)
        router = Router(RoutingSettings())
        for index, example in enumerate(examples[:600]):
            body = {"messages": [{"role": "user", "content": example.prompt}]}
            outcome = "success" if example.weak_correct else "failure"
            router.learn(body, "economy", outcome, FEATURES[index % len(FEATURES)])
        router.load_model()
        bodies = [body for body, _ in build_requests(2000, [e.prompt for e in examples])]
    finally:
        sys.path.remove(str(root))
    for name in [n for n in sys.modules if n.split(".")[0] in ("app", "bench")]:
        sys.modules[f"{root}:{name}"] = sys.modules.pop(name)
    model_file = type(router.model).score.__code__.co_filename
    if not model_file.startswith(str(root)):
        raise SystemExit(f"{root}: its router was loaded from {model_file}")
    return router, bodies


def run(other: Path, rounds: int) -> dict[str, Any]:
    this_router, bodies = _load(HERE)
    other_router, _ = _load(other)
    for body in bodies[:200]:
        for feature in (None, "chat"):
            a, b = this_router.route(body, feature), other_router.route(body, feature)
            if (a.tier, a.reason) != (b.tier, b.reason) or abs(a.score - b.score) > 1e-9 * b.score:
                raise SystemExit(f"the two routers decide differently:\n{a}\n{b}")
    chunks = [bodies[i : i + CHUNK] for i in range(0, len(bodies), CHUNK)]
    results = {}
    for operation in ("route", "route (feature model)", "learn"):
        totals = {"this": 0, "other": 0}
        ratios = []
        # learn: one round (both routers learn the same outcomes, as the benchmark's "learn")
        for round_ in range(1 if operation == "learn" else rounds):
            for index, chunk in enumerate(chunks):
                sides = [("this", this_router), ("other", other_router)]
                if (index + round_) % 2:
                    sides.reverse()
                spent = {}
                for side, router in sides:
                    started = time.thread_time_ns()
                    for number, body in enumerate(chunk):
                        if operation == "learn":
                            outcome = "success" if number % 3 else "failure"
                            router.learn(body, "economy", outcome)
                        else:
                            router.route(body, None if operation == "route" else "chat")
                    spent[side] = time.thread_time_ns() - started
                    totals[side] += spent[side]
                ratios.append(spent["this"] / spent["other"])
        ratios.sort()
        calls = (1 if operation == "learn" else rounds) * len(bodies)
        results[operation] = {
            "this_cpu_us": totals["this"] / calls / 1000,
            "other_cpu_us": totals["other"] / calls / 1000,
            "ratio_median": statistics.median(ratios),
            "ratio_quartiles": (ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4]),
            "pairs": len(ratios),
        }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="root of the other checkout")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    results = run(args.other.resolve(), args.rounds)
    print(
        "| operation | this CPU µs/call | other CPU µs/call | this/other, per-pair median (quartiles) |"
    )
    print("|---|--:|--:|--:|")
    for name, r in results.items():
        low, high = r["ratio_quartiles"]
        print(
            f"| {name} | {r['this_cpu_us']:.1f} | {r['other_cpu_us']:.1f} | "
            f"{r['ratio_median']:.3f} ({low:.3f}-{high:.3f}, {r['pairs']} pairs) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
