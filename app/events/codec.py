"""Event encoding: Avro in the Confluent wire format.

Owns the event shapes at run time (loaded from ``schemas/``), their schema ids,
and the bytes on Kafka: ``0x00`` magic byte, 4-byte big-endian schema id, Avro
binary body; and Avro container files of bodies already encoded (``ContainerWriter``,
which the sink hands to ClickHouse). It does not own topics (``app.events.topics``) or producing
(``app.events.producer``).

Schema ids come from a Confluent-compatible Schema Registry when
``TOLLGATE_SCHEMA_REGISTRY_URL`` is set (subjects named after the record's full
name, e.g. ``io.tollgate.events.Usage``), else from the fixed table
``schemas/ids.json``, which ``tollgate schemas register`` regenerates whenever a
schema in ``schemas/`` changes. Every version ever registered is kept under
``schemas/history/`` so old bytes stay readable: a reader always resolves the
writer's version into the current one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import validate
from fastavro.write import Writer

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
EVENT_TYPES = ("Request", "Usage", "BudgetPolicy", "BudgetDecision", "Alert", "Outcome")


class EventDecodeError(Exception):
    """Bytes that are not a decodable Tollgate event. Names where they came from."""

    def __init__(
        self,
        reason: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        self.reason = reason
        self.topic = topic
        self.partition = partition
        self.offset = offset
        where = f"{topic or '?'}[{partition if partition is not None else '?'}]@{offset}"
        super().__init__(f"undecodable event at {where}: {reason}")


class EventEncodeError(ValueError):
    """A record that does not match its schema; the message names the record type."""


class SchemaRegistryError(RuntimeError):
    """The configured Schema Registry could not be used."""


@dataclass(frozen=True)
class SchemaVersion:
    schema_id: int
    name: str  # short name, e.g. "Usage"
    version: int
    fingerprint: str
    file: str  # relative to the schemas dir, e.g. "history/Usage.v1.avsc"


def canonical_fingerprint(schema: Mapping[str, Any]) -> str:
    """CRC-64-AVRO fingerprint of the schema's parsing canonical form."""
    canonical = to_parsing_canonical_form(parse_schema(dict(schema), _write_hint=False))
    return str(fingerprint(canonical, "CRC-64-AVRO"))


def load_schema_file(path: Path) -> dict[str, Any]:
    with path.open() as f:
        schema: dict[str, Any] = json.load(f)
    return schema


class SchemaCatalog:
    """The current schema of every event type and every historical version by id."""

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.schemas_dir = schemas_dir
        self.current: dict[str, dict[str, Any]] = {}
        self.parsed_current: dict[str, Any] = {}
        for name in EVENT_TYPES:
            raw = load_schema_file(schemas_dir / f"{name}.avsc")
            self.current[name] = raw
            self.parsed_current[name] = parse_schema(raw)
        self.versions: dict[int, SchemaVersion] = {}
        self.parsed_by_id: dict[int, Any] = {}
        self.name_by_id: dict[int, str] = {}
        ids_file = schemas_dir / "ids.json"
        table = json.loads(ids_file.read_text()) if ids_file.exists() else {"schemas": []}
        for entry in table["schemas"]:
            version = SchemaVersion(**entry)
            self.versions[version.schema_id] = version
            self.name_by_id[version.schema_id] = version.name
            self.parsed_by_id[version.schema_id] = parse_schema(
                load_schema_file(schemas_dir / version.file)
            )
        self.current_id: dict[str, int] = {}
        for name, raw in self.current.items():
            fp = canonical_fingerprint(raw)
            matches = [v.schema_id for v in self.versions.values() if v.fingerprint == fp]
            if matches:
                self.current_id[name] = max(matches)

    def unregistered(self) -> list[str]:
        """Event types whose current schema has no id yet (run `tollgate schemas register`)."""
        return [name for name in EVENT_TYPES if name not in self.current_id]

    def register_changes(self) -> list[SchemaVersion]:
        """Give every changed schema a new id and freeze a copy under history/.

        Developer tool behind `tollgate schemas register`; ids are never reused.
        """
        added: list[SchemaVersion] = []
        next_id = max(self.versions, default=0) + 1
        for name in self.unregistered():
            version = 1 + max(
                (v.version for v in self.versions.values() if v.name == name), default=0
            )
            rel = f"history/{name}.v{version}.avsc"
            (self.schemas_dir / "history").mkdir(exist_ok=True)
            shutil.copyfile(self.schemas_dir / f"{name}.avsc", self.schemas_dir / rel)
            entry = SchemaVersion(
                schema_id=next_id,
                name=name,
                version=version,
                fingerprint=canonical_fingerprint(self.current[name]),
                file=rel,
            )
            self.versions[next_id] = entry
            added.append(entry)
            next_id += 1
        table = {
            "_comment": "Generated by `tollgate schemas register`. Ids are permanent; never edit.",
            "schemas": [vars(v) for v in sorted(self.versions.values(), key=lambda v: v.schema_id)],
        }
        (self.schemas_dir / "ids.json").write_text(json.dumps(table, indent=2) + "\n")
        return added


