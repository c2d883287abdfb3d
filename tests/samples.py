"""Deterministic example events built from the schemas themselves (every field set)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from app.events.codec import EVENT_TYPES, SchemaCatalog

_TS = datetime(2026, 11, 27, 12, 0, 0, 123000, tzinfo=UTC)


def _value(schema: Any, name: str, i: int) -> Any:
    if isinstance(schema, list):  # union: pick the first non-null branch
        branches = [b for b in schema if b != "null"]
        return _value(branches[0], name, i)
    if isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-millis":
            return _TS
        kind = schema["type"]
        if kind == "map":
            return {"k": _value(schema["values"], name, i)}
        if kind == "array":
            return [0.25, 0.5]
        if kind == "record":
            return example_fields(schema, i)
        return _value(kind, name, i)
    return {
        "string": f"{name}-{i}",
        "int": 7 + i,
        "long": 1_234_567_890_123 + i,
        "double": 0.5 + i,
        "boolean": True,
        "float": 1.5,
        "bytes": b"\x00\x01",
    }[schema]


def example_fields(schema: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return {field["name"]: _value(field["type"], field["name"], i) for field in schema["fields"]}


def example_event(
    event_type: str, i: int = 0, catalog: SchemaCatalog | None = None
) -> dict[str, Any]:
    catalog = catalog or SchemaCatalog()
    record = example_fields(catalog.current[event_type], i)
    record["event_id"] = str(uuid.uuid5(uuid.NAMESPACE_OID, f"{event_type}-{i}"))
    record["schema_version"] = 1
    return record


ALL_EVENT_TYPES = EVENT_TYPES
