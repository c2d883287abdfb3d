"""Shared learning of the tier router across dispatchers, with a real Kafka broker.

- The learner joins routed calls (``routing.features``) with ``Outcome`` events in either
  order, learns each call once, checkpoints model + join state + offsets together, and a
  restarted learner resumes from the checkpoint: it learns only what is new (including an
  outcome that arrives after the restart for a call read before it), never twice.
- End to end with two real dispatchers: calls routed by one, outcomes posted to the other,
  and the other's score for the prompt moves once the learner publishes; neither dispatcher
  learns by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer

from agents.router_learner import RouterLearner
from app.events.codec import EventCodec
from app.events.topics import ensure_topics
from app.metering.usage import event_time, new_id
from app.routing.config import ProviderTiers, RoutingSettings
from app.routing.router import Router
from app.routing.scoring import GATE_DEFAULT
from app.routing.shared import encode_label, encode_routed
from app.settings import Settings
from tests.integration.harness import BackgroundLoop, running_stack

pytestmark = pytest.mark.integration

ROUTING = RoutingSettings(
    providers=(
        ProviderTiers(provider="sim", economy="gpt-4o-mini", standard="gpt-4o", premium="gpt-4"),
    ),
    shared_learning=True,
    publish_every_s=0.3,
    exploration_rate=0.0,  # request ids are random: exploration would pick calls at random
)


def shared(settings: Settings) -> Settings:
    return Settings(**{**settings.model_dump(), "routing": ROUTING})


def body(i: int) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": f"Question number {i}?"}]}


def outcome(request_id: str, result: str) -> dict[str, Any]:
    return {
        "event_id": new_id("evt_"),
        "ts": event_time(),
        "request_id": request_id,
        "session_id": None,
        "user_id": "u1",
        "feature": None,
        "outcome": result,
        "kind": None,
        "value_usd_nanos": None,
        "metadata": {},
    }


async def produce(settings: Settings, routed: list[int], outcomes: list[tuple[int, str]]) -> None:
    router, codec = Router(settings.routing), EventCodec()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in routed:
            value = encode_routed(f"req_{i}", None, router.features(body(i)))
            await producer.send_and_wait(settings.topic("routing.features"), value, key=b"k%d" % i)
        for i, result in outcomes:
            if result == "judged":  # the dispatcher's own validator said the answer failed
                value = encode_label(f"req_{i}", "failure", "validator:empty")
                await producer.send_and_wait(settings.topic("routing.features"), value)
            else:
                value = codec.encode("Outcome", outcome(f"req_{i}", result))
                await producer.send_and_wait(settings.topic("outcomes"), value)
    finally:
        await producer.stop()


async def run_until(learner: RouterLearner, examples: int, *, timeout_s: float = 60) -> None:
    """Run the learner until it has learned ``examples`` in all and saved a checkpoint of
    them, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    deadline = time.monotonic() + timeout_s
    while learner.examples_learned < examples and time.monotonic() < deadline:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 30)