class SchemaRegistryClient:
    """Minimal Confluent Schema Registry client (register by subject, fetch by id), cached.

    Blocking HTTP (urllib): it is called once per schema at start-up and once per
    unknown id, never per event.
    """

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SchemaRegistryError(
                f"schema registry {self.url}{path} failed: {exc}. "
                "Check TOLLGATE_SCHEMA_REGISTRY_URL, or unset it to use schemas/ids.json."
            ) from exc

    def register(self, subject: str, schema: Mapping[str, Any]) -> int:
        result = self._call("POST", f"/subjects/{subject}/versions", {"schema": json.dumps(schema)})
        return int(result["id"])

    def fetch(self, schema_id: int) -> dict[str, Any]:
        result = self._call("GET", f"/schemas/ids/{schema_id}")
        schema: dict[str, Any] = json.loads(result["schema"])
        return schema


@dataclass(frozen=True)
class DecodedEvent:
    event_type: str
    schema_id: int
    record: dict[str, Any]


class EventCodec:
    """Encode a record of a named event type; decode any framed Tollgate event."""

    def __init__(
        self, catalog: SchemaCatalog | None = None, registry: SchemaRegistryClient | None = None
    ) -> None:
        self.catalog = catalog or SchemaCatalog()
        self.registry = registry
        self._write_id: dict[str, int] = {}
        self._readers: dict[int, tuple[str, Any]] = {}
        self._resolution: dict[int, Any] = {}  # schema id -> reader schema, None = same
        if registry is None:
            missing = self.catalog.unregistered()
            if missing:
                raise RuntimeError(
                    f"schemas changed without new ids: {', '.join(missing)}; "
                    "run `tollgate schemas register` and commit schemas/"
                )
            self._write_id = dict(self.catalog.current_id)
            for schema_id, name in self.catalog.name_by_id.items():
                self._readers[schema_id] = (name, self.catalog.parsed_by_id[schema_id])
        else:
            for name, raw in self.catalog.current.items():
                schema_id = registry.register(str(self.catalog.parsed_current[name]["name"]), raw)
                self._write_id[name] = schema_id
                self._readers[schema_id] = (name, self.catalog.parsed_current[name])

    def encode(self, event_type: str, record: Mapping[str, Any]) -> bytes:
        try:
            schema = self.catalog.parsed_current[event_type]
            schema_id = self._write_id[event_type]
        except KeyError:
            raise EventEncodeError(
                f"unknown event type {event_type!r}; one of {', '.join(EVENT_TYPES)}"
            ) from None
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC_BYTE, schema_id))
        try:
            schemaless_writer(buf, schema, dict(record))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            detail = str(exc)
            try:
                validate(dict(record), schema, raise_errors=True)
            except Exception as validation_error:
                detail = str(validation_error)
            raise EventEncodeError(
                f"{event_type} record does not match its schema: {detail}"
            ) from exc
        return buf.getvalue()

    def _reader_for(self, schema_id: int) -> tuple[str, Any]:
        known = self._readers.get(schema_id)
        if known is not None:
            return known
        if self.registry is None:
            raise KeyError(schema_id)
        writer = self.registry.fetch(schema_id)
        short = str(writer.get("name", "")).rsplit(".", 1)[-1]
        if short not in self.catalog.parsed_current:
            raise KeyError(schema_id)
        self._readers[schema_id] = (short, parse_schema(writer))
        return self._readers[schema_id]

    def event_type_of(self, schema_id: int) -> str:
        """The event type a schema id belongs to; KeyError if unknown."""
        try:
            return self._reader_for(schema_id)[0]
        except SchemaRegistryError as exc:
            raise KeyError(schema_id) from exc

    def writer_schema(self, schema_id: int) -> Any:
        """The (parsed) schema that ``schema_id``'s events were written with."""
        return self._reader_for(schema_id)[1]

    def _reader_schema(self, schema_id: int, event_type: str) -> Any:
        """The reader schema for resolution, or None when the writer's is the current one.

        Skipping resolution when the two are the same layout saves about a third of the
        decoding time (the sink decodes every event).
        """
        try:
            return self._resolution[schema_id]
        except KeyError:
            pass
        current = self.catalog.parsed_current[event_type]
        _, writer = self._reader_for(schema_id)
        same = to_parsing_canonical_form(writer) == to_parsing_canonical_form(current)
        self._resolution[schema_id] = None if same else current
        return self._resolution[schema_id]

    def decode(
        self,
        data: bytes | None,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> DecodedEvent:
        def error(reason: str) -> EventDecodeError:
            return EventDecodeError(reason, topic=topic, partition=partition, offset=offset)

        if not data or len(data) < _HEADER.size:
            raise error(f"{len(data or b'')} bytes is shorter than the 5-byte header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise error(f"magic byte {magic} is not 0 (not Confluent-framed Avro)")
        try:
            event_type, writer = self._reader_for(schema_id)
        except KeyError:
            raise error(f"unknown schema id {schema_id}") from None
        except SchemaRegistryError as exc:
            raise error(str(exc)) from exc
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            record = schemaless_reader(body, writer, self._reader_schema(schema_id, event_type))
        except Exception as exc:  # fastavro raises a wide range of errors on garbage
            raise error(
                f"{event_type} body (schema id {schema_id}) is corrupt: {type(exc).__name__}: {exc}"
            ) from exc
        if body.tell() != len(data):
            raise error(f"{len(data) - body.tell()} trailing bytes after a {event_type} record")
        if not isinstance(record, dict):
            raise error(f"{event_type} body did not decode to a record")
        return DecodedEvent(event_type=event_type, schema_id=schema_id, record=record)


def _avro_long_bytes(value: int) -> bytes:
    """An Avro long (zig-zag varint), the inverse of ``_avro_long``."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


class ContainerWriter:
    """Avro object container files of one block from bodies already encoded (as they come
    from Kafka, without the Confluent header): the sink hands them to ClickHouse's
    ``Avro`` input format without decoding and re-encoding each event. The file header
    (schema, sync marker) is written by fastavro once per schema id."""

    def __init__(self, codec: EventCodec) -> None:
        self.codec = codec
        self._headers: dict[int, tuple[bytes, bytes]] = {}  # schema id -> (header, sync)

    def container(self, schema_id: int, bodies: list[bytes]) -> bytes:
        if schema_id not in self._headers:
            sync = os.urandom(16)
            buffer = io.BytesIO()
            writer = Writer(
                buffer, parse_schema(self.codec.writer_schema(schema_id)), sync_marker=sync
            )
            writer.flush()
            self._headers[schema_id] = (buffer.getvalue(), sync)
        header, sync = self._headers[schema_id]
        data = b"".join(bodies)
        return header + _avro_long_bytes(len(bodies)) + _avro_long_bytes(len(data)) + data + sync


class FrameError(ValueError):
    """Bytes that are not a Confluent-framed Tollgate event (read without decoding the body)."""


def _avro_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zig-zag varint) at ``pos``: (value, next position)."""
    shift = result = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise FrameError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def event_key(body: bytes) -> tuple[str, int]:
    """``event_id`` and ``ts`` (epoch ms) of an Avro event body, without decoding the rest:
    every Tollgate schema starts with these two fields (a test guards it)."""
    length, pos = _avro_long(body, 0)
    if length < 0 or pos + length > len(body):
        raise FrameError(f"event_id length {length} does not fit in {len(body)} bytes")
    try:
        event_id = body[pos : pos + length].decode()
    except UnicodeDecodeError as exc:
        raise FrameError(f"event_id is not UTF-8: {exc}") from None
    millis, _ = _avro_long(body, pos + length)
    return event_id, millis


def split_frame(data: bytes | None) -> tuple[int, bytes]:
    """(schema id, Avro body) of a framed event, reading only the 5-byte Confluent header."""
    if not data or len(data) < _HEADER.size or data[0] != MAGIC_BYTE:
        raise FrameError("not Confluent-framed Avro (magic byte 0 and a schema id)")
    return _HEADER.unpack_from(data)[1], data[_HEADER.size :]


def event_id_of(data: bytes | None) -> str:
    """The ``event_id`` of a framed event (Confluent header + Avro body)."""
    return event_key(split_frame(data)[1])[0]


def build_codec(schema_registry_url: str | None) -> EventCodec:
    """The codec the settings ask for."""
    registry = SchemaRegistryClient(schema_registry_url) if schema_registry_url else None
    return EventCodec(SchemaCatalog(), registry)
