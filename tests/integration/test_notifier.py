"""The notifier with real parts: alerts on the real Kafka topic, real HTTP receivers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from agents.notifier import Notifier, RetryPolicy, iso, json_payload
from app.alerts_config import AlertTarget
from app.events import clients
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.settings import Settings
from tests.samples import example_event

pytestmark = pytest.mark.integration

SECRET = "T0KEN" + uuid.uuid4().hex
ROUTING_KEY = "rk" + uuid.uuid4().hex
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2)


def now_ms() -> datetime:
    """Now, at the millisecond precision the Alert schema keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def alert(
    kind: str = "cost_per_request",
    scope: str = "feature:search",
    severity: str = "critical",
    status: str = "firing",
    first_seen: datetime | None = None,
    historical: bool = False,
    incident_role: str = "primary",
) -> dict[str, Any]:
    ts = now_ms()
    return {
        "event_id": uuid.uuid4().hex,
        "ts": ts,
        "schema_version": 1,
        "alert_key": f"{kind}|{scope}",
        "kind": kind,
        "scope": scope,
        "severity": severity,
        "status": status,
        "score": 6.5,
        "expected": 0.012,
        "observed": 0.094,
        "unit": "usd",
        "window_seconds": 300,
        "first_seen": first_seen or ts - timedelta(minutes=5),
        "last_seen": ts,
        "message": f"{scope} costs $0.094 per request, 7.8x its usual $0.012",
        "details": {"model": "gpt-4"},
        "historical": historical,
        "impact_usd_per_hour": 4.25,
        "incident_key": f"{kind}|{scope}|{ts.isoformat()}",
        "incident_role": incident_role,
    }


def resolve(fired: dict[str, Any]) -> dict[str, Any]:
    later = now_ms() + timedelta(seconds=1)
    return {
        **fired,
        "event_id": uuid.uuid4().hex,
        "status": "resolved",
        "ts": later,
        "last_seen": later,
    }


async def produce(
    settings: Settings,
    records: list[dict[str, Any]],
    extra: list[bytes] = (),
    partition: int | None = None,
) -> None:
    codec = EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for blob in extra:
            await producer.send(settings.topic("alerts"), blob, key=b"garbage")
        for record in records:
            await producer.send(
                settings.topic("alerts"),
                codec.encode("Alert", record),
                key=record["alert_key"].encode(),
                partition=partition,
            )
        await producer.flush()
    finally:
        await producer.stop()


@dataclass
class Received:
    path: str
    content_type: str
    body: Any
    at: float
    idempotency_key: str | None = None


@dataclass
class Receiver:
    """A webhook receiver on a free port: records every request, answers from a script."""

    answers: list[int] = field(default_factory=list)  # then `default` for every later request
    default: int = 200
    hang: bool = False  # never answer (until the test ends)
    requests: list[Received] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(
                request.path_qs,
                request.content_type,
                await request.json(),
                time.monotonic(),
                request.headers.get("Idempotency-Key"),
            )
        )
        if self.hang:
            await self.released.wait()
        status = self.answers.pop(0) if self.answers else self.default
        return web.json_response({"status": "ok" if status < 400 else "error"}, status=status)

    async def start(self, path: str) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}{path}"
        return self

    async def stop(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]


@asynccontextmanager
async def receivers(*specs: tuple[str, Receiver]) -> AsyncIterator[list[Receiver]]:
    started = [await receiver.start(path) for path, receiver in specs]
    try:
        yield started
    finally:
        for receiver in started:
            await receiver.stop()


@asynccontextmanager
async def running(notifier: Notifier) -> AsyncIterator[asyncio.Event]:
    """Run ``notifier`` until the block ends; yields its stop event once it is consuming."""
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(stop))
    ready = asyncio.create_task(notifier.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    assert notifier.ready.is_set(), "the notifier did not join its consumer group within 30 s"
    try:
        yield stop
    finally:
        stop.set()
        ready.cancel()
        await asyncio.wait_for(task, 15)


async def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.05)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def count(registry: CollectorRegistry, target: str, outcome: str) -> float:
    value = registry.get_sample_value(
        "tollgate_alert_notifications_total", {"target": target, "outcome": outcome}
    )
    return value or 0.0


