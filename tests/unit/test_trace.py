"""Trace files, the seeded attribution draw, and placing a trace in time (no services)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from devtools.trace import (
    AZURE_TRACE,
    FEATURES,
    TIER_MODELS,
    Attribution,
    PlacedTrace,
    TraceCall,
    TraceFormatError,
    detect_format,
    read_azure_csv,
    read_trace,
    read_usage_jsonl,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def write_jsonl(path: Path, *records: Any) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# -- Azure CSV -------------------------------------------------------------------------------
def test_the_bundled_azure_trace_reads_whole_with_seven_digit_fractions() -> None:
    calls = list(read_azure_csv(AZURE_TRACE))
    assert len(calls) == 19_366
    # '2023-11-16 18:15:46.6805900,374,44': the 7th fractional digit is below a microsecond.
    assert calls[0] == TraceCall(
        ts=datetime(2023, 11, 16, 18, 15, 46, 680590, tzinfo=UTC),
        prompt_tokens=374,
        completion_tokens=44,
    )
    assert calls[1].ts == datetime(2023, 11, 16, 18, 15, 50, 995169, tzinfo=UTC)
    assert calls[-1].ts == datetime(2023, 11, 16, 19, 14, 8, 402527, tzinfo=UTC)
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(calls))
    assert detect_format(AZURE_TRACE) == "azure-csv"


def test_azure_rows_without_a_fraction_and_with_fewer_digits(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46,10,1\n"
        "2023-11-16 18:15:46.5,20,2\n"
    )
    calls = list(read_trace(path))
    assert [c.ts.microsecond for c in calls] == [0, 500_000]
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls] == [(10, 1), (20, 2)]


def test_azure_2024_rows_with_a_utc_offset(tmp_path: Path) -> None:
    """The 2024 week-long Azure traces stamp their times with an offset (``+00:00``)."""
    path = tmp_path / "AzureLLMInferenceTrace_code_1week.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,2162,5\n"
        "2024-05-10 00:00:01+00:00,100,7\n"
        "2024-05-10 02:00:02.5+02:00,300,9\n"
    )
    calls = list(read_trace(path))
    assert [c.ts for c in calls] == [
        datetime(2024, 5, 10, 0, 0, 0, 9930, tzinfo=UTC),
        datetime(2024, 5, 10, 0, 0, 1, tzinfo=UTC),
        datetime(2024, 5, 10, 0, 0, 2, 500_000, tzinfo=UTC),
    ]
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls] == [
        (2162, 5),
        (100, 7),
        (300, 9),
    ]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("2023-11-16 18:15:47.1,abc,3", "ContextTokens"),
        ("2023-11-16 18:15:47.1,12,-3", "GeneratedTokens"),
        ("2023-11-16 18:15:47.1,12", "GeneratedTokens"),
        ("yesterday,12,3", "TIMESTAMP"),
        ("2023-11-16 18:15:47.1x,12,3", "TIMESTAMP"),
    ],
)
def test_a_bad_azure_row_names_the_line_and_the_column(
    tmp_path: Path, row: str, field: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,1,1\n{row}\n")
    with pytest.raises(TraceFormatError) as error:
        list(read_trace(path))
    assert str(error.value).startswith(f"{path}, line 3: {field} must be")


def test_a_csv_without_the_azure_columns_is_an_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("time,tokens\n2023-11-16,3\n")
    with pytest.raises(
        TraceFormatError, match=r"unknown trace format.*TIMESTAMP,ContextTokens.*BurstGPT"
    ):
        list(read_trace(path))
    (tmp_path / "empty.csv").write_text("\n\n")
    with pytest.raises(TraceFormatError, match="empty"):
        list(read_trace(tmp_path / "empty.csv"))
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(TraceFormatError, match="UTF-8"):
        list(read_trace(tmp_path / "binary.bin"))


# -- BurstGPT CSV ----------------------------------------------------------------------------
BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45.5,GPT-4,1087,341,1428,API log\n"
    "118,ChatGPT,417,0,417,Conversation log\n"
)


def test_a_burstgpt_trace_reads_with_its_models_and_failed_calls(tmp_path: Path) -> None:
    """BurstGPT (Azure OpenAI GPT usage, Wang et al. 2024): seconds from the trace's start, the
    model (ChatGPT or GPT-4), token counts; a call with no response tokens failed (not billed).
    Its models are priced as gpt-3.5-turbo and gpt-4; the log type is kept as metadata."""
    path = tmp_path / "BurstGPT_1.csv"
    path.write_text(BURSTGPT)
    assert detect_format(path) == "burstgpt-csv"
    calls = list(read_trace(path))
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls] == [
        (472, 18),
        (1087, 341),
        (0, 0),  # failed: not billed
    ]
    assert [c.model for c in calls] == ["gpt-3.5-turbo", "gpt-4", "gpt-3.5-turbo"]
    assert [c.status for c in calls] == ["ok", "ok", "error"]
    assert calls[1].ts - calls[0].ts == timedelta(seconds=40.5)
    assert calls[2].ts - calls[0].ts == timedelta(seconds=113)
    assert calls[1].metadata == {"log_type": "API log"}
    assert calls[2].metadata == {"log_type": "Conversation log", "request_tokens": "417"}
    assert all(c.user_id is None and c.feature is None for c in calls)  # drawn later


def test_a_bad_burstgpt_row_names_the_line_and_the_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(BURSTGPT + "130,ChatGPT,many,3,3,Conversation log\n")
    with pytest.raises(TraceFormatError, match=r"line 5: Request tokens must be a token count"):
        list(read_trace(path))
    path.write_text(BURSTGPT + "soon,ChatGPT,1,3,4,Conversation log\n")
    with pytest.raises(TraceFormatError, match=r"line 5: Timestamp must be seconds"):
        list(read_trace(path))
    path.write_text(BURSTGPT + "131,Claude,1,3,4,Conversation log\n")
    with pytest.raises(TraceFormatError, match=r"line 5: Model must be one of ChatGPT, GPT-4"):
        list(read_trace(path))


# -- Mooncake JSON Lines ---------------------------------------------------------------------
def test_a_mooncake_trace_reads_its_relative_times_and_lengths(tmp_path: Path) -> None:
    """Mooncake's traces (Kimi, 2024): one JSON object a line with ``timestamp`` (milliseconds
    from the trace's start), ``input_length``, ``output_length`` and prefix ``hash_ids``; no
    model, users or features (drawn later)."""
    path = write_jsonl(
        tmp_path / "mooncake_trace.jsonl",
        {"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 7319, "output_length": 490, "hash_ids": [0, 3]},
    )
    assert detect_format(path) == "mooncake-jsonl"
    calls = list(read_trace(path))
    assert [(c.prompt_tokens, c.completion_tokens) for c in calls] == [(6755, 500), (7319, 490)]
    assert calls[1].ts - calls[0].ts == timedelta(milliseconds=1500)
    assert all(c.model is None and c.user_id is None for c in calls)
    write_jsonl(path, {"timestamp": 0, "input_length": 1, "output_length": 2}, {"timestamp": -4})
    with pytest.raises(TraceFormatError, match=r"line 2: field 'timestamp' must be"):
        list(read_trace(path))


# -- JSON Lines ------------------------------------------------------------------------------
def test_jsonl_reads_every_usage_field_and_the_api_aliases(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "usage.jsonl",
        {
            "ts": "2025-03-01T12:00:00.250Z",
            "user_id": "alice",
            "session_id": "s1",
            "feature": "search",
            "model": "gpt-4o",
            "prompt_tokens": 800,
            "completion_tokens": 90,
            "cached_tokens": 500,
            "team": "growth",
            "provider": "openai",
            "model_requested": "gpt-4.1",
            "request_id": "req-1",
            "status": "timeout",
            "latency_ms": 1234,
            "cache_hit": True,
            "metadata": {"env": "prod"},
            "something_else": "ignored, as /v1/usage ignores it",
        },
        "",  # blank lines are skipped
        # aliases: input/output_tokens, OpenAI's `user`, metadata.feature; epoch milliseconds
        {
            "ts": 1740830400000,
            "user": "bob",
            "input_tokens": 12,
            "output_tokens": 3,
            "metadata": {"feature": "chat"},
        },
        {"ts": "2025-03-01T12:00:01", "prompt_tokens": 5, "completion_tokens": 0},  # naive = UTC
    )
    assert detect_format(path) == "jsonl"
    full, aliased, bare = read_trace(path)
    assert full == TraceCall(
        ts=datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC),
        prompt_tokens=800,
        completion_tokens=90,
        cached_tokens=500,
        user_id="alice",
        session_id="s1",
        feature="search",
        model="gpt-4o",
        team="growth",
        provider="openai",
        model_requested="gpt-4.1",
        request_id="req-1",
        status="timeout",
        latency_ms=1234,
        cache_hit=True,
        metadata={"env": "prod"},
    )
    assert (aliased.ts, aliased.user_id, aliased.feature) == (
        datetime(2025, 3, 1, 12, 0, tzinfo=UTC),
        "bob",
        "chat",
    )
    assert (aliased.prompt_tokens, aliased.completion_tokens) == (12, 3)
    assert bare.ts == datetime(2025, 3, 1, 12, 0, 1, tzinfo=UTC)
    assert (bare.user_id, bare.model, bare.status) == (None, None, "ok")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"ts": 1, "prompt_tokens": 3', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt_tokens": 3, "completion_tokens": 1}', "field 'ts' is required"),
        ('{"ts": "soon", "prompt_tokens": 3, "completion_tokens": 1}', "field 'ts' must be ISO"),
        ('{"ts": true, "prompt_tokens": 3, "completion_tokens": 1}', "field 'ts' must be ISO"),
        ('{"ts": 1, "completion_tokens": 1}', "field 'prompt_tokens' is required"),
        ('{"ts": 1, "prompt_tokens": "3", "completion_tokens": 1}', "field 'prompt_tokens' must"),
        ('{"ts": 1, "input_tokens": -1, "completion_tokens": 1}', "field 'input_tokens' must"),
        ('{"ts": 1, "prompt_tokens": 3}', "field 'completion_tokens' is required"),
        ('{"ts": 1, "prompt_tokens": 3, "output_tokens": 1.5}', "field 'output_tokens' must"),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 4}',
            "field 'cached_tokens' (4) cannot exceed prompt_tokens (3)",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "status": "fine"}',
            "field 'status' must be one of ok, error",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "user_id": 42}',
            "field 'user_id' must be a string",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "metadata": {"a": 1}}',
            "field 'metadata' must be an object of string values",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "cache_hit": "yes"}',
            "field 'cache_hit' must be true or false",
        ),
        # session 17's probe (F2): what `/v1/usage` refuses, replay took
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "user_id": "*"}',
            "field 'user_id' may not be '*'",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "feature": "*"}',
            "field 'feature' may not be '*': it names the default budget policy of every "
            "feature (feature:*)",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "team": "*"}',
            "field 'team' may not be '*': it names the default budget policy of every team "
            "(team:*)",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "user": "a", "user_id": "b"}',
            "field 'user' 'user_id' ('b') and 'user' ('a') name different owners",
        ),
        (
            '{"ts": 1, "prompt_tokens": 3, "completion_tokens": 1, "feature": "a", '
            '"metadata": {"feature": "b"}}',
            "field 'feature' 'metadata.feature' ('b') and 'feature' ('a') name different",
        ),
        (
            '{"ts": 1, "model": "auto", "prompt_tokens": 3, "completion_tokens": 1}',
            "field 'model' 'auto' is the router's name",
        ),
    ],
)
def test_a_bad_jsonl_record_names_the_file_line_and_field(
    tmp_path: Path, line: str, message: str
) -> None:
    good = {"ts": 1, "prompt_tokens": 1, "completion_tokens": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", good, "", line)
    with pytest.raises(TraceFormatError) as error:
        list(read_usage_jsonl(path))
    assert str(error.value).startswith(f"{path}, line 3: {message}")


# -- attribution -----------------------------------------------------------------------------
def bare_calls(n: int) -> list[TraceCall]:
    return [TraceCall(T0 + timedelta(seconds=i), 100, 10) for i in range(n)]


def test_the_same_seed_draws_the_same_users_sessions_features_and_models() -> None:
    calls = bare_calls(2000)
    first, again = list(Attribution(seed=3)(calls)), list(Attribution(seed=3)(calls))
    assert first == again
    other = list(Attribution(seed=4)(calls))
    assert [c.user_id for c in other] != [c.user_id for c in first]
    assert all(c.user_id and c.session_id and c.feature and c.model for c in first)


def test_the_draw_has_heavy_users_known_features_and_tier_models() -> None:
    calls = list(Attribution(seed=1, users=50)(bare_calls(20_000)))
    users = Counter(c.user_id for c in calls)
    assert set(users) <= {f"user-{i:04d}" for i in range(1, 51)}
    assert users.most_common(1)[0][0] == "user-0001"  # Zipf: rank 1 is the heaviest
    assert users["user-0001"] > 10 * users["user-0050"]
    features = Counter(c.feature for c in calls)
    for name, share in FEATURES:
        assert features[name] / len(calls) == pytest.approx(share, abs=0.02)
    assert {c.model for c in calls} == set(TIER_MODELS.values())
    sessions = Counter(c.session_id for c in calls)
    assert max(sessions.values()) <= 8  # calls_per_session


@pytest.mark.parametrize("share", [0.7, 0.3, 0.95])
def test_the_economy_share_is_close_to_its_target(share: float) -> None:
    calls = list(Attribution(seed=11, economy_share=share)(bare_calls(20_000)))
    models = Counter(c.model for c in calls)
    assert models[TIER_MODELS["economy"]] / len(calls) == pytest.approx(share, abs=0.015)
    assert models[TIER_MODELS["premium"]] / len(calls) == pytest.approx(0.05, abs=0.01)


def test_attribution_present_in_the_trace_is_kept() -> None:
    call = TraceCall(T0, 1, 1, user_id="alice", session_id="s", feature="ops", model="gpt-4.1")
    assert Attribution(seed=1).assign(call) == call
    partial = Attribution(seed=1).assign(TraceCall(T0, 1, 1, user_id="alice"))
    assert partial.user_id == "alice"
    assert partial.feature in dict(FEATURES)
    with pytest.raises(ValueError, match="economy_share"):
        Attribution(economy_share=1.5)


# -- placement in time -----------------------------------------------------------------------
def trace_with_gaps(*seconds: float) -> list[TraceCall]:
    origin = datetime(2023, 11, 16, 18, 15, tzinfo=UTC)
    return [
        TraceCall(origin + timedelta(seconds=s), i + 1, 1, session_id=f"s{i}", request_id=f"r{i}")
        for i, s in enumerate(seconds)
    ]


def test_a_trace_placed_to_end_now_keeps_its_gaps() -> None:
    calls = trace_with_gaps(0, 4.3, 4.5, 60.25)
    end = datetime(2026, 1, 10, 9, 30, tzinfo=UTC)
    placed = list(PlacedTrace.ending_at(calls, end))
    assert placed[-1].ts == end
    assert [(c.ts - placed[0].ts).total_seconds() for c in placed] == [0, 4.3, 4.5, 60.25]
    assert [c.prompt_tokens for c in placed] == [1, 2, 3, 4]


def test_speed_compresses_the_gaps_and_start_places_the_first_call() -> None:
    placed = PlacedTrace(trace_with_gaps(0, 10, 30), start=T0, speed=10)
    assert [c.ts for c in placed] == [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=3)]
    assert (placed.start, placed.end) == (T0, T0 + timedelta(seconds=3))


def test_repeats_play_back_to_back_one_average_gap_apart_with_fresh_ids() -> None:
    placed = PlacedTrace(trace_with_gaps(0, 10, 30), start=T0, repeat=3)
    calls = list(placed)
    assert len(calls) == len(placed) == 9
    offsets = [(c.ts - T0).total_seconds() for c in calls]
    assert offsets == [0, 10, 30, 45, 55, 75, 90, 100, 120]  # period = 30 s span + 15 s gap
    assert placed.end == calls[-1].ts
    assert [c.session_id for c in calls[::3]] == ["s0", "s0-r1", "s0-r2"]
    assert len({c.request_id for c in calls}) == 9
    ending = PlacedTrace.ending_at(trace_with_gaps(0, 10, 30), T0, speed=2, repeat=3)
    assert [c.ts for c in ending][-1] == T0
    assert ending.start == T0 - timedelta(seconds=60)


def test_an_unsorted_trace_is_played_in_time_order_and_one_call_still_repeats() -> None:
    calls = trace_with_gaps(5, 0, 2)
    assert [c.prompt_tokens for c in PlacedTrace(calls, start=T0)] == [2, 3, 1]
    single = list(PlacedTrace(trace_with_gaps(0), start=T0, repeat=3))
    assert [c.ts for c in single] == [T0 + timedelta(seconds=s) for s in (0, 1, 2)]
    with pytest.raises(ValueError, match="no calls"):
        PlacedTrace([], start=T0)


def test_replayed_records_sharing_a_request_id_count_once_as_over_http() -> None:
    """Found by a newcomer probe: `tollgate replay` gave each record a random event id, so
    two records under one request_id were both counted (warehouse and budgets), where
    POST /v1/usage derives the event id from the request id and counts it once."""
    from app.metering.usage import reported_event_id
    from app.pricing.catalog import PriceCatalog
    from devtools.replay import usage_record

    prices = PriceCatalog("gpt-4")
    ts = datetime(2026, 12, 1, tzinfo=UTC)
    call = TraceCall(ts, 10, 5, user_id="u", model="gpt-4o", request_id="rdup-r1")
    first, again = usage_record(prices, call), usage_record(prices, call)
    assert first["event_id"] == again["event_id"] == reported_event_id("u", "rdup-r1")
    # another user's call under the same request id is another call (a fault probe)
    other = TraceCall(ts, 10, 5, user_id="v", model="gpt-4o", request_id="rdup-r1")
    assert usage_record(prices, other)["event_id"] != first["event_id"]
    anonymous = TraceCall(ts, 10, 5, user_id="u", model="gpt-4o")
    assert (
        usage_record(prices, anonymous)["event_id"] != usage_record(prices, anonymous)["event_id"]
    )


def test_two_different_records_under_one_request_id_are_refused(tmp_path: Path) -> None:
    """Session 17's third probe: replay produced both, the consumers kept the first (same
    event id) and the printed totals were 5x what was counted. /v1/usage answers a 409; a
    replay names both lines. The same record twice is one call (counted once), allowed."""
    first = {"ts": 1, "prompt_tokens": 1000, "completion_tokens": 1, "request_id": "same-1"}
    other = {**first, "prompt_tokens": 5000}
    same = write_jsonl(tmp_path / "same.jsonl", first, first)
    assert len(list(read_usage_jsonl(same))) == 2
    path = write_jsonl(tmp_path / "dup.jsonl", first, {**first, "request_id": "x"}, other)
    with pytest.raises(TraceFormatError) as error:
        list(read_usage_jsonl(path))
    assert str(error.value).startswith(f"{path}, line 3: field 'request_id' ")
    assert "line 1" in str(error.value)


def test_a_trace_line_reads_model_and_user_as_v1_usage_does() -> None:
    """A reviewer: /v1/usage trims a model (" gpt-4o" is gpt-4o) and reads OpenAI's
    safety_identifier as the user; a trace line kept " gpt-4o" (unpriced) and gave the call
    a random user, so the same record replayed and posted were two calls."""
    from devtools.trace import _usage_call

    line = {"ts": "2026-12-01T00:00:00Z", "prompt_tokens": 1, "completion_tokens": 1}
    assert _usage_call({**line, "model": " gpt-4o "}, "line 1").model == "gpt-4o"
    assert _usage_call({**line, "model": "   "}, "line 1").model is None  # absent, as ""
    assert _usage_call({**line, "safety_identifier": "h1"}, "line 1").user_id == "h1"
    assert _usage_call(line, "line 1").user_id is None
