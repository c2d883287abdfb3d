"""The notifier without Kafka: payloads per format, filters, target parsing, redaction, retries.

Delivery tests post to in-process aiohttp servers on loopback (or a closed port).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from agents.notifier import (
    Notifier,
    NotifierMetrics,
    OffsetsInFlight,
    RetryPolicy,
    TargetWorker,
    alertmanager_payload,
    build_payload,
    json_payload,
    pagerduty_dedup_key,
    pagerduty_payload,
    pagerduty_severity,
    run_notifier,
    slack_payload,
)
from app.alerts_config import AlertTarget, AlertTargetError, parse_alert_targets, redact_url
from app.events.codec import EventCodec
from app.logs import JsonFormatter, TextFormatter
from app.settings import Settings

FIRST_SEEN = datetime(2026, 11, 27, 11, 55, 0, 250000, tzinfo=UTC)
TS = datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=UTC)
SLACK_TOKEN = "xoxTOKENs3cr3tPathPart"
ROUTING_KEY = "R0UTINGk3ySECRETvalue0123456789a"
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.02)


def alert(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e-1",
        "ts": TS,
        "schema_version": 1,
        "alert_key": "cost_per_request|feature:search",
        "kind": "cost_per_request",
        "scope": "feature:search",
        "severity": "critical",
        "status": "firing",
        "score": 7.5,
        "expected": 0.012,
        "observed": 0.094,
        "unit": "usd",
        "window_seconds": 300,
        "first_seen": FIRST_SEEN,
        "last_seen": TS,
        "message": "feature:search costs $0.094 per request, 7.8x its usual $0.012",
        "details": {"model": "gpt-4"},
    }
    record.update(overrides)
    return record


def resolved(**overrides: Any) -> dict[str, Any]:
    return alert(**{"status": "resolved", "ts": TS + timedelta(minutes=10), **overrides})


def target(**fields: Any) -> AlertTarget:
    fields.setdefault("name", "t")
    fields.setdefault("url", "https://hooks.example.com/services/T0/B0/" + SLACK_TOKEN)
    return AlertTarget(**fields)


# -- payloads -----------------------------------------------------------------------------


def test_json_payload_is_the_alert_with_iso_timestamps() -> None:
    body = json_payload(alert())
    assert body["ts"] == "2026-11-27T12:00:00.123Z"
    assert body["first_seen"] == "2026-11-27T11:55:00.250Z"
    assert body["alert_key"] == "cost_per_request|feature:search"
    assert body["details"] == {"model": "gpt-4"}
    assert orjson.loads(orjson.dumps(body)) == body  # plain JSON, nothing custom left


def test_json_payload_keeps_resolved_status() -> None:
    assert json_payload(resolved())["status"] == "resolved"


def test_slack_firing_line_names_severity_kind_scope_values_and_message() -> None:
    text = slack_payload(alert())["text"]
    assert text.startswith(":rotating_light: *CRITICAL* cost_per_request on `feature:search`")
    assert "expected $0.012, observed $0.094" in text
    assert "7.8x its usual" in text
    assert "resolved" not in text.lower()


def test_slack_resolved_line_says_resolved() -> None:
    text = slack_payload(resolved())["text"]
    assert text.startswith(":white_check_mark: *Resolved* (was critical) cost_per_request")


def test_slack_escapes_its_control_characters_and_formats_units() -> None:
    text = slack_payload(
        alert(scope="team:<r&d>", message="a <b> & c", unit="share", expected=0.2, observed=0.65)
    )["text"]
    assert "`team:&lt;r&amp;d&gt;`" in text
    assert "a &lt;b&gt; &amp; c" in text
    assert "expected 20.0%, observed 65.0%" in text


def test_slack_line_without_expected_or_observed() -> None:
    text = slack_payload(alert(expected=None, observed=None, severity="info"))["text"]
    assert text.startswith(":information_source: *INFO* cost_per_request on `feature:search` — ")
    assert "expected" not in text


def test_pagerduty_trigger_event() -> None:
    body = pagerduty_payload(alert(), ROUTING_KEY)
    assert body["routing_key"] == ROUTING_KEY
    assert body["event_action"] == "trigger"
    assert body["dedup_key"] == "cost_per_request|feature:search"
    payload = body["payload"]
    assert payload["severity"] == "critical"
    assert payload["source"] == "feature:search"
    assert payload["component"] == "feature"
    assert payload["group"] == "tollgate"
    assert payload["class"] == "cost_per_request"
    assert payload["timestamp"] == "2026-11-27T12:00:00.123Z"
    assert payload["summary"].startswith("[CRITICAL] cost_per_request on feature:search")
    details = payload["custom_details"]
    assert details["expected"] == 0.012
    assert details["observed"] == 0.094
    assert details["details.model"] == "gpt-4"
    assert details["first_seen"] == "2026-11-27T11:55:00.250Z"


def test_pagerduty_resolve_event_has_the_same_dedup_key() -> None:
    trigger = pagerduty_payload(alert(), ROUTING_KEY)
    resolve = pagerduty_payload(resolved(), ROUTING_KEY)
    assert resolve == {
        "routing_key": ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": trigger["dedup_key"],
    }


def test_an_anomaly_incidents_receivers_know_each_lifecycle_of_a_key_apart() -> None:
    """An anomaly incident's records (they carry ``incident_key``) are known to PagerDuty and
    Alertmanager by their alert key and the time their lifecycle first fired: a recurrence of
    the key is another alert there, so the earlier page's late resolve cannot close it. Its
    firing, its update and its resolve share one; a budget threshold keeps its bare key."""
    page = {"incident_key": "cost_per_request|feature:search@2026-11-27T11:55:00"}
    trigger = pagerduty_payload(alert(**page), ROUTING_KEY)
    assert trigger["dedup_key"] == "cost_per_request|feature:search@2026-11-27T11:55:00.250Z"
    update = pagerduty_payload(alert(**page, ts=TS + timedelta(minutes=2)), ROUTING_KEY)
    resolve = pagerduty_payload(resolved(**page), ROUTING_KEY)
    assert update["dedup_key"] == resolve["dedup_key"] == trigger["dedup_key"]
    again = pagerduty_payload(alert(**page, first_seen=TS + timedelta(minutes=30)), ROUTING_KEY)
    assert again["dedup_key"] != trigger["dedup_key"]
    [firing] = alertmanager_payload(alert(**page))
    [ended] = alertmanager_payload(resolved(**page))
    [recurs] = alertmanager_payload(alert(**page, first_seen=TS + timedelta(minutes=30)))
    assert firing["labels"]["first_seen"] == "2026-11-27T11:55:00.250Z"
    assert ended["labels"] == firing["labels"] != recurs["labels"]
    budget = alert(kind="budget_threshold", alert_key="budget_threshold|user:u|2026-11|0.8")
    assert pagerduty_payload(budget, ROUTING_KEY)["dedup_key"] == budget["alert_key"]
    assert "first_seen" not in alertmanager_payload(budget)[0]["labels"]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("info", "info"), ("warning", "warning"), ("critical", "critical"), ("bogus", "warning")],
)
def test_pagerduty_severity_mapping(ours: str, theirs: str) -> None:
    assert pagerduty_severity(ours) == theirs
    assert pagerduty_payload(alert(severity=ours), ROUTING_KEY)["payload"]["severity"] == theirs


def test_pagerduty_limits_dedup_key_and_summary_lengths_stably() -> None:
    long_key = "budget_threshold|user:" + "x" * 400
    key = pagerduty_dedup_key(long_key)
    assert len(key) <= 255
    assert key == pagerduty_dedup_key(long_key), "trigger and resolve must agree"
    assert key != pagerduty_dedup_key(long_key + "y")
    body = pagerduty_payload(alert(message="m" * 5000), ROUTING_KEY)
    assert len(body["payload"]["summary"]) == 1024


def test_alertmanager_firing_alert() -> None:
    [entry] = alertmanager_payload(alert(kind="budget_threshold"), "https://tollgate.example/ui")
    assert entry["labels"] == {
        "alertname": "TollgateBudgetThreshold",
        "kind": "budget_threshold",
        "scope": "feature:search",
        "severity": "critical",
        "alert_key": "cost_per_request|feature:search",
    }
    assert entry["annotations"]["summary"] == (
        "budget_threshold on feature:search: expected $0.012, observed $0.094"
    )
    assert entry["annotations"]["description"].startswith("feature:search costs $0.094")
    assert entry["startsAt"] == "2026-11-27T11:55:00.250Z"
    assert "endsAt" not in entry
    assert entry["generatorURL"] == "https://tollgate.example/ui"


def test_alertmanager_resolved_alert_ends_and_keeps_its_labels() -> None:
    [firing] = alertmanager_payload(alert())
    [ended] = alertmanager_payload(resolved())
    assert ended["labels"] == firing["labels"], "same labels = the same Alertmanager alert"
    assert ended["endsAt"] == "2026-11-27T12:10:00.123Z"
    assert "generatorURL" not in ended
    [odd] = alertmanager_payload(resolved(ts=FIRST_SEEN - timedelta(hours=1)))
    assert odd["endsAt"] == odd["startsAt"], "never ends before it starts"


def test_build_payload_follows_the_target_format() -> None:
    record = alert()
    assert build_payload(target(format="json"), record) == json_payload(record)
    assert build_payload(target(format="slack"), record) == slack_payload(record)
    pd = target(format="pagerduty", routing_key=ROUTING_KEY)
    assert build_payload(pd, record) == pagerduty_payload(record, ROUTING_KEY)
    am = target(format="alertmanager", generator_url="http://x")
    assert build_payload(am, record) == alertmanager_payload(record, "http://x")


# -- filters and parsing ----------------------------------------------------------------


def test_min_severity_and_kind_filters() -> None:
    warning_up = target(min_severity="warning")
    assert warning_up.accepts(alert(severity="critical"))
    assert warning_up.accepts(alert(severity="warning"))
    assert not warning_up.accepts(alert(severity="info"))
    budgets = target(kinds=["budget_threshold"])
    assert budgets.accepts(alert(kind="budget_threshold"))
    assert not budgets.accepts(alert(kind="volume_spike"))
    both = target(kinds=["volume_spike"], min_severity="critical")
    assert not both.accepts(alert(kind="volume_spike", severity="warning"))
    assert target().accepts(alert(severity="info", kind="anything"))


def test_parse_targets_from_yaml_data_and_from_a_json_env_value() -> None:
    data = [
        {"name": "slack", "url": "https://hooks.slack.com/services/T/B/X", "format": "slack"},
        {
            "name": "pd",
            "url": "https://events.pagerduty.com/v2/enqueue",
            "format": "pagerduty",
            "routing_key": ROUTING_KEY,
            "min_severity": "critical",
            "kinds": ["budget_threshold", "cost_per_request"],
            "timeout_s": 3,
        },
    ]
    parsed = parse_alert_targets(data)
    assert parsed == parse_alert_targets(orjson.dumps(data).decode())
    assert [t.name for t in parsed] == ["slack", "pd"]
    assert parsed[0].format == "slack"
    assert parsed[1].kinds == ("budget_threshold", "cost_per_request")
    assert parsed[1].timeout_s == 3
    assert parse_alert_targets(None) == [] and parse_alert_targets("") == []


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        ({"name": "pd", "format": "pagerduty"}, "alert_targets[0.routing_key]"),
        ({"name": "s", "routing_key": ROUTING_KEY}, "only used by format 'pagerduty'"),
        ({"name": "s", "url": "ftp://hooks.example.com/" + SLACK_TOKEN}, "alert_targets[0.url]"),
        ({"name": "s", "min_severity": "loud"}, "alert_targets[0.min_severity]"),
        ({"name": "s", "rooting_key": SLACK_TOKEN}, "alert_targets[0.rooting_key]"),
    ],
)
def test_parse_errors_name_the_field_and_never_echo_secrets(
    entry: dict[str, Any], names: str
) -> None:
    entry.setdefault("url", "https://hooks.example.com/services/" + SLACK_TOKEN)
    with pytest.raises(AlertTargetError) as raised:
        parse_alert_targets([entry])
    message = str(raised.value)
    assert names in message
    assert SLACK_TOKEN not in message and ROUTING_KEY not in message


def test_parse_rejects_duplicate_names_and_bad_json() -> None:
    twice = [{"name": "a", "url": "https://a.example/x"}, {"name": "a", "url": "https://b/x"}]
    with pytest.raises(AlertTargetError, match="'a' is used twice"):
        parse_alert_targets(twice)
    with pytest.raises(AlertTargetError, match="not valid JSON"):
        parse_alert_targets('[{"name": "a", "url": "https://x/' + SLACK_TOKEN + '"')


def test_secrets_are_masked_in_repr() -> None:
    pd = target(format="pagerduty", routing_key=ROUTING_KEY)
    assert SLACK_TOKEN not in repr(pd) and ROUTING_KEY not in repr(pd)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.slack.com/services/T0/B0/" + SLACK_TOKEN, "https://hooks.slack.com/…"),
        ("http://user:pw@10.0.0.1:9093/api/v2/alerts?token=abc", "http://10.0.0.1:9093/…"),
        ("https://events.pagerduty.com", "https://events.pagerduty.com/"),
        ("https://[::1]:8080/hook", "https://[::1]:8080/…"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# -- delivery ---------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start an in-process HTTP server with one catch-all POST handler; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(registry: CollectorRegistry, name: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "tollgate_alert_notifications_total", {"target": name, "outcome": outcome}
    )
    return value or 0.0


async def deliver_once(worker: TargetWorker, record: dict[str, Any]) -> bool:
    async with aiohttp.ClientSession() as session:
        return await worker.deliver(session, record)


async def test_failing_delivery_never_logs_the_url_path_or_routing_key(
    serve: Callable[[Handler], Awaitable[str]], caplog: pytest.LogCaptureFixture
) -> None:
    async def echo_secrets(request: web.Request) -> web.Response:
        # A hostile or careless target that echoes what it got, in a retryable error.
        return web.Response(status=503, text=f"bad {request.path_qs} {await request.text()}")

    base = await serve(echo_secrets)
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    echoing = TargetWorker(
        target(
            name="pd",
            url=f"{base}/v2/enqueue/{SLACK_TOKEN}?sig=QuerySecretValue",
            format="pagerduty",
            routing_key=ROUTING_KEY,
        ),
        metrics,
        FAST_RETRY,
    )
    unreachable = TargetWorker(
        target(name="down", url=f"http://127.0.0.1:{closed_port()}/hook/{SLACK_TOKEN}"),
        metrics,
        FAST_RETRY,
    )
    with caplog.at_level(logging.DEBUG, logger="agents.notifier"):
        assert not await deliver_once(echoing, alert())
        assert not await deliver_once(unreachable, alert())

    lines = [JsonFormatter().format(r) for r in caplog.records]
    lines += [TextFormatter().format(r) for r in caplog.records]
    assert len(caplog.records) == 6, "two retries and a give-up for each target"
    assert any("http://127.0.0.1" in line and "/…" in line for line in lines)
    for line in lines:
        for secret in (SLACK_TOKEN, ROUTING_KEY, "QuerySecretValue", "/v2/enqueue", "/hook/"):
            assert secret not in line
    assert sample(registry, "pd", "retried") == 2 and sample(registry, "pd", "failed") == 1
    assert sample(registry, "down", "retried") == 2 and sample(registry, "down", "failed") == 1


async def test_retries_429_and_5xx_but_not_other_4xx(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    answers = {"flaky": [500, 429, 202], "rejects": [400, 200]}
    attempts: dict[str, int] = {"flaky": 0, "rejects": 0}

    async def handler(request: web.Request) -> web.Response:
        name = request.match_info["tail"]
        attempts[name] += 1
        return web.Response(status=answers[name].pop(0))

    base = await serve(handler)
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    flaky = TargetWorker(target(name="flaky", url=f"{base}/flaky"), metrics, FAST_RETRY)
    rejects = TargetWorker(target(name="rejects", url=f"{base}/rejects"), metrics, FAST_RETRY)

    assert await deliver_once(flaky, alert())
    assert not await deliver_once(rejects, alert())
    assert attempts == {"flaky": 3, "rejects": 1}
    assert sample(registry, "flaky", "delivered") == 1 and sample(registry, "flaky", "retried") == 2
    assert (
        sample(registry, "rejects", "failed") == 1 and sample(registry, "rejects", "retried") == 0
    )
    latency = registry.get_sample_value(
        "tollgate_alert_notification_duration_seconds_count",
        {"target": "flaky", "outcome": "delivered"},
    )
    assert latency == 1


async def test_slow_target_times_out_and_is_retried(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    calls = 0

    async def slow_then_fast(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)
        return web.Response(status=200)

    base = await serve(slow_then_fast)
    registry = CollectorRegistry()
    worker = TargetWorker(
        target(name="slow", url=f"{base}/x", timeout_s=0.1), NotifierMetrics(registry), FAST_RETRY
    )
    assert await deliver_once(worker, alert())
    assert calls == 2 and sample(registry, "slow", "retried") == 1


async def test_full_queue_drops_the_oldest_alert_and_counts_it() -> None:
    registry = CollectorRegistry()
    worker = TargetWorker(target(name="q", queue_size=2), NotifierMetrics(registry), FAST_RETRY)
    offsets = OffsetsInFlight()
    tp = TopicPartition("alerts", 0)
    for i in range(3):
        worker.offer(alert(event_id=f"e-{i}"), offsets.ticket(tp, i, 1))
        offsets.handled_through(tp, i)
    kept = [worker.queue.get_nowait()[0]["event_id"] for _ in range(worker.queue.qsize())]
    assert kept == ["e-1", "e-2"]
    assert sample(registry, "q", "dropped") == 1
    # The dropped alert is done with (counted, logged): it no longer holds the commit back.
    assert offsets.to_commit({tp}) == {tp: 1}


def test_the_offset_committed_never_passes_an_alert_a_target_still_holds() -> None:
    offsets = OffsetsInFlight()
    tp, other = TopicPartition("alerts", 0), TopicPartition("alerts", 1)
    tickets = {}
    for offset in range(5):
        offsets.handled_through(tp, offset)
        if offset in (1, 3):  # paged to two targets; the others page nobody
            tickets[offset] = offsets.ticket(tp, offset, 2)
    assert offsets.to_commit({tp}) == {tp: 1}
    tickets[1].done()
    assert offsets.to_commit({tp}) == {tp: 1}, "one of its two targets still holds it"
    tickets[1].done()
    assert offsets.to_commit({tp}) == {tp: 3}
    tickets[3].done()
    tickets[3].done()
    assert offsets.to_commit({tp}) == {tp: 5}
    assert offsets.to_commit({other}) == {}, "a partition no longer assigned is not committed"
    offsets.committed.update({tp: 5})
    assert offsets.to_commit({tp}) == {}, "nothing moved since"


def test_backoff_grows_is_capped_jittered_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0, jitter=0.5)
    rng = random.Random(7)
    waits = [policy.delay(attempt, rng) for attempt in range(1, 7)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert len({round(w, 6) for w in waits[3:]}) == 3, "jitter spreads the capped waits"
    assert policy.delay(1, rng, retry_after_s=5) == 5
    assert policy.delay(1, rng, retry_after_s=60) == 8


async def test_run_notifier_without_targets_says_what_to_configure() -> None:
    with pytest.raises(AlertTargetError, match="no alert targets configured"):
        await run_notifier(Settings(), [])


# -- issue 12: what pages, and the money at stake ----------------------------------------------


def test_every_format_states_the_money_at_stake_when_the_alert_carries_it() -> None:
    fired = alert(impact_usd_per_hour=12.4)
    assert "+$12.40/hour" in slack_payload(fired)["text"]
    assert "+$12.40/hour" in pagerduty_payload(fired, ROUTING_KEY)["payload"]["summary"]
    details = pagerduty_payload(fired, ROUTING_KEY)["payload"]["custom_details"]
    assert details["impact_usd_per_hour"] == 12.4
    assert "+$12.40/hour" in alertmanager_payload(fired)[0]["annotations"]["summary"]
    assert "/hour" not in slack_payload(alert())["text"]  # an alert without one says nothing
    assert "/hour" not in slack_payload(resolved(impact_usd_per_hour=3.0))["text"]


def test_historical_and_related_alerts_are_declined_unless_the_target_asks() -> None:
    plain, everything = target(), target(include_historical=True, include_related=True)
    old = alert(historical=True)
    attached = alert(incident_role="related", incident_key="k")
    assert plain.declines(old) == "historical" and everything.declines(old) is None
    assert plain.declines(attached) == "related" and everything.declines(attached) is None
    assert plain.declines(alert()) is None
    assert plain.declines(alert(incident_role="primary", historical=False)) is None


def test_an_alert_that_rose_to_critical_ends_both_of_its_alertmanager_alerts() -> None:
    """Alertmanager knows an alert by its labels: the firing said severity=warning, the
    update critical, and a resolve labelled critical ended only the second (a review)."""
    ended = alertmanager_payload(
        resolved(severity="critical", details={"severity_fired": "warning"})
    )
    assert sorted(e["labels"]["severity"] for e in ended) == ["critical", "warning"]
    assert all("endsAt" in e for e in ended)
    assert len(alertmanager_payload(resolved(severity="critical"))) == 1
    assert len(alertmanager_payload(alert(details={"severity_fired": "warning"}))) == 1


def test_the_resolve_of_an_incidents_earlier_page_goes_where_that_page_went() -> None:
    earlier = alert(status="resolved", incident_role="related", details={"resolves_page": "true"})
    assert target().declines(earlier) is None
    assert target().declines(alert(status="resolved", incident_role="related")) == "related"


def test_a_related_alert_pages_a_target_none_of_its_incidents_records_reached() -> None:
    """``details.incident_severity_before``: how severe the incident's firing records were
    before this one. A target whose severity filter let none through is paged by it."""
    pager, chat = target(min_severity="critical"), target()
    joined = alert(incident_role="related", details={"incident_severity_before": "warning"})
    assert pager.declines(joined) is None and chat.declines(joined) == "related"
    heard = alert(incident_role="related", details={"incident_severity_before": "critical"})
    assert pager.declines(heard) == "related"
    first = alert(incident_role="related", details={"incident_severity_before": "none"})
    assert pager.declines(first) is None
    assert target(min_severity="warning").declines(joined) == "related"
    assert pager.declines(alert(incident_role="related")) == "related"  # before it: as before
    assert not pager.accepts(alert(severity="warning", incident_role="related",
                                   details={"incident_severity_before": "none"}))  # fmt: skip


def test_the_resolve_of_an_alert_a_target_was_never_paged_is_not_sent_there() -> None:
    """A loop fired as a warning, and rose to critical after another member had paged the
    critical-only pager: neither its firing nor its update reached the pager, and its
    resolve (critical) did. ``details.severity_published``: its firing's severity;
    ``details.raised_heard_before``: what the incident had published before its update."""
    pager, chat = target(name="pager", min_severity="critical"), target(name="chat")
    after_a_critical = {"severity_published": "warning", "raised_heard_before": "x=critical"}
    stray = resolved(incident_role="primary", details=after_a_critical)
    assert pager.accepts(stray) and pager.declines(stray) == "unpaged"
    assert chat.declines(stray) is None  # its warning firing reached it
    assert target(min_severity="critical", include_related=True).declines(stray) is None
    heard_first = {"severity_published": "warning", "raised_heard_before": "x=warning"}
    assert pager.declines(resolved(incident_role="primary", details=heard_first)) is None
    the_page = {"severity_published": "warning", "raised_heard_before": ""}  # update paged
    assert pager.declines(resolved(incident_role="primary", details=the_page)) is None
    fired_critical = {"severity_published": "critical", "raised_heard_before": "x=critical"}
    assert pager.declines(resolved(incident_role="primary", details=fired_critical)) is None
    assert pager.declines(resolved(incident_role="primary")) is None  # an older agent's
    assert pager.declines(alert(details=after_a_critical)) is None  # a firing: as before
    notifier = Notifier(
        Settings(), [pager, chat], registry=(registry := CollectorRegistry()), codec=EventCodec()
    )
    assert notifier.dispatch(stray) == 1
    assert [w.queue.qsize() for w in notifier.workers] == [0, 1]
    skipped = {"target": "pager", "outcome": "skipped_unpaged"}
    assert registry.get_sample_value("tollgate_alert_notifications_total", skipped) == 1


async def test_an_alert_read_again_is_not_delivered_again_by_the_same_notifier(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """The fault table's "notifier SIGSTOP 25 s": 20 alerts delivered twice. Frozen past its
    session, the notifier delivered the alerts it fetched on waking, could not commit them
    (its group had moved on), was handed its partitions back at the committed offset and
    delivered them again. The same process remembers what each target was sent."""
    posted: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        posted.append((await request.json())["event_id"])
        return web.Response(status=200)

    base = await serve(receive)
    registry = CollectorRegistry()
    worker = TargetWorker(
        target(name="once", url=f"{base}/x"), NotifierMetrics(registry), FAST_RETRY
    )
    offsets = OffsetsInFlight()
    tp = TopicPartition("alerts", 0)
    read = [alert(event_id=f"e-{i}") for i in range(3)]
    for offset, record in enumerate(read + read):  # read, then read again from the commit
        worker.offer(record, offsets.ticket(tp, offset, 1))
        offsets.handled_through(tp, offset)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(worker.run(session))
        await asyncio.wait_for(worker.queue.join(), 10)
        task.cancel()
    assert posted == ["e-0", "e-1", "e-2"]
    assert sample(registry, "once", "skipped_duplicate") == 3
    assert offsets.to_commit({tp}) == {tp: 6}  # the repeats are done with too
