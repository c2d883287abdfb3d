"""Nothing is lost: Kafka outages and dispatcher crashes do not drop usage events."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.events.topics import ensure_topics
from app.settings import Settings
from tests.integration.harness import (
    BackgroundLoop,
    free_port,
    read_events,
    running_stack,
    start_simulator,
)

pytestmark = pytest.mark.integration
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me exactly once"}]}


def _depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("tollgate_spool_depth "):
            return float(line.split()[1])
    raise AssertionError("no tollgate_spool_depth metric")


def _wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kafka_outage_while_requests_flow_loses_and_duplicates_nothing(
    kafka_settings: Settings, kafka_launcher: Any
) -> None:
    asyncio.run(ensure_topics(kafka_settings))
    served: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    with running_stack(kafka_settings) as stack:

        def traffic() -> None:
            with httpx.Client(timeout=30) as http:
                i = 0
                while not stop.is_set():
                    i += 1
                    response = http.post(
                        f"{stack.url}/v1/chat/completions", json={**BODY, "user": f"u{i % 5}"}
                    )
                    if response.status_code == 200:
                        served.append(response.headers["X-Request-Id"])
                    else:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    time.sleep(0.01)

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            _wait_for(lambda: len(served) >= 20, 30, "traffic before the outage")
            kafka_launcher.stop()
            before_restart = len(served)
            _wait_for(lambda: len(served) >= before_restart + 30, 30, "traffic during the outage")
            assert _depth(stack.url) > 0, "events are spooled while Kafka is down"

            def degraded() -> bool:
                ready = httpx.get(f"{stack.url}/readyz").json()
                assert ready["ready"] is True, "keeps serving on the spool"
                return ready["checks"]["kafka_connected"] is False and bool(
                    ready["checks"]["kafka_error"]
                )

            _wait_for(degraded, 40, "/readyz to report Kafka as not delivering, and why")
            kafka_launcher.start()
            time.sleep(1.0)
        finally:
            stop.set()
            sender.join(30)
            # Whatever failed above, the session's broker is back for the tests after this
            # one (start() reuses a running broker).
            kafka_launcher.start()
        _wait_for(lambda: _depth(stack.url) == 0, 60, "the spool to drain after Kafka is back")

    assert not failures, failures[:3]
    usage = asyncio.run(read_events(kafka_settings, "usage", at_least=len(served), timeout_s=60))
    # Delivery to Kafka is at-least-once: a batch cut by the outage may be re-sent although
    # the broker had stored part of it. A re-send carries the same event_id (consumers keep
    # it once); what must never happen is a second, different event for one request.
    event_ids: dict[str, set[str]] = {}
    for event in usage:
        event_ids.setdefault(event["request_id"], set()).add(event["event_id"])
    missing = [r for r in served if r not in event_ids]
    two_events = {r: ids for r, ids in event_ids.items() if len(ids) > 1}
    assert not missing, f"{len(missing)} of {len(served)} served requests have no usage event"
    assert not two_events, f"requests with two different usage events: {two_events}"
    assert len(event_ids) == len(served)


def test_dispatcher_killed_with_spooled_events_delivers_them_at_restart(
    kafka_settings: Settings, tmp_path: Path
) -> None:
    """SIGKILL while Kafka is unreachable; the next start ships what the spool kept."""
    asyncio.run(ensure_topics(kafka_settings))
    loop = BackgroundLoop()
    sim_port = free_port()
    sim = loop.run(start_simulator(sim_port))
    port = free_port()
    env = {
        **os.environ,
        "TOLLGATE_STATE_DIR": str(tmp_path / "state"),
        "TOLLGATE_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "TOLLGATE_DISPATCHER_PORT": str(port),
        "TOLLGATE_SIMULATOR_PORT": str(sim_port),
        "TOLLGATE_LOG_FORMAT": "json",
    }
    url = f"http://127.0.0.1:{port}"

    def launch(bootstrap: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env={**env, "TOLLGATE_KAFKA_BOOTSTRAP": bootstrap},
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "dispatcher.log").open("ab"),
        )

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(up, 30, "the dispatcher to start")
        return process

    served: list[str] = []
    try:
        process = launch(f"127.0.0.1:{free_port()}")  # nothing listens there
        for i in range(25):
            response = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "user": f"k{i}"})
            assert response.status_code == 200
            served.append(response.headers["X-Request-Id"])
        assert _depth(url) >= 50  # a Request and a Usage event per call
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        process = launch(kafka_settings.kafka_bootstrap)
        _wait_for(lambda: _depth(url) == 0, 60, "the restarted dispatcher to drain its spool")
        process.terminate()
        process.wait(20)
    finally:
        loop.run(sim.cleanup())
        loop.close()

    usage = asyncio.run(read_events(kafka_settings, "usage", at_least=len(served)))
    assert sorted(e["request_id"] for e in usage) == sorted(served)
