"""What the savings levers save on real traffic shapes: the router and the cache in the real pipeline.

One run, three parts:

1. **Overhead** (in process, before any server starts): what the router and the response
   cache cost per request against parsing the request, by calling
   :func:`bench.savings_overhead.run` (Azure trace sizes, GSM8K text).
2. **Router quality** (in process): APGR, CPT(50 %) and CPT(80 %) on held-out halves of
   the shared routing data (``data/routing/gsm8k_responses.csv``), for the Tollgate router
   (learned, and prior only) against the random and prompt-length baselines on the same
   seeded splits, by calling :func:`bench.router_quality.evaluate`.
3. **Replay through the real pipeline**: a local Kafka broker, the upstream simulator,
   ``tollgate sink`` (embedded chdb, and the reports server) and ``tollgate serve``, each its
   own process on free ports, with a state directory of their own. The first
   ``--trace-minutes`` of the shared Azure conversation trace
   (``data/AzureLLMInferenceTrace_conv.csv``) are replayed open-loop at their arrival times
   divided by ``--speed`` (the time compression), every call a ``model: "auto"`` chat
   completion at ``temperature: 0``:

   - prompt: a GSM8K question of the routing data as the user message (drawn at random,
     seeded) after a system message of other GSM8K text that brings the request to the
     trace row's ``ContextTokens`` (about 4 characters a token; the trace has no text);
   - answer length: the row's ``GeneratedTokens`` (the simulator's ``X-Sim-Completion-Tokens``);
   - users and features: ``devtools.trace.Attribution`` (seeded Zipf users, five features);
   - ``--repeat-share`` (20 %) of calls repeat an earlier call exactly (same user, feature and
     body: same tenant and cache key), so the cache (enabled: ``TOLLGATE_CACHE``) is used;
   - outcomes: for every answered call the benchmark posts ``/v1/outcomes`` (batched, by
     ``request_id``) with the routing data's label of the served tier: Mixtral's (the economy
     model's) correctness when the call was served by the economy tier, GPT-4's otherwise.
     The dispatcher learns from the economy ones as they arrive.

   When the sink has written every Usage and Outcome event, the figures are read from the
   reports server (``/v1/reports/summary``, ``savings``, ``breakdown?by=tier``, ``by=model``):
   the same numbers ``tollgate report`` and the dashboard show. Client-side counts (tier and
   cache headers) are printed beside them as a cross-check.

Run ``python -m bench.savings`` (``--quick`` for a run under about 3 minutes, ``--json-out
FILE``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import router_quality, savings_overhead
from bench.budget import _tollgate_argv, source_state
from bench.gateway import (
    HOST,
    Child,
    clean_env,
    cpu_seconds,
    free_port,
    kafka_event_count,
    log,
    spawn,
    wait_http,
)
from bench.router_quality import DEFAULT_DATA, Example

TRACE = Path(__file__).resolve().parent.parent / "data" / "AzureLLMInferenceTrace_conv.csv"
CHARS_PER_TOKEN = 4
TIERS = ("economy", "standard", "premium")
TIER_MODELS = {"economy": "gpt-4o-mini", "standard": "gpt-4o", "premium": "gpt-4-turbo"}
UPSTREAM = "simulator"  # the upstream's name: the default routing provider's
OUTCOME_BATCH = 200


# -- the workload ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One replayed call: when (seconds from the start), who, what, and its label."""

    at_s: float
    user: str
    feature: str
    body: bytes
    completion_tokens: int
    example: int  # index into the routing data: its labels are the call's outcome
    repeat_of: int | None  # index of the call it repeats exactly