async def test_every_format_gets_its_payload_filters_apply_and_resolves_follow(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    specs = [
        (f"/hooks/{SECRET}", Receiver()),
        (f"/services/T0/B0/{SECRET}", Receiver()),
        ("/v2/enqueue", Receiver(default=202)),
        ("/api/v2/alerts", Receiver()),
    ]
    async with receivers(*specs) as (plain, slack, pagerduty, alertmanager):
        targets = [
            AlertTarget(name="json", url=plain.url, min_severity="warning"),
            AlertTarget(name="slack", url=slack.url, format="slack", kinds=["cost_per_request"]),
            AlertTarget(name="pd", url=pagerduty.url, format="pagerduty", routing_key=ROUTING_KEY),
            AlertTarget(
                name="am",
                url=alertmanager.url,
                format="alertmanager",
                generator_url="http://tollgate.example/alerts",
            ),
        ]
        registry = CollectorRegistry()
        notifier = Notifier(
            kafka_settings, targets, registry=registry, retry=FAST_RETRY, start_from="earliest"
        )
        quiet = alert(kind="volume_drop", scope="global", severity="info")
        fired = alert()
        resolved = resolve(fired)
        not_an_alert = EventCodec().encode("Usage", example_event("Usage"))
        await produce(
            kafka_settings, [quiet, fired, resolved], extra=[b"\x00garbage", not_an_alert]
        )

        async with running(notifier):
            await wait_until(
                lambda: (
                    [len(r.requests) for r in (plain, slack, pagerduty, alertmanager)]
                    == [2, 2, 3, 3]
                )
            )
            await asyncio.sleep(0.5)  # anything extra would arrive now

        assert registry.get_sample_value("tollgate_alert_notifier_undecodable_total") == 2
        for receiver in (plain, slack, pagerduty, alertmanager):
            assert {r.content_type for r in receiver.requests} == {"application/json"}

        # json: the alert itself, ISO timestamps; the info alert is below its min_severity.
        assert plain.bodies() == [json_payload(fired), json_payload(resolved)]
        assert plain.bodies()[0]["ts"].endswith("Z")

        # slack: only its kind; a readable line, the resolve says so.
        firing_text, resolved_text = (body["text"] for body in slack.bodies())
        assert "*CRITICAL* cost_per_request on `feature:search`" in firing_text
        assert "expected $0.012, observed $0.094" in firing_text
        assert "Resolved" in resolved_text and "feature:search" in resolved_text

        # pagerduty: trigger per alert (same partition order for one alert_key), then resolve.
        # An anomaly incident's dedup_key: its alert key at the time its lifecycle first fired.
        cost_key = f"cost_per_request|feature:search@{iso(fired['first_seen'])}"
        drop_key = f"volume_drop|global@{iso(quiet['first_seen'])}"
        events = {(b["dedup_key"], b["event_action"]): b for b in pagerduty.bodies()}
        assert set(events) == {
            (drop_key, "trigger"),
            (cost_key, "trigger"),
            (cost_key, "resolve"),
        }
        actions = [b["event_action"] for b in pagerduty.bodies() if b["dedup_key"] == cost_key]
        assert actions == ["trigger", "resolve"]
        trigger = events[(cost_key, "trigger")]
        assert trigger["routing_key"] == ROUTING_KEY
        assert trigger["payload"]["severity"] == "critical"
        assert trigger["payload"]["source"] == "feature:search"
        assert trigger["payload"]["class"] == "cost_per_request"
        assert trigger["payload"]["custom_details"]["event_id"] == fired["event_id"]
        assert events[(drop_key, "trigger")]["payload"]["severity"] == "info"
        assert events[(cost_key, "resolve")]["routing_key"] == ROUTING_KEY

        # alertmanager: a list of one alert each; the resolve ends the alert with the same labels.
        assert all(len(body) == 1 for body in alertmanager.bodies())
        firing_am = next(
            b[0] for b in alertmanager.bodies() if b[0]["labels"]["kind"] == "cost_per_request"
        )
        ended = next(b[0] for b in alertmanager.bodies() if "endsAt" in b[0])
        assert (
            firing_am["labels"]
            == ended["labels"]
            == {
                "alertname": "TollgateCostPerRequest",
                "kind": "cost_per_request",
                "scope": "feature:search",
                "severity": "critical",
                "alert_key": "cost_per_request|feature:search",
                "first_seen": iso(fired["first_seen"]),
            }
        )
        assert ended["endsAt"] == json_payload(resolved)["ts"]
        assert "endsAt" not in firing_am
        assert firing_am["generatorURL"] == "http://tollgate.example/alerts"
        assert count(registry, "pd", "delivered") == 3 and count(registry, "json", "delivered") == 2

        # Offsets were committed: a restarted notifier (same group) sends only what is new.
        later = alert(kind="volume_spike", scope="team:search", severity="warning")
        restarted = Notifier(
            kafka_settings,
            targets,
            registry=CollectorRegistry(),
            retry=FAST_RETRY,
            start_from="earliest",  # so only the committed offsets keep the old alerts away
        )
        async with running(restarted):
            await produce(kafka_settings, [later])
            await wait_until(lambda: len(plain.requests) == 3)
            await asyncio.sleep(0.5)
        assert plain.bodies()[2] == json_payload(later)
        assert len(pagerduty.requests) == 4


async def test_a_target_answering_500_twice_then_200_gets_the_alert(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    async with receivers(
        ("/flaky", Receiver(answers=[500, 500])), ("/rejects", Receiver(default=400))
    ) as (flaky, rejects):
        registry = CollectorRegistry()
        notifier = Notifier(
            kafka_settings,
            [
                AlertTarget(name="flaky", url=flaky.url),
                AlertTarget(name="rejects", url=rejects.url),
            ],
            registry=registry,
            retry=FAST_RETRY,
            start_from="earliest",
        )
        fired = alert()
        await produce(kafka_settings, [fired])
        async with running(notifier):
            await wait_until(lambda: count(registry, "flaky", "delivered") == 1)
            await wait_until(lambda: count(registry, "rejects", "failed") == 1)
        assert flaky.bodies() == [json_payload(fired)] * 3, "the same alert, three attempts"
        assert count(registry, "flaky", "retried") == 2
        assert len(rejects.requests) == 1, "a 400 is final: no retry"
        assert count(registry, "rejects", "retried") == 0


async def test_a_dead_and_a_hanging_target_do_not_delay_the_others(
    kafka_settings: Settings,
) -> None:
    await ensure_topics(kafka_settings)
    async with receivers(("/hang", Receiver(hang=True)), ("/ok", Receiver())) as (hanging, healthy):
        registry = CollectorRegistry()
        slow_retry = RetryPolicy(max_attempts=6, base_delay_s=1.0, max_delay_s=4.0)
        notifier = Notifier(
            kafka_settings,
            [
                AlertTarget(name="dead", url=f"http://127.0.0.1:{closed_port()}/{SECRET}"),
                AlertTarget(name="hanging", url=hanging.url, timeout_s=0.3),
                AlertTarget(name="healthy", url=healthy.url),
            ],
            registry=registry,
            retry=slow_retry,
            drain_timeout_s=0.5,
        )
        fired = [alert(scope=f"user:u{i}") for i in range(5)]
        async with running(notifier) as stop:
            produced_at = time.monotonic()
            await produce(kafka_settings, fired)
            await wait_until(lambda: len(healthy.requests) == 5, timeout_s=10)
            slowest = max(r.at for r in healthy.requests) - produced_at
            assert slowest < 3.0, f"healthy target waited {slowest:.1f}s behind broken ones"
            await wait_until(lambda: count(registry, "dead", "retried") >= 1, timeout_s=5)
            assert len(hanging.requests) >= 1
            stopping = time.monotonic()
            stop.set()
        assert time.monotonic() - stopping < 5.0, "a graceful stop is bounded by drain_timeout_s"
        assert sorted(b["event_id"] for b in healthy.bodies()) == sorted(
            r["event_id"] for r in fired
        )
        assert count(registry, "dead", "delivered") == 0
        assert count(registry, "hanging", "delivered") == 0
        assert count(registry, "healthy", "delivered") == 5


async def test_historical_and_related_alerts_are_not_paged_unless_a_target_asks(
    kafka_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12: alerts about the past are published, marked historical; paging them is the
    notifier's decision, per target, and it says what it decided. Alerts attached to an
    incident ride along with its page instead of paging on their own."""
    await ensure_topics(kafka_settings)
    async with receivers(("/oncall", Receiver()), ("/audit", Receiver())) as (oncall, audit):
        registry = CollectorRegistry()
        notifier = Notifier(
            kafka_settings,
            [
                AlertTarget(name="oncall", url=oncall.url),
                AlertTarget(
                    name="audit", url=audit.url, include_historical=True, include_related=True
                ),
            ],
            registry=registry,
            retry=FAST_RETRY,
            start_from="earliest",
        )
        old = alert(scope="user:replayed", historical=True)
        live = alert(scope="feature:search")
        attached = alert(kind="volume_spike", scope="global", incident_role="related")
        caplog.set_level("INFO", logger="agents.notifier")
        await produce(kafka_settings, [old, live, attached])
        async with running(notifier):
            await wait_until(lambda: len(audit.requests) == 3 and len(oncall.requests) >= 1)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    assert [b["event_id"] for b in oncall.bodies()] == [live["event_id"]]
    assert sorted(b["event_id"] for b in audit.bodies()) == sorted(
        a["event_id"] for a in (old, live, attached)
    )
    assert count(registry, "oncall", "skipped_historical") == 1
    assert count(registry, "oncall", "skipped_related") == 1
    decisions = [r.getMessage() for r in caplog.records if "not paged" in r.getMessage()]
    assert any("historical" in line for line in decisions), decisions
    assert any("related" in line for line in decisions), decisions


async def test_a_target_paging_only_critical_alerts_is_paged_by_an_incidents_first_critical(
    kafka_settings: Settings,
) -> None:
    """Issue 12: a feature's warning page, then a user's loop that joins it at 40x (critical,
    ``related``) and its resolve: the pager (``min_severity=critical``) never got the warning,
    so the loop is its page, and the loop's end follows; the chat channel, which got the
    page, is not paged again by the related alert."""
    await ensure_topics(kafka_settings)
    async with receivers(("/pager", Receiver()), ("/chat", Receiver())) as (pager, chat):
        notifier = Notifier(
            kafka_settings,
            [
                AlertTarget(name="pager", url=pager.url, min_severity="critical"),
                AlertTarget(name="chat", url=chat.url),
            ],
            registry=CollectorRegistry(),
            retry=FAST_RETRY,
            start_from="earliest",
        )
        page = alert(kind="volume_spike", scope="feature:search", severity="warning")
        page["details"] = {"incident_severity_before": "none"}
        loop = alert(kind="volume_spike", scope="user:u1", incident_role="related")
        loop["incident_key"] = page["incident_key"]
        loop["details"] = {"incident_severity_before": "warning"}
        end = {**loop, "event_id": uuid.uuid4().hex, "status": "resolved"}
        later = {**loop, "event_id": uuid.uuid4().hex, "scope": "user:u2"}
        later["details"] = {"incident_severity_before": "critical"}  # the pager has heard
        # the page rose to critical after the loop paged the pager (its update was not the
        # pager's news): its resolve is not the pager's either, it never got that alert
        page_end = {**page, "event_id": uuid.uuid4().hex, "status": "resolved"}
        page_end["severity"] = "critical"
        page_end["details"] = {
            "severity_fired": "warning",
            "severity_published": "warning",
            "raised_heard_before": "volume_spike=critical",
        }
        await produce(kafka_settings, [page, loop, end, later, page_end])
        async with running(notifier):
            await wait_until(lambda: len(pager.requests) == 2 and len(chat.requests) == 2)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    assert [b["event_id"] for b in pager.bodies()] == [loop["event_id"], end["event_id"]]
    assert [b["event_id"] for b in chat.bodies()] == [page["event_id"], page_end["event_id"]]


async def test_alerts_queued_when_the_notifier_dies_are_delivered_by_the_next_one(
    kafka_settings: Settings,
) -> None:
    """At-least-once: an alert's offset is committed only once every target that pages it
    is done with it (delivered, or given up on), so a notifier that dies with alerts queued
    (here: cancelled with no drain while the webhook hangs) leaves them to its successor."""
    await ensure_topics(kafka_settings)
    fired = [alert(scope=f"user:u{i}") for i in range(12)]
    async with receivers(("/slow", Receiver(hang=True))) as (slow,):
        target = AlertTarget(name="slow", url=slow.url, timeout_s=60)
        first = Notifier(
            kafka_settings,
            [target],
            registry=CollectorRegistry(),
            retry=FAST_RETRY,
            start_from="earliest",
        )
        task = asyncio.create_task(first.run(asyncio.Event()))
        await produce(kafka_settings, fired)
        await wait_until(lambda: len(slow.requests) >= 1, 30)  # one in flight, the rest queued
        await asyncio.sleep(1.0)  # commits of handed-over alerts would happen now
        task.cancel()  # dies: no drain
        with contextlib.suppress(asyncio.CancelledError):
            await task
    async with receivers(("/ok", Receiver())) as (ok,):
        target = AlertTarget(name="slow", url=ok.url)  # the same target, working again
        second = Notifier(
            kafka_settings,
            [target],
            registry=CollectorRegistry(),
            retry=FAST_RETRY,
            start_from="earliest",
        )
        async with running(second):
            want = {a["event_id"] for a in fired}
            await wait_until(lambda: {b["event_id"] for b in ok.bodies()} >= want, 30)
    # The one in flight when it died is sent again (at least once) under the same
    # Idempotency-Key: a receiver that keeps keys can drop the repeat.
    first_try = slow.requests[0]
    again = [r for r in ok.requests if r.body["event_id"] == first_try.body["event_id"]]
    assert first_try.idempotency_key == first_try.body["event_id"], first_try
    assert [r.idempotency_key for r in again] == [first_try.idempotency_key], again


async def test_an_alert_published_while_a_first_notifier_was_down_is_delivered_by_the_next(
    kafka_settings: Settings,
) -> None:
    """A notifier's first start reads from the end of the topic (no paging for history);
    but that position was never committed, so one killed before any alert came and started
    again began at the end again, and every alert published while it was down was never
    delivered (a fault probe: page 1 published while it was down, delivered 0 times)."""
    await ensure_topics(kafka_settings)
    old = alert(scope="user:before")  # history at the first start: not paged
    await produce(kafka_settings, [old])
    async with receivers(("/hook", Receiver())) as (hook,):
        target = AlertTarget(name="hook", url=hook.url)
        first = Notifier(kafka_settings, [target], registry=CollectorRegistry(), retry=FAST_RETRY)
        task = asyncio.create_task(first.run(asyncio.Event()))
        await asyncio.wait_for(first.ready.wait(), 30)
        task.cancel()  # dies (no graceful stop)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        missed = alert(scope="user:while-down")
        await produce(kafka_settings, [missed])
        second = Notifier(kafka_settings, [target], registry=CollectorRegistry(), retry=FAST_RETRY)
        async with running(second):
            await wait_until(lambda: len(hook.requests) >= 1, 30)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    assert [b["event_id"] for b in hook.bodies()] == [missed["event_id"]]


async def test_an_alert_the_agent_publishes_again_after_a_crash_is_not_paged_again(
    kafka_settings: Settings,
) -> None:
    """A fault probe (both the anomaly agent and the notifier killed): the agent publishes
    again, under the same event ids, what it had published since its last checkpoint; the
    restarted notifier no longer remembered sending them and paged every incident twice.
    What is before the group's committed offset was handled: a new notifier remembers the
    event ids there and skips their repeats."""
    await ensure_topics(kafka_settings)
    fired = [alert(scope=f"user:u{i}") for i in range(3)]
    async with receivers(("/hook", Receiver())) as (hook,):
        target = AlertTarget(name="hook", url=hook.url)
        first = Notifier(kafka_settings, [target], registry=CollectorRegistry(), retry=FAST_RETRY)
        async with running(first):
            await produce(kafka_settings, fired)
            await wait_until(lambda: len(hook.requests) == 3, 30)
        again = [*fired[1:], alert(scope="user:new")]  # the agent, restarted, publishes again
        await produce(kafka_settings, again)
        registry = CollectorRegistry()
        second = Notifier(kafka_settings, [target], registry=registry, retry=FAST_RETRY)
        async with running(second):
            await wait_until(lambda: len(hook.requests) >= 4, 30)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    sent = [b["event_id"] for b in hook.bodies()]  # (partitions: in no set order)
    assert sorted(sent) == sorted(a["event_id"] for a in [*fired, again[-1]]), sent
    assert count(registry, "hook", "skipped_duplicate") == 2


async def test_a_restarted_notifier_remembers_what_it_handled_on_every_partition(
    kafka_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look-back reads every assigned partition's handled records (up to its committed
    offset) with one consumer, not one per partition: repeats the agent publishes again on
    each of the three partitions are all skipped, and what is new on each is sent."""
    await ensure_topics(kafka_settings)
    partitions = range(kafka_settings.topic_partitions)
    fired = {p: [alert(scope=f"user:p{p}-{i}") for i in range(3)] for p in partitions}
    lookbacks: list[str] = []
    opened = clients.consumer

    def counting(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("purpose") == "notifier-lookback":
            lookbacks.append(kwargs["purpose"])
        return opened(*args, **kwargs)

    monkeypatch.setattr(clients, "consumer", counting)
    async with receivers(("/hook", Receiver())) as (hook,):
        target = AlertTarget(name="hook", url=hook.url)
        first = Notifier(kafka_settings, [target], registry=CollectorRegistry(), retry=FAST_RETRY)
        async with running(first):
            for p in partitions:
                await produce(kafka_settings, fired[p], partition=p)
            await wait_until(lambda: len(hook.requests) == 3 * len(partitions), 30)
        new = {p: alert(scope=f"user:p{p}-new") for p in partitions}
        for p in partitions:  # the agent, restarted, publishes again, then something new
            await produce(kafka_settings, [*fired[p][1:], new[p]], partition=p)
        registry = CollectorRegistry()
        second = Notifier(kafka_settings, [target], registry=registry, retry=FAST_RETRY)
        async with running(second):
            await wait_until(lambda: len(hook.requests) >= 4 * len(partitions), 30)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    sent = sorted(b["event_id"] for b in hook.bodies())
    want = [a["event_id"] for p in partitions for a in [*fired[p], new[p]]]
    assert sent == sorted(want), sent
    assert count(registry, "hook", "skipped_duplicate") == 2 * len(partitions)
    assert len(lookbacks) == 1, lookbacks  # the second notifier's, for all its partitions


async def test_tollgate_notify_serves_its_delivery_counts_on_its_metrics_port(
    kafka_settings: Settings,
) -> None:
    """The notifier counted deliveries into a registry nobody could scrape: `tollgate
    notify` serves them (and whether it is reading) on `notifier_metrics_port`."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from agents.notifier import run_notifier
    from tests.integration.harness import free_port

    port = free_port()
    settings = Settings(**{**kafka_settings.model_dump(), "notifier_metrics_port": port})
    await ensure_topics(settings)

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    async def scraped(key: tuple[str, tuple[tuple[str, str], ...]], value: float) -> None:
        deadline = time.monotonic() + 30
        seen: dict[Any, float] = {}
        while seen.get(key) != value:
            assert time.monotonic() < deadline, (key, seen)
            await asyncio.sleep(0.1)
            with contextlib.suppress(httpx.HTTPError):
                seen = await scrape()

    async with receivers(("/flaky", Receiver(answers=[500, 500]))) as (flaky,):
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_notifier(
                settings,
                [AlertTarget(name="flaky", url=flaky.url)],
                stop=stop,
                registry=CollectorRegistry(),
            )
        )
        try:
            await scraped(("tollgate_alert_notifier_ready", ()), 1)
            await produce(settings, [alert()])
            outcome = (("outcome", "delivered"), ("target", "flaky"))
            await scraped(("tollgate_alert_notifications_total", outcome), 1)
            retried = (("outcome", "retried"), ("target", "flaky"))
            assert (await scrape())[("tollgate_alert_notifications_total", retried)] == 2
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
