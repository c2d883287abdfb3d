"""Shared fixtures: a real Kafka broker and a real ClickHouse engine.

``kafka_bootstrap``: ``TOLLGATE_KAFKA_BOOTSTRAP`` if set; else a testcontainers
Kafka if a Docker engine answers; else the project's local launcher on test
free ports with a temporary state dir, started once per session
and stopped at the end if this session started it.

``clickhouse``: ``TOLLGATE_CLICKHOUSE_URL`` if set; else a testcontainers
ClickHouse if Docker answers; else an embedded chdb directory in a temp path.
All go through clickhouse-connect.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from app.settings import Settings

# Tests assert behaviour, never timing: no per-example deadline (a first example that loads
# a tokenizer or a model on a busy machine is slow, not wrong).
hypothesis_settings.register_profile("tollgate", deadline=None)
hypothesis_settings.load_profile("tollgate")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "fault injection (tests/faults)")
    group.addoption(
        "--faults",
        choices=("ci", "full"),
        default="ci",
        help="ci: the fault rows marked faults_ci, at CI scale; full: every row, full scale",
    )
    group.addoption("--fault-table", default=None, help="write the fault table (Markdown) here")


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


class TestBroker:
    """The session's broker; ``launcher`` is set when this session runs it locally."""

    def __init__(self, bootstrap: str, launcher: Any = None) -> None:
        self.bootstrap = bootstrap
        self.launcher = launcher


def _free_port() -> int:
    from tests.ports import free_port

    return free_port()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestBroker]:
    configured = os.environ.get("TOLLGATE_KAFKA_BOOTSTRAP")
    if configured:
        yield TestBroker(configured)
        return
    if docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as container:
            yield TestBroker(container.get_bootstrap_server())
        return
    from devtools.kafka_local import LocalKafka

    # Free ports and a state dir of its own: concurrent test runs never share a broker.
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{_free_port()}",
        kafka_controller_port=_free_port(),
        state_dir=tmp_path_factory.mktemp("kafka-broker"),
    )
    launcher = LocalKafka(settings)
    result = launcher.start()
    try:
        yield TestBroker(result.bootstrap, launcher)
    finally:
        if not result.already_running:
            launcher.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: TestBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def kafka_launcher(kafka_broker: TestBroker) -> Any:
    """The local launcher of the session broker, for tests that stop and restart Kafka."""
    if kafka_broker.launcher is None:
        pytest.skip("the broker is not run by this session; cannot stop it")
    return kafka_broker.launcher


@pytest.fixture
def kafka_settings(kafka_bootstrap: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test broker, with a unique topic prefix per test."""
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        topic_partitions=3,
        state_dir=tmp_path / "state",
    )


@pytest.fixture(scope="session")
def clickhouse_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    configured = os.environ.get("TOLLGATE_CLICKHOUSE_URL")
    if configured:
        yield configured
        return
    if docker_answers():
        from testcontainers.clickhouse import ClickHouseContainer

        with ClickHouseContainer("clickhouse/clickhouse-server:25.8", port=8123) as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(8123)
            yield f"http://{container.username}:{container.password}@{host}:{port}"
        return
    yield f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="session")
def clickhouse(clickhouse_dsn: str) -> Iterator[Any]:
    """A clickhouse-connect client (server or embedded chdb)."""
    from app.warehouse.clickhouse import connect

    client = connect(dsn=clickhouse_dsn)
    try:
        yield client
    finally:
        client.close()