def _context(texts: Sequence[str], rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < chars:
        part = texts[rng.randrange(len(texts))]
        parts.append(part)
        size += len(part) + 1
    return " ".join(parts)[:chars]


def build_calls(
    examples: Sequence[Example],
    *,
    trace_minutes: float,
    speed: float,
    repeat_share: float,
    seed: int,
    trace: Path = TRACE,
    max_calls: int | None = None,
) -> list[Call]:
    """The trace's first ``trace_minutes`` as calls (seeded): see the module docstring."""
    from devtools.trace import Attribution, read_azure_csv

    rows = sorted(read_azure_csv(trace), key=lambda c: c.ts)
    origin = rows[0].ts
    rows = [r for r in rows if r.ts - origin < timedelta(minutes=trace_minutes)]
    if max_calls is not None:
        rows = rows[:max_calls]
    attribution = Attribution(seed=seed)
    rng = random.Random(seed)
    texts = [e.prompt for e in examples]
    calls: list[Call] = []
    fresh: list[int] = []  # indices of calls that are not repeats
    for row in rows:
        at_s = (row.ts - origin).total_seconds() / speed
        if calls and rng.random() < repeat_share:
            index = fresh[rng.randrange(len(fresh))]
            original = calls[index]
            calls.append(
                Call(at_s, original.user, original.feature, original.body,
                     original.completion_tokens, original.example, index)
            )  # fmt: skip
            continue
        assigned = attribution.assign(row)
        fresh.append(len(calls))
        example = rng.randrange(len(examples))
        question = examples[example].prompt
        context_chars = max(0, row.prompt_tokens * CHARS_PER_TOKEN - len(question))
        messages = []
        if context_chars > 0:
            messages.append({"role": "system", "content": _context(texts, rng, context_chars)})
        messages.append({"role": "user", "content": question})
        body = {"model": "auto", "messages": messages, "temperature": 0}
        calls.append(
            Call(at_s, assigned.user_id or "anonymous", assigned.feature or "chat",
                 orjson.dumps(body), max(1, row.completion_tokens), example, None)
        )  # fmt: skip
    return calls


# -- the load ----------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    tier: str | None
    model: str | None
    cache: str | None
    escalated_from: str | None
    request_id: str | None
    latency_ms: float
    lag_ms: float  # how late the call was sent against its scheduled time


@dataclass
class LoadResult:
    answers: list[Answer | None] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    outcomes_posted: int = 0
    outcome_labels: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


async def replay(
    url: str,
    calls: Sequence[Call],
    examples: Sequence[Example],
    *,
    max_in_flight: int,
    post_outcomes: bool = True,
) -> LoadResult:
    """Send every call at its time (open loop, at most ``max_in_flight`` at once) and post
    the outcome of each answered call in batches."""
    result = LoadResult(answers=[None] * len(calls))
    pending: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(max_in_flight)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()

        async def one(index: int, call: Call) -> None:
            async with gate:
                sent = time.monotonic()
                headers = {
                    "Content-Type": "application/json",
                    "X-Tollgate-User": call.user,
                    "X-Tollgate-Feature": call.feature,
                    "X-Sim-Completion-Tokens": str(call.completion_tokens),
                }
                try:
                    async with session.post(
                        f"{url}/v1/chat/completions", data=call.body, headers=headers
                    ) as resp:
                        await resp.read()
                        h = resp.headers
                        answer = Answer(
                            status=resp.status,
                            tier=h.get("X-Tollgate-Tier"),
                            model=h.get("X-Tollgate-Model-Served"),
                            cache=h.get("X-Tollgate-Cache"),
                            escalated_from=h.get("X-Tollgate-Escalated-From"),
                            request_id=h.get("X-Request-Id"),
                            latency_ms=(time.monotonic() - sent) * 1000,
                            lag_ms=(sent - started - call.at_s) * 1000,
                        )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.errors[type(exc).__name__] += 1
                    return
            result.answers[index] = answer
            if answer.status != 200:
                result.errors[f"HTTP {answer.status}"] += 1
                return
            if post_outcomes and answer.request_id:
                example = examples[call.example]
                correct = (
                    example.weak_correct if answer.tier == "economy" else (example.strong_correct)
                )
                label = "success" if correct else "failure"
                result.outcome_labels[f"{answer.tier}:{label}"] += 1
                pending.append({"request_id": answer.request_id, "outcome": label})

        async def flush() -> None:
            while pending:
                batch = pending[:OUTCOME_BATCH]
                del pending[:OUTCOME_BATCH]
                async with session.post(f"{url}/v1/outcomes", json={"outcomes": batch}) as resp:
                    text = await resp.text()
                    if resp.status != 202:
                        result.errors[f"outcomes HTTP {resp.status}: {text[:200]}"] += 1
                    else:
                        result.outcomes_posted += len(batch)

        async def outcome_loop(done: asyncio.Event) -> None:
            while not done.is_set():
                await flush()
                await asyncio.sleep(0.5)
            await flush()

        done = asyncio.Event()
        poster = asyncio.create_task(outcome_loop(done))
        tasks = []
        for index, call in enumerate(calls):
            delay = started + call.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, call)))
        await asyncio.gather(*tasks)
        result.wall_s = time.monotonic() - started
        done.set()
        await poster
    return result


