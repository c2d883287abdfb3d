"""Integration test of devtools/kafka_local.py: a real Kafka broker from Maven Central jars.

Uses its own free ports (picked per test, never 9092/9093 or the session broker's) and a
temporary state dir, so it collides neither with the session broker of tests/conftest.py,
nor with a developer's broker, nor with another run of this test. The jars are shared with
everything else through the default cache (~/.cache/tollgate).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.settings import Settings
from devtools.kafka_local import KafkaStatus, LocalKafka, pid_alive, port_open

pytestmark = pytest.mark.integration


def free_ports(count: int = 2) -> list[int]:
    """Distinct TCP ports that are free right now (sockets held open together)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def launcher(state_dir: Path, port: int, controller_port: int) -> LocalKafka:
    return LocalKafka(
        Settings(
            state_dir=state_dir,
            kafka_bootstrap=f"127.0.0.1:{port}",
            kafka_controller_port=controller_port,
        )
    )


async def create_and_roundtrip(bootstrap: str, topic: str, payload: bytes) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, payload)
    finally:
        await producer.stop()
    assert await read_all(bootstrap, topic) == [payload]


async def read_all(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000)
        return [record.value for records in batches.values() for record in records if record.value]
    finally:
        await consumer.stop()


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await admin.list_topics()
    finally:
        await admin.close()


def test_start_status_restart_stop(tmp_path: Path) -> None:
    port, controller_port = free_ports(2)
    kafka = launcher(tmp_path, port, controller_port)
    first = kafka.start()
    try:
        assert first.already_running is False
        assert first.bootstrap == f"127.0.0.1:{port}"
        assert first.start_seconds > 0
        assert first.log_file == tmp_path.resolve() / "kafka" / "kafka.log"
        assert first.log_file.stat().st_size > 0  # log4j2 is wired: the broker logs
        assert kafka.pid_file.read_text().strip() == str(first.pid)

        status = kafka.status()
        assert (status.running, status.pid) == (True, first.pid)
        assert status.data_dir == tmp_path.resolve() / "kafka" / "data"

        # It is a real broker: topics, produce, consume.
        topic = f"launcher-{uuid.uuid4().hex[:8]}"
        asyncio.run(create_and_roundtrip(first.bootstrap, topic, b"hello"))

        # Idempotent start, also from another launcher object (another CLI call).
        for again in (kafka.start(), launcher(tmp_path, port, controller_port).start()):
            assert again.already_running is True
            assert again.pid == first.pid
            assert again.downloaded is False

        # A lost pid file: the broker is still found through its port, and adopted.
        kafka.pid_file.unlink()
        assert kafka.status().pid == first.pid
        assert kafka.start().already_running is True
        assert kafka.pid_file.read_text().strip() == str(first.pid)

        assert kafka.stop() is True
        assert kafka.status() == KafkaStatus(
            running=False,
            pid=None,
            bootstrap=first.bootstrap,
            log_file=first.log_file,
            data_dir=status.data_dir,
        )
        assert not pid_alive(first.pid)
        assert not kafka.pid_file.exists()
        assert not port_open("127.0.0.1", port)
        assert kafka.stop() is False

        # Warm start: storage kept (the topic and its record survive), no download.
        second = kafka.start()
        assert second.already_running is False
        assert second.downloaded is False
        assert second.download_seconds == 0.0
        assert second.pid != first.pid
        assert second.start_seconds > 0  # measured (its figure is the launcher benchmark's)
        assert topic in asyncio.run(list_topics(second.bootstrap))
        assert asyncio.run(read_all(second.bootstrap, topic)) == [b"hello"]
        assert kafka.stop() is True
        assert kafka.status().running is False

        # And once more: start/stop work repeatedly.
        third = kafka.start()
        assert third.already_running is False
        assert kafka.stop() is True
    finally:
        kafka.stop()


def test_stale_pid_files_are_ignored(tmp_path: Path) -> None:
    kafka = launcher(tmp_path, *free_ports(2))
    kafka.home.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    kafka.pid_file.write_text(f"{dead.pid}\n")
    try:
        result = kafka.start()
        assert result.already_running is False
        assert result.pid != dead.pid
        assert kafka.pid_file.read_text().strip() == str(result.pid)
        assert kafka.stop() is True

        # A pid reused by an unrelated live process (here: this test) is stale too.
        kafka.pid_file.write_text(f"{os.getpid()}\n")
        assert kafka.status().running is False
        result = kafka.start()
        assert result.already_running is False
        assert result.pid != os.getpid()
        assert kafka.stop() is True
        assert pid_alive(os.getpid())
    finally:
        kafka.stop()


def test_port_change_keeps_storage(tmp_path: Path) -> None:
    kafka = launcher(tmp_path, *free_ports(2))
    topic = f"moved-{uuid.uuid4().hex[:8]}"
    try:
        first = kafka.start()
        asyncio.run(create_and_roundtrip(first.bootstrap, topic, b"before the move"))
        assert kafka.stop() is True
    finally:
        kafka.stop()

    new_port, new_controller_port = free_ports(2)
    moved = launcher(tmp_path, new_port, new_controller_port)
    try:
        result = moved.start()
        assert result.bootstrap == f"127.0.0.1:{new_port}"
        assert asyncio.run(read_all(result.bootstrap, topic)) == [b"before the move"]
    finally:
        moved.stop()
