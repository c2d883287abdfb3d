"""`tollgate replay` with real parts: a trace file → Kafka → the ClickHouse sink → the warehouse."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from agents.sink import ClickHouseSink
from app.events.topics import ensure_topics
from app.metering.usage import event_time
from app.settings import Settings
from app.warehouse.clickhouse import migrate
from devtools.replay import replay_calls, replay_command
from devtools.trace import AZURE_TRACE, TIER_MODELS, Attribution, PlacedTrace, read_trace
from tests.integration.harness import free_port, private_day

pytestmark = pytest.mark.integration

NANOS = Decimal(10**9)


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "TOLLGATE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
        "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLGATE_STATE_DIR": str(settings.state_dir),
        "TOLLGATE_LOG_FORMAT": "text",
        "TOLLGATE_ANOMALY_METRICS_PORT": "0",  # not a `make up` running on this machine
    }


def replay(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(replay_command, args, env=env)


@dataclass(frozen=True)
class Totals:
    calls: int
    cost: Decimal
    baseline: Decimal


def printed_totals(stdout: str) -> Totals:
    """The totals the command prints for the user to check the dashboard against."""
    calls = re.search(r"^(?:replayed|would replay)\s+([\d,]+) calls", stdout, re.M)
    cost = re.search(r"^cost\s+\$([\d,.]+)$", stdout, re.M)
    baseline = re.search(r"^baseline\s+\$([\d,.]+)$", stdout, re.M)
    assert calls and cost and baseline, stdout
    return Totals(
        int(calls[1].replace(",", "")),
        Decimal(cost[1].replace(",", "")),
        Decimal(baseline[1].replace(",", "")),
    )


async def warehouse_rows(
    settings: Settings, clickhouse: Any, replay_name: str, expected: int, day: datetime
) -> dict[str, Any]:
    """Run the real sink until the replay's rows arrive; their count, sums and time range."""
    sql = """
        SELECT count(), uniqExact(event_id), sum(cost_usd), sum(baseline_cost_usd),
               min(ts), max(ts), uniqExact(user_id), groupUniqArray(model_served),
               groupUniqArray(source)
        FROM usage_events
        WHERE metadata['replay'] = %(name)s AND ts >= %(lo)s AND ts < %(hi)s
    """
    params = {"name": replay_name, "lo": day, "hi": day + timedelta(days=1)}
    columns = ("count", "unique", "cost", "baseline", "first", "last", "users", "models", "sources")

    async def query() -> dict[str, Any]:
        result = await asyncio.to_thread(clickhouse.query, sql, parameters=params)
        return dict(zip(columns, result.result_rows[0], strict=True))

    sink = ClickHouseSink(settings, clickhouse, batch_wait_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        deadline = time.monotonic() + 90
        while (await query())["count"] < expected:
            assert time.monotonic() < deadline, f"fewer than {expected} rows after 90 s"
            assert not task.done(), task
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # anything extra (a duplicate) would land now
    finally:
        stop.set()
        await task
    return await query()


def test_the_azure_trace_replays_into_the_warehouse_with_the_printed_totals(
    kafka_settings: Settings, clickhouse: Any, tmp_path: Path
) -> None:
    migrate(clickhouse)
    lines = AZURE_TRACE.read_text().splitlines()[:501]  # header + the first 500 calls
    trace = tmp_path / f"azure-{uuid.uuid4().hex[:8]}.csv"
    trace.write_text("\n".join(lines) + "\n")
    day = private_day()
    start = day + timedelta(hours=random.randrange(20), seconds=random.randrange(3600))
    args = [str(trace), "--start", start.isoformat(), "--seed", "11", "--users", "40"]

    dry = replay([*args, "--dry-run"], cli_env(kafka_settings))
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing was produced" in dry.stdout
    result = replay(args, cli_env(kafka_settings))
    assert result.exit_code == 0, result.output
    printed = printed_totals(result.stdout)
    assert printed == printed_totals(dry.stdout), "a dry run predicts the replay's totals"
    assert printed.calls == 500 and printed.cost > 0
    assert re.search(r"events/s", result.stdout)
    assert "replaying 500 calls" in result.stderr  # progress goes to stderr, totals to stdout

    rows = asyncio.run(warehouse_rows(kafka_settings, clickhouse, trace.name, 500, day))
    assert (rows["count"], rows["unique"]) == (500, 500)
    assert rows["cost"] == printed.cost, "warehouse spend equals the printed total to the nano"
    assert rows["baseline"] == printed.baseline
    # The trace's own gaps, moved to --start (event times are whole milliseconds).
    calls = list(read_trace(trace))
    assert rows["first"].replace(tzinfo=UTC) == event_time(start)
    assert rows["last"].replace(tzinfo=UTC) == event_time(start + (calls[-1].ts - calls[0].ts))
    assert 1 < rows["users"] <= 40
    assert set(rows["models"]) <= set(TIER_MODELS.values())
    assert rows["sources"] == ["external"]


async def test_a_jsonl_trace_keeps_its_attribution_and_draws_the_rest(
    kafka_settings: Settings, clickhouse: Any, tmp_path: Path
) -> None:
    migrate(clickhouse)
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    records: list[dict[str, Any]] = []
    for i in range(40):
        record: dict[str, Any] = {"ts": 1_700_000_000_000 + i * 1500, "input_tokens": 300 + i}
        record["output_tokens"] = 20 + i
        if i % 2 == 0:  # attributed by the trace itself
            record |= {
                "user_id": alice,
                "session_id": "s-1",
                "model": "gpt-4o",
                "cached_tokens": 100,
                "provider": "azure",
                "status": "error" if i == 0 else "ok",
                "metadata": {"feature": "search", "env": "test"},
            }
        records.append(record)
    trace = tmp_path / f"usage-{uuid.uuid4().hex[:8]}.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    day = private_day()
    calls = list(Attribution(seed=5)(read_trace(trace)))
    progressed: list[int] = []
    stats = await replay_calls(
        kafka_settings,
        PlacedTrace(calls, start=day + timedelta(hours=3)),
        progress=progressed.append,
        metadata={"replay": trace.name},
    )
    assert stats.calls == sum(progressed) == 40
    rows = await warehouse_rows(kafka_settings, clickhouse, trace.name, 40, day)
    assert rows["count"] == 40
    assert rows["cost"] == Decimal(stats.cost_usd_nanos) / NANOS
    assert rows["baseline"] == Decimal(stats.baseline_cost_usd_nanos) / NANOS

    result = await asyncio.to_thread(
        clickhouse.query,
        "SELECT feature, model_served, cached_tokens, provider, session_id, metadata['env'], "
        "countIf(status = 'error'), count() FROM usage_events "
        "WHERE user_id = %(u)s GROUP BY ALL",
        parameters={"u": alice},
    )
    assert result.result_rows == [("search", "gpt-4o", 100, "azure", "s-1", "test", 1, 20)]


def test_a_burstgpt_trace_replays_with_its_models_and_unbilled_failures(
    kafka_settings: Settings, clickhouse: Any, tmp_path: Path
) -> None:
    """BurstGPT's format through the real pipeline: its models priced, a failed row stored as
    an error that cost nothing, the printed totals equal to the warehouse's."""
    migrate(clickhouse)
    rng = random.Random(3)
    rows_text = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    for i in range(60):
        model = "GPT-4" if i % 5 == 0 else "ChatGPT"
        request, response = rng.randrange(50, 3000), (0 if i % 20 == 7 else rng.randrange(1, 900))
        rows_text.append(f"{i * 2.5},{model},{request},{response},{request + response},API log")
    trace = tmp_path / f"burstgpt-{uuid.uuid4().hex[:8]}.csv"
    trace.write_text("\n".join(rows_text) + "\n")
    day = private_day()
    args = [str(trace), "--start", (day + timedelta(hours=5)).isoformat(), "--seed", "2"]
    result = replay(args, cli_env(kafka_settings))
    assert result.exit_code == 0, result.output
    printed = printed_totals(result.stdout)
    assert printed.calls == 60 and printed.cost > 0
    # Session 17's probe: the same replay run again (a re-run, a run resumed after Ctrl-C)
    # drew new event ids, and every report counted the trace twice. It is the same events.
    again = replay(args, cli_env(kafka_settings))
    assert again.exit_code == 0, again.output

    rows = asyncio.run(warehouse_rows(kafka_settings, clickhouse, trace.name, 60, day))
    assert rows["count"] == 60 and rows["unique"] == 60 and rows["cost"] == printed.cost
    assert set(rows["models"]) == {"gpt-3.5-turbo", "gpt-4"}
    failed = clickhouse.query(
        "SELECT count(), sum(cost_usd), sum(prompt_tokens) FROM usage_events "
        "WHERE metadata['replay'] = %(name)s AND status = 'error'",
        parameters={"name": trace.name},
    ).result_rows
    assert failed == [(3, 0, 0)]


async def test_realtime_pace_produces_each_call_when_its_time_comes(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    await ensure_topics(kafka_settings)  # so the replay's own set-up is quick
    trace = tmp_path / "paced.jsonl"
    trace.write_text(
        "\n".join(
            json.dumps(
                {"ts": f"2025-05-05T10:00:0{s}Z", "prompt_tokens": 9, "completion_tokens": 1}
            )
            for s in (0, 1, 2)
        )
    )
    placed = PlacedTrace(
        list(Attribution(seed=2)(read_trace(trace))),
        start=datetime.now(UTC) + timedelta(seconds=1.5),  # ahead of the clock: realtime waits
        speed=2,  # gaps of 0.5 s
    )
    acked: list[datetime] = []
    stats = await replay_calls(
        kafka_settings,
        placed,
        pace="realtime",
        progress=lambda n: acked.extend([datetime.now(UTC)] * n),
    )
    assert stats.calls == len(acked) == 3
    for call, ack in zip(placed, acked, strict=True):
        late = (ack - call.ts).total_seconds()
        assert 0 <= late < 0.45, f"acknowledged {late:.3f} s after its event time"


# -- user errors: a message and a non-zero exit, never a traceback -----------------------------
@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    return {
        "TOLLGATE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nothing listens there
        "TOLLGATE_STATE_DIR": str(tmp_path / "state"),
        "TOLLGATE_LOG_FORMAT": "text",
        "TOLLGATE_ANOMALY_METRICS_PORT": "0",  # not a `make up` running on this machine
    }


def assert_user_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_bad_trace_files_are_rejected_with_the_line_and_field(
    tmp_path: Path, offline_env: dict[str, str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"ts": "2025-01-01T00:00:00Z", "prompt_tokens": 1, "completion_tokens": 1}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt_tokens": "many"}) + "\n")
    assert_user_error(replay([str(bad)], offline_env), "bad.jsonl, line 2", "'prompt_tokens'")

    broken = tmp_path / "broken.csv"
    broken.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,12,x\n")
    assert_user_error(replay([str(broken)], offline_env), "line 2", "GeneratedTokens")

    unknown = tmp_path / "notes.txt"
    unknown.write_text("hello\n")
    assert_user_error(replay([str(unknown)], offline_env), "unknown trace format")

    missing = tmp_path / "missing.csv"
    assert_user_error(replay([str(missing)], offline_env), "cannot read", "missing.csv")

    assert_user_error(
        replay([str(AZURE_TRACE), "--start", "next tuesday"], offline_env), "--start", "ISO 8601"
    )
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    assert_user_error(replay([str(AZURE_TRACE), "--start", future], offline_env), "future")


def test_kafka_unreachable_says_where_and_how_to_start_it(
    tmp_path: Path, offline_env: dict[str, str]
) -> None:
    trace = tmp_path / "small.csv"
    trace.write_text("\n".join(itertools.islice(AZURE_TRACE.open(), 21)))
    bootstrap = offline_env["TOLLGATE_KAFKA_BOOTSTRAP"]
    assert_user_error(replay([str(trace), "-q"], offline_env), bootstrap, "tollgate kafka start")
    # A dry run never contacts Kafka.
    dry = replay([str(trace), "--dry-run", "-q"], offline_env)
    assert dry.exit_code == 0, dry.output
    assert printed_totals(dry.stdout).calls == 20
    assert dry.stderr == ""  # --quiet: no progress bar