# -- the stack ---------------------------------------------------------------------------------
@dataclass
class Pipeline:
    dispatcher_url: str
    reports_url: str
    token: str
    bootstrap: str
    prefix: str
    children: dict[str, Child]


def start_pipeline(
    bootstrap: str,
    tmp: Path,
    children: list[Child],
    *,
    latency_scale: float,
    seed: int,
    routing_extra: dict[str, Any],
) -> Pipeline:
    """Topics, simulator, sink (with its reports server) and dispatcher on free ports."""
    from app.events.topics import ensure_topics
    from app.settings import Settings

    prefix = f"bs{uuid.uuid4().hex[:6]}"
    asyncio.run(ensure_topics(Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)))
    token = uuid.uuid4().hex + uuid.uuid4().hex
    sim_port, reports_port, dispatcher_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "bench.gateway", "--serve-simulator", "--port", str(sim_port)]
    argv += ["--latency-scale", str(latency_scale), "--seed", str(seed)]
    simulator = spawn("simulator", argv, clean_env(), tmp)
    children.append(simulator)
    common = {
        "TOLLGATE_KAFKA_BOOTSTRAP": bootstrap,
        "TOLLGATE_TOPIC_PREFIX": prefix,
        "TOLLGATE_INTERNAL_TOKEN": token,
        "TOLLGATE_REPORTS_HOST": HOST,
        "TOLLGATE_REPORTS_PORT": str(reports_port),
        "TOLLGATE_LOG_LEVEL": "WARNING",
        "TOLLGATE_LOG_FORMAT": "json",
    }
    sink = spawn(
        "sink",
        _tollgate_argv("sink"),
        clean_env(**common, TOLLGATE_STATE_DIR=str(tmp / "sink-state")),
        tmp,
    )
    children.append(sink)
    upstreams = [
        {
            "name": UPSTREAM,
            "base_url": f"http://{HOST}:{sim_port}/v1",
            "models": list(TIER_MODELS.values()),
            "price_provider": "openai",
            "forward_headers": ["X-Sim-*"],
        }
    ]
    routing = {"providers": [{"provider": UPSTREAM, **TIER_MODELS}], **routing_extra}
    dispatcher = spawn(
        "dispatcher",
        _tollgate_argv("serve"),
        clean_env(
            **common,
            TOLLGATE_DISPATCHER_HOST=HOST,
            TOLLGATE_DISPATCHER_PORT=str(dispatcher_port),
            TOLLGATE_STATE_DIR=str(tmp / "dispatcher-state"),
            TOLLGATE_UPSTREAMS=json.dumps(upstreams),
            TOLLGATE_ROUTING=json.dumps(routing),
            TOLLGATE_CACHE=json.dumps({"enabled": True}),
        ),
        tmp,
    )
    children.append(dispatcher)
    pipeline = Pipeline(
        dispatcher_url=f"http://{HOST}:{dispatcher_port}",
        reports_url=f"http://{HOST}:{reports_port}",
        token=token,
        bootstrap=bootstrap,
        prefix=prefix,
        children={"simulator": simulator, "sink": sink, "dispatcher": dispatcher},
    )

    async def ready() -> None:
        await asyncio.gather(
            wait_http(f"http://{HOST}:{sim_port}/healthz", simulator),
            wait_http(pipeline.dispatcher_url + "/readyz", dispatcher, 120, kafka=True),
            wait_reports(pipeline, sink, 180),
        )

    asyncio.run(ready())
    return pipeline


