"""Each upstream attempt of a request is settled on its own by the spend worker: the Request
event of an escalated attempt opens its own entry, its usage (or the estimate made when its
dispatcher died) closes that entry only, under the event id the real usage has."""

from __future__ import annotations

from datetime import UTC, datetime

from agents.spend import estimated_usage, open_request_entry
from app.budgets.counter import SpendCounter, UsageEvent
from app.metering.attribution import Identity
from app.metering.usage import attempt_key, build_usage_record, usage_event_id
from app.pricing.catalog import PriceCatalog
from app.settings import Settings

TS = datetime(2025, 3, 1, 12, tzinfo=UTC)
PRICES = PriceCatalog()


def request(attempt: int, model: str) -> dict:
    return {
        "request_id": "r1",
        "ts": TS,
        "status": "accepted",
        "endpoint": "chat.completions",
        "user_id": "u1",
        "model_requested": "auto",
        "model_served": model,
        "prompt_tokens_estimated": 40,
        "expected_output_tokens": 200,
        "attempt": attempt,
    }


def test_an_escalated_attempt_is_estimated_under_its_own_event_id() -> None:
    entry = open_request_entry(request(2, "gpt-4o"), 0, Settings())
    assert entry is not None and entry["attempt"] == 2
    estimate = estimated_usage(PRICES, entry["request_id"], entry)
    assert estimate["event_id"] == usage_event_id("r1", 2) != usage_event_id("r1", 1)
    assert estimate["attempt"] == 2 and estimate["model_served"] == "gpt-4o"
    assert estimate["cost_usd_nanos"] > 0


def test_a_request_event_without_attempt_is_the_first() -> None:
    old = request(1, "gpt-4o-mini")
    del old["attempt"]
    entry = open_request_entry(old, 0, Settings())
    assert entry is not None and entry["attempt"] == 1
    assert estimated_usage(PRICES, "r1", entry)["event_id"] == usage_event_id("r1", 1)


def test_usage_settles_only_its_own_attempt() -> None:
    def usage(attempt: int, model: str) -> dict:
        return build_usage_record(
            PRICES, Identity("u1"), request_id="r1", model=model, prompt_tokens=40,
            completion_tokens=10, ts=TS, event_id=usage_event_id("r1", attempt),
            attempt=attempt, source="dispatcher",
        )  # fmt: skip

    counter = SpendCounter({})
    batch = counter.stage(
        [UsageEvent(0, 0, usage(1, "gpt-4o-mini")), UsageEvent(0, 1, usage(2, "gpt-4o"))]
    )
    assert batch.settled_requests == [(attempt_key("r1", 1), 0), (attempt_key("r1", 2), 0)]
    assert attempt_key("r1", 1) == "r1"  # entries written before attempts keep their key
    assert attempt_key("r1", 2) != "r1"
