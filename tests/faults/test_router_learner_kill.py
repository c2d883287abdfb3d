"""The shared router learner (``tollgate router-learn``) killed again and again: every
labelled call is learned exactly once.

A real learner process, a real broker. Routed calls (``routing.features``) and their labels
(``Outcome`` events on ``outcomes``, and dispatcher-judged failures on ``routing.features``)
are produced in rounds, in both orders, with repeats (a second outcome for a call, a routed
record sent twice as a dispatcher's spool does after a crash); after each round the learner is
SIGKILLed at a random moment while it reads, then started again. At the end the learner's
checkpoint and the model it published for dispatchers must have learned exactly the calls
that have a label: as many outcomes in all and per feature, none lost, none twice. (The
learner checkpoints model, join state and offsets in one record, so what it read after its
last checkpoint is read again into the state of that checkpoint; ``agents/router_learner.py``.)
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from agents.router_learner import LEARNER_KEY, MODEL_KEY, LearnerCheckpoint
from app.events.codec import EventCodec
from app.events.compacted import latest_value
from app.routing.router import Router
from app.routing.shared import encode_label, encode_routed
from tests.faults.harness import TOLLGATE, Audit, Component, FaultStack, record_row, wait_for
from tests.integration.test_shared_learning import ROUTING, body, outcome

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROUNDS = 4
CALLS_PER_ROUND = 60
FEATURES = ("search", "support", None)


def feature_of(i: int) -> str | None:
    return FEATURES[i % len(FEATURES)]


def round_records(
    rng: random.Random, first: int, count: int
) -> tuple[list[tuple[str, bytes]], dict[int, str]]:
    """(topic suffix, value) in a shuffled order, and the label that counts for each call.

    Of the calls: about 80 % get an outcome (a label may come before its routed record: they
    are on two topics), 5 % a dispatcher-judged failure instead, the rest no label (never
    learned). Repeats: some routed records twice (a dispatcher's spool after a crash) and some
    calls a second, opposite outcome at the end of the round (only the first counts)."""
    router, codec = Router(ROUTING), EventCodec()
    records: list[tuple[str, bytes]] = []
    later: list[tuple[str, bytes]] = []
    labels: dict[int, str] = {}
    for i in range(first, first + count):
        request_id = f"req_{i}"
        routed = encode_routed(request_id, feature_of(i), router.features(body(i)))
        records.append(("routing.features", routed))
        if rng.random() < 0.1:
            records.append(("routing.features", routed))
        draw = rng.random()
        if draw < 0.8:
            result = "failure" if rng.random() < 0.4 else "success"
            labels[i] = result
            records.append(("outcomes", codec.encode("Outcome", outcome(request_id, result))))
            if rng.random() < 0.1:
                again = "success" if result == "failure" else "failure"
                later.append(("outcomes", codec.encode("Outcome", outcome(request_id, again))))
        elif draw < 0.85:
            labels[i] = "failure"
            judged = encode_label(request_id, "failure", "validator:empty")
            records.append(("routing.features", judged))
    rng.shuffle(records)
    return records + later, labels


async def _produce(stack: FaultStack, records: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for topic, value in records:
            await producer.send_and_wait(stack.settings.topic(topic), value)
            await asyncio.sleep(0.005)  # spread over the moments the learner may die at
    finally:
        await producer.stop()


def learned_counts(data: bytes) -> dict[str, int]:
    model = Router.restore(ROUTING, data).model
    counts = {"*": model.outcomes_learned}
    counts.update({name: learner.outcomes for name, learner in model.feature_learners.items()})
    return counts


def read_state(stack: FaultStack) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """What the learner's checkpoint and its published model have learned (None: nothing yet)."""

    async def read() -> tuple[bytes | None, bytes | None]:
        checkpoint, _ = await latest_value(
            stack.settings, stack.settings.topic("routing.learner"), LEARNER_KEY
        )
        model, _ = await latest_value(
            stack.settings, stack.settings.topic("routing.state"), MODEL_KEY
        )
        return checkpoint, model

    checkpoint, model = asyncio.run(read())
    saved = learned_counts(LearnerCheckpoint.decode(checkpoint).model) if checkpoint else None
    published = learned_counts(model) if model else None
    return saved, published


def expected_counts(labels: dict[int, str]) -> dict[str, int]:
    counts = {"*": len(labels)}
    for i in labels:
        name = feature_of(i)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.faults_ci
def test_a_learner_killed_while_reading_learns_every_labelled_call_once(make_stack: Any) -> None:
    stack: FaultStack = make_stack()
    stack.cli("topics", "ensure")
    learner = Component(
        "router-learner",
        [TOLLGATE, "router-learn"],
        {**stack.env, "TOLLGATE_ROUTING": ROUTING.model_dump_json()},
        stack.root / "logs" / "router-learner.log",
    )
    stack.components["router-learner"] = learner
    rng = random.Random(20261202)
    labels: dict[int, str] = {}
    state: dict[str, Any] = {}

    def caught_up() -> bool:
        """The learner is alive and its checkpoint holds every label produced so far."""
        stack.check_alive("router-learner")
        state["saved"], state["published"] = read_state(stack)
        return state["saved"] is not None and state["saved"]["*"] >= len(labels)

    def produce_round(number: int) -> threading.Thread:
        records, round_labels = round_records(rng, number * CALLS_PER_ROUND, CALLS_PER_ROUND)
        labels.update(round_labels)
        thread = threading.Thread(target=asyncio.run, args=(_produce(stack, records),))
        thread.start()
        return thread

    learner.start()
    produce_round(0).join(120)
    wait_for(caught_up, 180, "the learner to learn the first round")
    recoveries: list[float] = []
    for number in range(1, ROUNDS + 1):
        # Killed at a random moment while the round's records arrive (about 1 s of them,
        # the learner checkpoints every 0.3 s): between reading and saving, mid-save,
        # before or after publishing.
        producing = produce_round(number)
        time.sleep(rng.uniform(0.1, 1.2))
        learner.kill()
        producing.join(120)
        assert not producing.is_alive()
        learner.start()
        started = time.monotonic()
        try:
            wait_for(caught_up, 180, f"the learner to catch up after kill {number}")
        except AssertionError:
            break  # the audit below says what is missing
        recoveries.append(time.monotonic() - started)
    kills = learner.starts - 1
    recovery = max(recoveries, default=None)
    time.sleep(2.0)  # several publish periods (0.3 s): anything learned twice would show
    saved, published = read_state(stack)
    learner.stop()
    want = expected_counts(labels)

    audit = Audit(requests=len(labels), answered=saved["*"] if saved else 0)
    for name, count in want.items():
        got = (saved or {}).get(name, 0)
        if got < count:
            audit.lost.append(f"learner {name}: {count - got} of {count} labelled calls")
        elif got > count:
            audit.duplicated.append(f"learner {name}: {got - count} calls learned twice")
    record_row(f"router learner SIGKILL x{kills}", audit, recovery)
    assert not audit.lost and not audit.duplicated, audit.failures()
    assert saved == want
    assert published == want, "the model dispatchers follow is the checkpoint's"