async def wait_reports(pipeline: Pipeline, sink: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not sink.alive():
            raise RuntimeError(f"the sink exited:\n{sink.log_tail()}")
        try:
            await fetch_report(pipeline, "budgets")
            return
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the sink's reports server did not answer in {timeout_s:.0f}s ({last})")


async def fetch_report(pipeline: Pipeline, name: str, **params: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{pipeline.reports_url}/v1/reports/{name}",
            params=params,
            headers={"Authorization": f"Bearer {pipeline.token}"},
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp,
    ):
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/v1/reports/{name}: HTTP {resp.status} {body[:300]!r}")
        return orjson.loads(body)


async def wait_warehouse(
    pipeline: Pipeline, window: dict[str, str], outcomes: int, timeout_s: float
) -> dict[str, Any]:
    """Poll the reports until they count every Usage event on the topic and every outcome."""
    usage_events = await kafka_event_count(pipeline.bootstrap, [f"{pipeline.prefix}.usage"])
    started = time.monotonic()
    seen: tuple[int, int] = (-1, -1)
    while time.monotonic() - started < timeout_s:
        savings = await fetch_report(pipeline, "savings", **window)
        features = (await fetch_report(pipeline, "outcomes", **window))["features"]
        # An escalated request is one request and two Usage events (the first attempt is
        # counted in routing.escalated, not in requests).
        rows = int(savings["requests"]) + int(savings["routing"]["escalated"])
        seen = (rows, sum(int(f["outcomes"]) for f in features))
        if seen == (usage_events, outcomes):
            break
        await asyncio.sleep(1.0)
    return {
        "usage_events_on_topic": usage_events,
        "usage_rows_reported": seen[0],
        "outcomes_posted": outcomes,
        "outcomes_reported": seen[1],
        "complete": seen == (usage_events, outcomes),
        "waited_s": round(time.monotonic() - started, 1),
    }


def _minute(at: datetime, up: bool) -> datetime:
    floor = at.replace(second=0, microsecond=0)
    return floor + timedelta(minutes=1) if up else floor


def run_pipeline(
    args: argparse.Namespace,
    examples: Sequence[Example],
    bootstrap: str,
    tmp: Path,
    children: list[Child],
) -> dict[str, Any]:
    """Part 3 on a running broker: start the services, replay, read the reports."""
    calls = build_calls(
        examples,
        trace_minutes=args.trace_minutes,
        speed=args.speed,
        repeat_share=args.repeat_share,
        seed=args.seed,
        max_calls=args.max_calls,
    )
    routing_extra = {} if args.quality_target is None else {"quality_target": args.quality_target}
    log(f"replay: {len(calls)} calls over {calls[-1].at_s:.0f}s; starting the services")
    pipeline = start_pipeline(
        bootstrap,
        tmp,
        children,
        latency_scale=args.latency_scale,
        seed=args.seed,
        routing_extra=routing_extra,
    )
    dispatcher = pipeline.children["dispatcher"]
    cpu_before = {name: cpu_seconds(c.pid) for name, c in pipeline.children.items()}
    load_before = os.getloadavg()
    start = datetime.now(UTC)
    log(f"replaying at {args.speed}x into {pipeline.dispatcher_url}")
    load = asyncio.run(
        replay(pipeline.dispatcher_url, calls, examples, max_in_flight=args.max_in_flight)
    )
    cpu = {name: cpu_seconds(c.pid) - cpu_before[name] for name, c in pipeline.children.items()}
    load_after = os.getloadavg()
    if not dispatcher.alive():
        raise RuntimeError(f"the dispatcher died:\n{dispatcher.log_tail()}")
    end = datetime.now(UTC)
    window = {
        "from": _minute(start, up=False).isoformat(),
        "to": _minute(end + timedelta(minutes=1), up=True).isoformat(),
    }
    log(f"replay done in {load.wall_s:.0f}s; waiting for the warehouse")
    complete = asyncio.run(
        wait_warehouse(pipeline, window, load.outcomes_posted, args.warehouse_timeout)
    )

    async def reports() -> dict[str, Any]:
        return {
            "summary": await fetch_report(pipeline, "summary", **window),
            "savings": await fetch_report(pipeline, "savings", **window),
            "by_tier": (await fetch_report(pipeline, "breakdown", by="tier", **window))["rows"],
            "by_model": (await fetch_report(pipeline, "breakdown", by="model", **window))["rows"],
        }

    warehouse = asyncio.run(reports())
    answered = [a for a in load.answers if a is not None and a.status == 200]
    lags = sorted(a.lag_ms for a in load.answers if a is not None)
    latencies = sorted(a.latency_ms for a in answered)
    repeats = sum(c.repeat_of is not None for c in calls)
    context_tokens = sorted(len(c.body) // CHARS_PER_TOKEN for c in calls)
    return {
        "calls": len(calls),
        "trace_minutes": args.trace_minutes,
        "speed": args.speed,
        "replay_span_s": round(calls[-1].at_s, 1),
        "offered_rate_per_s": round(len(calls) / max(calls[-1].at_s, 1e-9), 1),
        "repeats": repeats,
        "body_bytes_p50": sorted(len(c.body) for c in calls)[len(calls) // 2],
        "body_tokens_approx_max": context_tokens[-1],
        "wall_s": round(load.wall_s, 1),
        "answered": len(answered),
        "errors": dict(load.errors),
        "client": {
            "tiers": dict(Counter(a.tier for a in answered)),
            "cache": dict(Counter(a.cache for a in answered)),
            "escalated": sum(a.escalated_from is not None for a in answered),
            "outcome_labels": dict(load.outcome_labels),
            "send_lag_ms_p50": _q(lags, 0.5),
            "send_lag_ms_p99": _q(lags, 0.99),
            "latency_ms_p50": _q(latencies, 0.5),
            "latency_ms_p99": _q(latencies, 0.99),
        },
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "dispatcher_cpu_ms_per_call": round(cpu["dispatcher"] / max(len(calls), 1) * 1000, 2),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "warehouse_complete": complete,
        "window": window,
        "reports": warehouse,
    }


def _q(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))], 1)


