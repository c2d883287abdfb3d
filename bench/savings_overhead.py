"""What the router and the response cache cost per request, in process, on realistic sizes.

Requests: the first ``--requests`` calls of the Azure conversation trace
(``data/AzureLLMInferenceTrace_conv.csv``): each gets a prompt of about its
``ContextTokens`` x 4 characters, made of GSM8K prompts from the shared routing data
(the trace has no text), as one user message with ``model: "auto"``, ``temperature: 0``
and ``max_tokens`` = its ``GeneratedTokens``; a cached answer of ``GeneratedTokens`` x 4
characters. The router has learned the economy outcomes of 600 GSM8K prompts (globally
and for the request's feature), as a live one would have.

Timed per request (``perf_counter_ns`` around each call, in this process, no I/O):

| operation | what it is |
|---|---|
| ``baseline: parse_chat_request`` | what the dispatcher already spends validating the same body (``app.gateway.pipeline``) |
| ``route`` | ``Router.route(body, feature)``: read the body, signals, hashed keys, score, tier |
| ``route (feature model)`` | the same for a feature with its own learned model (two models mixed) |
| ``learn`` | ``Router.learn`` of one outcome (off the request path: when an outcome arrives) |
| ``cache plan`` | ``plan_lookup``: cacheability, tenant, canonical JSON and SHA-256 of the body |
| ``cache get (miss)`` / ``get (hit)`` / ``put`` | ``MemoryCache``; its coroutines never suspend, so they are driven without an event loop (an ``await`` in the dispatcher costs the same) |
| ``sse replay`` | ``sse_replay`` of the cached answer with a usage chunk |

Prompts longer than ``routing.max_prompt_chars`` (800) are read head and tail only, so
the router's cost is bounded whatever the prompt size. Figures are wall time per call and
are noisy on a shared machine; the process CPU time per call is printed beside them.

The run first waits up to ``--wait-quiet`` seconds (60) for the load average to fall below
0.5 per CPU and prints the load at start and end: on a busy machine every figure,
baseline included, grows together.

Run ``python -m bench.savings_overhead`` (``--requests N``, ``--json-out FILE``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from app.cache import CachedAnswer, CacheSettings, MemoryCache, plan_lookup, sse_replay
from app.gateway.pipeline import parse_chat_request
from app.routing import Router, RoutingSettings
from bench.router_quality import DEFAULT_DATA, load

TRACE = Path(__file__).resolve().parent.parent / "data" / "AzureLLMInferenceTrace_conv.csv"
FEATURES = ("chat", "search", "summarize", "code-assist", "support-bot")


def build_requests(n: int, texts: list[str]) -> list[tuple[dict[str, Any], int]]:
    """(body, completion chars) for the first n trace calls."""
    pieces = itertools.cycle(texts)
    requests = []
    with TRACE.open(newline="") as handle:
        for row in itertools.islice(csv.DictReader(handle), n):
            target = int(row["ContextTokens"]) * 4
            parts: list[str] = []
            size = 0
            while size < target:
                part = next(pieces)
                parts.append(part)
                size += len(part) + 1
            body = {
                "model": "auto",
                "messages": [{"role": "user", "content": " ".join(parts)[:target]}],
                "temperature": 0,
                "max_tokens": max(int(row["GeneratedTokens"]), 1),
            }
            requests.append((body, int(row["GeneratedTokens"]) * 4))
    return requests


def drive(coroutine: Any) -> Any:
    """Run a coroutine that never suspends (MemoryCache's) without an event loop's overhead."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended; drive() is for in-memory backends only")


