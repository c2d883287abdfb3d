"""bench.savings' core path at a tiny scale: trace calls through a real dispatcher with
``model: "auto"`` and the cache on, outcomes posted, figures read back from the sink's
reports server. It checks that the benchmark's numbers add up (every usage event and
outcome in the warehouse, tiers and cache hits as the clients saw them), not any timing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.gateway import Child
from bench.router_quality import DEFAULT_DATA, load
from bench.savings import build_calls, run_pipeline

pytestmark = pytest.mark.integration


def test_tiny_replay_is_counted_by_the_warehouse(kafka_bootstrap: str, tmp_path: Path) -> None:
    examples = load(DEFAULT_DATA)
    args = argparse.Namespace(
        trace_minutes=1.0, speed=5.0, repeat_share=0.3, seed=3, max_calls=40,
        quality_target=None, latency_scale=0.0, max_in_flight=16, warehouse_timeout=60.0,
    )  # fmt: skip
    calls = build_calls(
        examples, trace_minutes=1.0, speed=5.0, repeat_share=0.3, seed=3, max_calls=40
    )
    repeats = [c for c in calls if c.repeat_of is not None]
    assert repeats and all(calls[c.repeat_of].body == c.body for c in repeats)

    children: list[Child] = []
    try:
        result = run_pipeline(args, examples, kafka_bootstrap, tmp_path, children)
    finally:
        for child in reversed(children):
            child.stop(grace_s=15)

    assert result["calls"] == 40 and result["answered"] == 40, result["errors"]
    assert result["warehouse_complete"]["complete"], result["warehouse_complete"]
    reports, client = result["reports"], result["client"]
    usage_events = result["warehouse_complete"]["usage_events_on_topic"]
    # One usage event per answered call, plus one per escalation.
    assert usage_events == 40 + client["escalated"]
    assert sum(row["requests"] for row in reports["by_tier"]) == usage_events
    hits = client["cache"].get("hit", 0)
    assert reports["savings"]["cache"]["hits"] == hits
    assert reports["summary"]["cache_hits"] == hits
    assert 0 < hits <= len(repeats)
    assert sum(client["tiers"].values()) == 40
    assert reports["summary"]["requests"] == usage_events
    assert result["warehouse_complete"]["outcomes_reported"] == 40