# -- the in-process parts -----------------------------------------------------------------------
def run_quality(examples: list[Example], splits: int, seed: int) -> dict[str, Any]:
    seeds = list(range(seed, seed + splits))
    makers = {
        "random": router_quality.RandomRouter,
        "length": lambda s: router_quality.LengthRouter(),
        "tollgate_prior": lambda s: router_quality.TollgateRouter(learn=False),
        "tollgate": lambda s: router_quality.TollgateRouter(learn=True),
    }
    results = {
        name: router_quality.evaluate(make, examples, seeds) for name, make in makers.items()
    }
    length = results["length"]["apgr_per_split"]
    for name in ("tollgate", "tollgate_prior"):
        diffs = [a - b for a, b in zip(results[name]["apgr_per_split"], length, strict=True)]
        results[name]["vs_length_mean"] = sum(diffs) / len(diffs)
        results[name]["vs_length_won"] = sum(d > 0 for d in diffs)
    return {"splits": splits, "seeds": seeds, "prompts": len(examples), "results": results}


def run_overhead(requests: int, data: str) -> dict[str, Any]:
    ns = argparse.Namespace(requests=requests, data=data, wait_quiet=0.0)
    report: dict[str, Any] = savings_overhead.run(ns)
    return report


# -- the report ---------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# bench.savings ({'quick' if report['plan']['quick'] else 'full'})", ""]
    m = report["machine"]
    lines.append(
        f"Commit {m['git_head']}, {m['cpus']} CPUs, load average {m['load_average_start'][0]:.1f} "
        f"at start and {m['load_average_end'][0]:.1f} at the end (shared machine: figures are noisy)."
    )
    p = report.get("pipeline")
    if p:
        r = p["reports"]
        s, sav = r["summary"], r["savings"]
        total = sum(row["requests"] for row in r["by_tier"]) or 1
        lines += [
            "",
            "## Replay through the real pipeline (figures from the warehouse reports)",
            "",
            f"{p['calls']:,} calls: the first {p['trace_minutes']:g} minutes of the Azure "
            f"conversation trace at {p['speed']:g}x ({p['replay_span_s']:.0f} s, "
            f'{p["offered_rate_per_s"]:.1f} calls/s offered), `model: "auto"`, temperature 0, '
            f"{p['repeats']:,} exact repeats ({p['repeats'] / p['calls']:.1%}); body p50 "
            f"{p['body_bytes_p50']:,} B. Answered {p['answered']:,}; errors {p['errors'] or 0}. "
            f"Warehouse complete: {p['warehouse_complete']['complete']} "
            f"({p['warehouse_complete']['usage_rows_reported']:,} of "
            f"{p['warehouse_complete']['usage_events_on_topic']:,} usage events, "
            f"{p['warehouse_complete']['outcomes_reported']:,} of "
            f"{p['warehouse_complete']['outcomes_posted']:,} outcomes).",
            "",
            f"> {s['sentence']}",
            "",
            "| tier | usage events | share | cost $ | baseline (GPT-4) $ |",
            "|---|--:|--:|--:|--:|",
        ]
        for row in r["by_tier"]:
            lines.append(
                f"| {row['tier']} | {row['requests']:,} | {row['requests'] / total:.1%} "
                f"| {row['cost_usd']} | {row['baseline_cost_usd']} |"
            )
        d, cache, routing = sav["decomposition"], sav["cache"], sav["routing"]
        lines += [
            "",
            "| savings vs GPT-4 | $ |",
            "|---|--:|",
            f"| total ({sav['savings_pct']} %) | {sav['savings_usd']} |",
            f"| model choice (GPT-4 → the top tier, gpt-4-turbo) | {d['model_choice_usd']} |",
            f"| routing (top tier → the routed tier) | {d['routing_usd']} |",
            f"| response cache | {d['cache_usd']} |",
            f"| provider prompt caching | {d['prompt_cache_usd']} |",
            "",
            f"Cache: {cache['hits']:,} hits, hit rate {_pct(cache['hit_rate'])}, saved "
            f"${cache['savings_usd']}. Routing efficiency: {routing['downtiered']:,} calls "
            f"({_pct(routing['downtiered_share'])}) served cheaper than the top tier; "
            f"{routing['downtiered_with_outcome']:,} of them with an outcome, "
            f"{_pct(routing['downtiered_success_share'])} successful.",
            "",
            f"Client side (headers): tiers {p['client']['tiers']}, cache {p['client']['cache']}, "
            f"escalated {p['client']['escalated']}; outcomes posted {p['client']['outcome_labels']}. "
            f"Send lag p50/p99 {p['client']['send_lag_ms_p50']}/{p['client']['send_lag_ms_p99']} ms, "
            f"latency p50/p99 {p['client']['latency_ms_p50']}/{p['client']['latency_ms_p99']} ms; "
            f"dispatcher CPU {p['dispatcher_cpu_ms_per_call']} ms per call; load average "
            f"{p['load_average_before'][0]:.1f} before the replay, {p['load_average_after'][0]:.1f} after.",
        ]
    o = report.get("overhead")
    if o:
        lines += [
            "",
            "## Router and cache cost per request (in process)",
            "",
            savings_overhead.table(o),
        ]
    q = report.get("quality")
    if q:
        lines += [
            "",
            f"## Router quality on held-out halves ({q['prompts']} GSM8K prompts, {q['splits']} "
            "seeded 50/50 splits; learn the first half's economy outcomes, score the second)",
            "",
            "| router | APGR mean ± std | vs length (splits won) | CPT(50 %) | CPT(80 %) |",
            "|---|--:|--:|--:|--:|",
        ]
        for name, r in q["results"].items():
            versus = (
                f"{r['vs_length_mean']:+.3f} ({r['vs_length_won']}/{q['splits']})"
                if "vs_length_mean" in r
                else ""
            )
            lines.append(
                f"| {name} | {r['apgr_mean']:.3f} ± {r['apgr_std']:.3f} | {versus} "
                f"| {r['cpt50_mean']:.1%} | {r['cpt80_mean']:.1%} |"
            )
    return "\n".join(lines)


