"""A dispatcher SIGKILLed under load loses no usage (issue 11, observation 1).

The dispatcher runs as its own process (``tollgate serve``) in front of a simulator whose
calls take a second or two, with 16 clients (half streamed, distinct users), and is killed
``TOLLGATE_TEST_DISPATCHER_KILLS`` times (2 in ``make test``, 10 or more in
``make test-faults``) and restarted on the same spool. Afterwards every accepted Request has
exactly one Usage (the real one, or the spend worker's estimate when the call died with its
dispatcher), counted by id; and the spend worker's total equals the distinct usage events.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.budgets.spend import event_cost
from app.events.topics import ensure_topics
from app.metering.usage import usage_event_id
from app.settings import Settings
from tests.integration.harness import (
    BackgroundLoop,
    WorkerProcess,
    free_port,
    latest_decisions,
    publish_policy,
    read_events,
    start_simulator,
    wait_worker_ready,
)

pytestmark = pytest.mark.integration
PROMPT = [{"role": "user", "content": "Summarise the incident report in three bullet points."}]


class DispatcherProcess:
    """``tollgate serve`` as a real process on a state dir (spool) of its own."""

    def __init__(self, settings: Settings, sim_port: int, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        upstream = {
            "name": "sim",
            "base_url": f"http://127.0.0.1:{sim_port}/v1",
            "models": ["gpt-4o", "gpt-4o-mini"],
            "forward_headers": ["X-Sim-*"],
        }
        self.env = {
            **os.environ,
            "TOLLGATE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TOLLGATE_TOPIC_PREFIX": settings.topic_prefix,
            "TOLLGATE_TOPIC_PARTITIONS": str(settings.topic_partitions),
            "TOLLGATE_STATE_DIR": str(settings.state_dir / "dispatcher"),
            "TOLLGATE_DISPATCHER_PORT": str(self.port),
            "TOLLGATE_UPSTREAMS": json.dumps([upstream]),
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.process.poll() is None, f"dispatcher exited; see {self.log_path}"
            time.sleep(0.2)
        raise AssertionError(f"dispatcher did not start; see {self.log_path}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Load:
    """16 clients, half streamed, each its own user; records every answer it got."""

    def __init__(self, dispatcher: DispatcherProcess, clients: int = 16) -> None:
        self.dispatcher = dispatcher
        self.clients = clients
        self.stop = threading.Event()
        self.answers: dict[str, int] = {}  # request id -> status the client saw
        self.errors = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(clients)]

    def run(self, i: int) -> None:
        stream = i % 2 == 0
        headers = {"X-Tollgate-User": f"load-{i}", "X-Sim-Latency-Ms": "1500"}
        body = {"model": "gpt-4o", "messages": PROMPT, "stream": stream}
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                try:
                    with http.stream(
                        "POST", f"{self.dispatcher.url}/v1/chat/completions", json=body,
                        headers=headers,
                    ) as response:  # fmt: skip
                        b"".join(response.iter_bytes())
                        with self.lock:
                            self.answers[response.headers["X-Request-Id"]] = response.status_code
                except httpx.HTTPError:
                    with self.lock:
                        self.errors += 1
                    time.sleep(0.2)  # the dispatcher is down: try again shortly

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)


@pytest.fixture
def simulator() -> Iterator[int]:
    loop = BackgroundLoop()
    port = free_port()
    runner = loop.run(start_simulator(port))
    try:
        yield port
    finally:
        loop.run(runner.cleanup())
        loop.close()


def test_dispatcher_killed_under_load_leaves_exactly_one_usage_per_request(
    kafka_settings: Settings, tmp_path: Path, simulator: int
) -> None:
    kills = int(os.environ.get("TOLLGATE_TEST_DISPATCHER_KILLS", "2"))
    asyncio.run(ensure_topics(kafka_settings))
    asyncio.run(publish_policy(kafka_settings, "global", {"period": "month", "limit_usd": 100000}))
    worker = WorkerProcess(kafka_settings, tmp_path / "worker.log", TOLLGATE_SETTLE_GRACE_S="2")
    worker.start()
    dispatcher = DispatcherProcess(
        kafka_settings, simulator, tmp_path / "dispatcher.log", TOLLGATE_MAX_CALL_DURATION_S="20"
    )
    chaos = random.Random(99)
    try:
        wait_worker_ready(kafka_settings)
        dispatcher.start()
        with Load(dispatcher) as load:
            for _ in range(kills):
                time.sleep(chaos.uniform(2.0, 5.0))  # calls in flight, streams half sent
                dispatcher.kill()
                dispatcher.start()
            time.sleep(3)
        assert load.answers, "no call was answered"

        requests = asyncio.run(read_events(kafka_settings, "requests", at_least=len(load.answers)))
        accepted = {r["request_id"] for r in requests if r["status"] == "accepted"}
        assert set(load.answers) <= {r["request_id"] for r in requests}

        deadline = time.monotonic() + 120
        while True:  # the settler needs the deadline (20 s) plus its grace
            usage = asyncio.run(read_events(kafka_settings, "usage", at_least=len(accepted)))
            by_request: dict[str, set[str]] = defaultdict(set)
            for event in usage:
                if event["source"] in ("dispatcher", "settlement"):
                    by_request[event["request_id"]].add(event["event_id"])
            missing = accepted - set(by_request)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not missing, f"{len(missing)} accepted requests have no usage"
        assert set(by_request) <= accepted, "usage for a request that was never accepted"
        for request_id, event_ids in by_request.items():
            assert event_ids == {usage_event_id(request_id, 1)}, request_id
        estimated = [e for e in usage if e["source"] == "settlement"]
        assert estimated, "no call died in flight: the kills missed (make the load longer)"
        assert all(e["usage_estimated"] and e["status"] == "dispatcher_lost" for e in estimated)

        distinct: dict[str, Any] = {}
        for e in usage:  # offset order: the first of one id is the one consumers keep
            distinct.setdefault(e["event_id"], e)
        total = sum(event_cost(e) for e in distinct.values())
        deadline = time.monotonic() + 60
        while True:
            counted = asyncio.run(latest_decisions(kafka_settings)).get("global") or {}
            if counted.get("spent_usd_nanos") == total or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert counted.get("spent_usd_nanos") == total, "the spend worker's count differs"
    finally:
        dispatcher.stop()
        worker.stop()


def test_dispatcher_stopped_with_sigterm_finishes_its_calls_and_flushes_their_usage(
    kafka_settings: Settings, tmp_path: Path, simulator: int
) -> None:
    """A deploy's SIGTERM is not a crash: the calls in flight finish (streams included),
    their real usage reaches Kafka before the process exits, and it exits cleanly."""
    asyncio.run(ensure_topics(kafka_settings))
    dispatcher = DispatcherProcess(kafka_settings, simulator, tmp_path / "dispatcher.log")
    try:
        dispatcher.start()
        with Load(dispatcher, clients=8) as load:
            time.sleep(3.5)  # calls take 1.5 s: some are half way through
            assert dispatcher.process is not None
            os.killpg(dispatcher.process.pid, signal.SIGTERM)
            code = dispatcher.process.wait(60)
        assert code == 0, f"the dispatcher died of SIGTERM (exit {code}); see its log"
        assert load.answers and set(load.answers.values()) == {200}
        requests = asyncio.run(read_events(kafka_settings, "requests", at_least=len(load.answers)))
        accepted = {r["request_id"] for r in requests if r["status"] == "accepted"}
        usage = asyncio.run(read_events(kafka_settings, "usage", at_least=len(accepted)))
        real = {e["request_id"] for e in usage if e["source"] == "dispatcher"}
        assert accepted <= real, "a call accepted before the SIGTERM was cut or not counted"
        assert set(load.answers) <= accepted
    finally:
        dispatcher.kill()