def test_learner_joins_learns_once_and_resumes_from_its_checkpoint(
    kafka_settings: Settings,
) -> None:
    settings = shared(kafka_settings)

    async def scenario() -> None:
        await ensure_topics(settings)
        # calls 0..9 routed; 0..5 get outcomes (one before its call's record would be read:
        # outcomes and features are separate topics), 6 a dispatcher-judged failure,
        # 0 a second outcome (not learned again); 7..9 wait.
        await produce(
            settings,
            routed=list(range(10)),
            outcomes=[(i, "failure" if i % 2 else "success") for i in range(6)]
            + [(6, "judged"), (0, "failure")],
        )
        first = RouterLearner(settings, publish_every_s=0.2)
        await run_until(first, 7)
        assert first.examples_learned == 7 and first.learned_this_run == 7
        assert first.join.stats()["waiting_calls"] == 3
        assert first.checkpoints_saved >= 1 and first.models_published >= 1

        # After the stop: outcomes for two waiting calls, a repeat for a learned one, and a
        # new call with its outcome arriving first.
        await produce(
            settings,
            routed=[],
            outcomes=[(7, "failure"), (8, "success"), (3, "success"), (10, "failure")],
        )
        await produce(settings, routed=[10], outcomes=[])
        second = RouterLearner(settings, publish_every_s=0.2)
        await run_until(second, 10)
        assert second.restored
        assert second.examples_learned == 10, "restored 7, learned 3 new"
        assert second.learned_this_run == 3, "nothing learned twice after the restart"
        assert second.join.stats()["waiting_calls"] == 1  # call 9, still waiting

        # A third start reads nothing new and learns nothing.
        third = RouterLearner(settings, publish_every_s=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(third.run(stop))
        await asyncio.wait_for(third.ready.wait(), 30)
        await asyncio.sleep(1.0)  # a few polls: nothing may be learned (asserted below)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert third.examples_learned == 10 and third.learned_this_run == 0

    asyncio.run(scenario())


PROMPT = [{"role": "user", "content": "Translate the shipping policy into formal Klingon."}]


@pytest.fixture
def learner(kafka_settings: Settings) -> Iterator[RouterLearner]:
    settings = shared(kafka_settings)
    asyncio.run(ensure_topics(settings))
    loop = BackgroundLoop()
    agent = RouterLearner(settings, publish_every_s=0.3)
    stop = asyncio.Event()
    future = asyncio.run_coroutine_threadsafe(agent.run(stop), loop.loop)
    try:
        yield agent
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        future.result(30)
        loop.close()


def route(url: str) -> tuple[float, str, str]:
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = sdk.chat.completions.with_raw_response.create(
        model="auto", messages=PROMPT, user="lee"
    )
    h = response.headers
    return float(h["X-Tollgate-Router-Score"]), h["X-Tollgate-Tier"], h["X-Request-Id"]


def test_outcomes_posted_to_one_dispatcher_move_the_others_score(
    kafka_settings: Settings, learner: RouterLearner
) -> None:
    settings = shared(kafka_settings)
    with (
        running_stack(settings, routing=ROUTING) as first,
        running_stack(settings, routing=ROUTING) as second,
    ):
        before_first, tier, _ = route(first.url)
        before_second, _, _ = route(second.url)
        assert tier == "economy" and before_first == before_second
        failures = 12
        with httpx.Client(timeout=30) as http:
            for _ in range(failures):
                _, tier, request_id = route(first.url)
                reply = http.post(  # posted to the other dispatcher
                    f"{second.url}/v1/outcomes",
                    json={"request_id": request_id, "outcome": "failure"},
                    headers={"X-Tollgate-User": "lee"},
                )
                assert reply.status_code == 202, reply.text
        deadline = time.monotonic() + 60
        while learner.examples_learned < failures and time.monotonic() < deadline:
            time.sleep(0.1)
        assert learner.examples_learned == failures  # each failure learned once, nowhere else
        body = {"model": "auto", "messages": PROMPT, "user": "lee"}
        expected = round(learner.router.score(body)[0], 4)  # the learner's own model
        assert expected > before_second
        scores = (before_first, before_second)
        while scores != (expected, expected) and time.monotonic() < deadline:
            time.sleep(0.2)
            scores = (route(first.url)[0], route(second.url)[0])
        # Both dispatchers score exactly with the learner's model: nothing learned locally
        # (a dispatcher that also learned from its own outcomes would score differently).
        assert scores == (expected, expected)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an agent's /metrics, by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_learner_serves_what_it_learned_on_its_metrics_port(
    kafka_settings: Settings,
) -> None:
    """The shared learner's figures (learned, waiting, forgotten, skipped, checkpoints, lag)
    were only in its log lines: a deployment could not alert on a learner that stopped
    learning. `tollgate router-learn` serves them on `router_learn_metrics_port`."""
    from agents.router_learner import run_router_learner
    from tests.integration.harness import free_port

    port = free_port()
    settings = Settings(
        **{**shared(kafka_settings).model_dump(), "router_learn_metrics_port": port}
    )
    asyncio.run(ensure_topics(settings))
    loop = BackgroundLoop()
    stop = asyncio.Event()
    future = asyncio.run_coroutine_threadsafe(run_router_learner(settings, stop), loop.loop)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the listener comes up before Kafka is read
            try:
                before = scrape(port)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert before[("tollgate_router_learner_learned_total", ())] == 0
        # 6 calls routed to economy; outcomes for 0..3 and a second one for 0 (learned once);
        # one record no dispatcher would write.
        asyncio.run(
            produce(
                settings,
                routed=list(range(6)),
                outcomes=[(i, "failure") for i in range(4)] + [(0, "success")],
            )
        )

        async def garbage() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(settings.topic("routing.features"), b"\x00garbage")
            finally:
                await producer.stop()

        asyncio.run(garbage())
        wanted = {
            ("tollgate_router_learner_learned_total", ()): 4,
            ("tollgate_router_learner_examples", ()): 4,
            ("tollgate_router_learner_skipped_records_total", ()): 1,
            ("tollgate_router_learner_waiting", (("kind", "calls"),)): 2,
            ("tollgate_router_learner_waiting", (("kind", "labels"),)): 0,
            ("tollgate_router_learner_records_read_total", (("topic", "routing.features"),)): 7,
            ("tollgate_router_learner_records_read_total", (("topic", "outcomes"),)): 5,
            ("tollgate_router_learner_lag_records", (("topic", "routing.features"),)): 0,
            ("tollgate_router_learner_lag_records", (("topic", "outcomes"),)): 0,
            ("tollgate_router_learner_ready", ()): 1,
            # too few of each outcome to measure the learned part against the prior yet
            ("tollgate_router_learner_learned_weight", ()): GATE_DEFAULT,
        }
        deadline = time.monotonic() + 60
        seen = scrape(port)
        while time.monotonic() < deadline and (
            any(seen.get(k) != v for k, v in wanted.items())
            or seen.get(("tollgate_router_learner_models_published_total", ()), 0) < 1
        ):
            time.sleep(0.2)
            seen = scrape(port)
        assert {k: seen.get(k) for k in wanted} == wanted
        assert seen[("tollgate_router_learner_checkpoints_total", ())] >= 1
        assert seen[("tollgate_router_learner_models_published_total", ())] >= 1
        assert seen[("tollgate_router_learner_last_checkpoint_timestamp_seconds", ())] > 0
        assert seen[("tollgate_router_learner_forgotten", (("kind", "calls"),))] == 0
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        future.result(30)
        loop.close()
    with pytest.raises(httpx.HTTPError):  # the listener closes with the learner
        scrape(port)