# -- orchestration -----------------------------------------------------------------------------
def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from app.settings import Settings
    from devtools.kafka_local import LocalKafka

    examples = router_quality.load(Path(args.data))
    report: dict[str, Any] = {
        "plan": {k: v for k, v in vars(args).items() if k != "json_out"},
        "machine": {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                    **source_state()},
    }  # fmt: skip
    started = time.monotonic()
    if "overhead" in args.parts:
        log(f"overhead: {args.overhead_requests} requests in process")
        report["overhead"] = run_overhead(args.overhead_requests, args.data)
    if "quality" in args.parts:
        log(f"quality: {args.splits} splits")
        report["quality"] = run_quality(examples, args.splits, args.seed)
    if "pipeline" in args.parts:
        tmp = Path(tempfile.mkdtemp(prefix="tollgate-bench-savings-"))
        children: list[Child] = []
        launcher: LocalKafka | None = None
        try:
            bootstrap = args.kafka_bootstrap
            if bootstrap is None:
                kafka_settings = Settings(
                    kafka_bootstrap=f"{HOST}:{free_port()}",
                    kafka_controller_port=free_port(),
                    state_dir=tmp / "kafka-state",
                )
                bootstrap = kafka_settings.kafka_bootstrap
                log(f"starting Kafka on {bootstrap} (state in {tmp})")
                launcher = LocalKafka(kafka_settings)
                kafka = launcher.start()
                log(f"Kafka ready in {kafka.start_seconds:.1f}s")
            report["pipeline"] = run_pipeline(args, examples, bootstrap, tmp, children)
        finally:
            for child in reversed(children):
                child.stop(grace_s=15)
            if launcher is not None:
                try:
                    launcher.stop()
                except Exception as exc:  # report it, and still remove the temp dir
                    log(f"could not stop Kafka: {exc}")
            if args.keep_temp:
                log(f"kept logs and state in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["machine"]["total_seconds"] = round(time.monotonic() - started, 1)
    return report


PARTS = ("overhead", "quality", "pipeline")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under about 3 minutes")
    parser.add_argument(
        "--trace-minutes",
        type=float,
        default=None,
        help="minutes of the trace replayed (full 20, quick 5)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        help="time compression of the arrivals (full 8, quick 10)",
    )
    parser.add_argument("--max-calls", type=int, default=None, help="stop after N calls")
    parser.add_argument(
        "--repeat-share",
        type=float,
        default=0.2,
        help="share of calls that repeat an earlier call exactly",
    )
    parser.add_argument(
        "--quality-target",
        type=float,
        default=None,
        help="routing.quality_target (default: the shipped default)",
    )
    parser.add_argument("--latency-scale", type=float, default=0.1, help="simulator delays")
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--splits", type=int, default=None, help="router quality splits (10; 3)")
    parser.add_argument("--overhead-requests", type=int, default=None, help="(2000; 500)")
    parser.add_argument("--parts", default=",".join(PARTS), help="overhead,quality,pipeline")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="RouteLLM responses CSV")
    parser.add_argument(
        "--kafka-bootstrap", default=None, help="use this broker instead of starting one"
    )
    parser.add_argument("--warehouse-timeout", type=float, default=180.0)
    parser.add_argument("--keep-temp", action="store_true")
    parser.add_argument("--json-out", default=None)  # fmt: skip
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "trace_minutes": 5.0 if quick else 20.0,
        "speed": 10.0 if quick else 8.0,
        "splits": 3 if quick else 10,
        "overhead_requests": 500 if quick else 2000,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = args.parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; from {list(PARTS)}")
    if not 0 <= args.repeat_share < 1:
        parser.error("--repeat-share must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    report["plan"]["parts"] = sorted(args.parts)
    print(markdown(report))
    document = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    print(document)
    if args.json_out:
        Path(args.json_out).write_text(document + "\n")
        log(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