def timed(name: str, calls: Sequence[Callable[[], Any]]) -> dict[str, Any]:
    durations = []
    cpu_start = time.process_time()
    for call in calls:
        started = time.perf_counter_ns()
        call()
        durations.append((time.perf_counter_ns() - started) / 1000)
    cpu = (time.process_time() - cpu_start) / len(calls) * 1e6
    durations.sort()
    return {
        "operation": name,
        "calls": len(calls),
        "mean_us": statistics.mean(durations),
        "p50_us": durations[len(durations) // 2],
        "p99_us": durations[min(len(durations) - 1, int(len(durations) * 0.99))],
        "cpu_us_per_call": cpu,
    }


def wait_quiet(max_seconds: float) -> float:
    """Wait (up to ``max_seconds``) for the 1-minute load average to drop below 0.5 per CPU;
    return the load average when measuring starts."""
    deadline = time.monotonic() + max_seconds
    limit = 0.5 * (os.cpu_count() or 1)
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = wait_quiet(args.wait_quiet)
    examples = load(Path(args.data))
    texts = [e.prompt for e in examples]
    requests = build_requests(args.requests, texts)
    router = Router(RoutingSettings())
    for index, example in enumerate(examples[:600]):
        body = {"messages": [{"role": "user", "content": example.prompt}]}
        outcome = "success" if example.weak_correct else "failure"
        router.learn(body, "economy", outcome, FEATURES[index % len(FEATURES)])
    settings = CacheSettings(enabled=True)
    cache = MemoryCache(settings.max_bytes, max_entry_bytes=settings.max_entry_bytes)
    raw = [orjson.dumps(body) for body, _ in requests]
    plans = [
        plan_lookup(settings, body, feature="chat", team="t", api_key_id=None, user_id="u")
        for body, _ in requests
    ]
    answers = []
    for (_body, chars), plan in zip(requests, plans, strict=True):
        completion = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ("word " * (chars // 5)).strip()},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        answers.append((plan.key, completion, CachedAnswer(orjson.dumps(completion), "m", 1, 1)))
    results = [
        timed(
            "baseline: parse_chat_request",
            [lambda data=data: parse_chat_request(orjson.loads(data)) for data in raw],
        ),
        timed("route", [lambda b=body: router.route(b) for body, _ in requests]),
        timed(
            "route (feature model)",
            [lambda b=body: router.route(b, "chat") for body, _ in requests],
        ),
        timed(
            "learn",
            [
                lambda b=body, i=i: router.learn(b, "economy", "success" if i % 3 else "failure")
                for i, (body, _) in enumerate(requests)
            ],
        ),
        timed(
            "cache plan (key)",
            [
                lambda b=body: plan_lookup(
                    settings, b, feature="chat", team="t", api_key_id=None, user_id="u"
                )
                for body, _ in requests
            ],
        ),
        timed(
            "cache get (miss)",
            [lambda k=key: drive(cache.get(k)) for key, _, _ in answers],
        ),
        timed(
            "cache put",
            [
                lambda k=key, a=answer: drive(cache.put(k, a, ttl_s=60))
                for key, _, answer in answers
            ],
        ),
        timed(
            "cache get (hit)",
            [lambda k=key: drive(cache.get(k)) for key, _, _ in answers],
        ),
        timed(
            "sse replay",
            [
                lambda c=completion: sse_replay(c, include_usage=True)
                for _, completion, _ in answers
            ],
        ),
    ]
    sizes = sorted(len(r) for r in raw)
    return {
        "requests": len(requests),
        "body_bytes_p50": sizes[len(sizes) // 2],
        "body_bytes_max": sizes[-1],
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['requests']} requests from the Azure trace (body p50 "
        f"{report['body_bytes_p50']:,} B, max {report['body_bytes_max']:,} B); load average "
        f"{report['load_average_at_start']:.2f} at start, {report['load_average'][0]:.2f} at "
        f"the end, on {report['cpus']} CPUs",
        "",
        "| operation | mean µs | p50 µs | p99 µs | CPU µs/call |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['operation']} | {r['mean_us']:.1f} | {r['p50_us']:.1f} | {r['p99_us']:.1f} "
            f"| {r['cpu_us_per_call']:.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="RouteLLM responses CSV")
    parser.add_argument("--json-out", default=None)
    parser.add_argument(
        "--wait-quiet", type=float, default=60.0, help="seconds to wait for an idle machine"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report))
    document = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(document)
    if args.json_out:
        Path(args.json_out).write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
