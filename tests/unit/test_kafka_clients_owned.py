"""Kafka clients are built in one place: ``app/events/clients.py``.

Scans the source of the service, the agents and the developer tools: an aiokafka producer,
consumer or admin client constructed anywhere else (directly, through the module, or under
another name) fails here, with where it is and what to call instead. Faust builds its own
clients inside the library; those are not in our source and stay Faust's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("app", "agents", "devtools")
OWNER = ROOT / "app" / "events" / "clients.py"
CLIENT_CLASSES = frozenset({"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"})


def constructions(source: str) -> list[tuple[int, str]]:
    """(line, class) of every aiokafka client constructed in ``source``, also under an alias."""
    tree = ast.parse(source)
    names = set(CLIENT_CLASSES)
    for node in ast.walk(tree):  # `from aiokafka import AIOKafkaProducer as Producer`
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname for a in node.names if a.name in CLIENT_CLASSES and a.asname}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = (
            func.id
            if isinstance(func, ast.Name)
            else func.attr
            if isinstance(func, ast.Attribute)
            else None
        )
        if called in names:
            found.append((node.lineno, called))
    return found


def test_the_scan_finds_a_construction_in_every_spelling() -> None:
    source = """
import aiokafka
from aiokafka import AIOKafkaProducer, AIOKafkaConsumer as Reader
from aiokafka.admin import AIOKafkaAdminClient

def build(p: AIOKafkaProducer) -> None:  # an annotation is not a construction
    AIOKafkaProducer(bootstrap_servers="x")
    Reader("topic")
    aiokafka.AIOKafkaConsumer("topic")
    AIOKafkaAdminClient()
"""
    assert [line for line, _ in constructions(source)] == [7, 8, 9, 10]


def test_the_owner_module_is_where_clients_are_built() -> None:
    built = {name for _, name in constructions(OWNER.read_text())}
    assert built == CLIENT_CLASSES, "the scan would pass vacuously if the owner built none"


@pytest.mark.parametrize("package", SCANNED)
def test_no_kafka_client_is_constructed_outside_the_owner(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == OWNER:
            continue
        for line, name in constructions(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line} constructs {name}")
    assert not offenders, (
        "build Kafka clients with app.events.clients (producer / consumer / admin), which owns "
        "their shared settings:\n" + "\n".join(offenders)
    )
