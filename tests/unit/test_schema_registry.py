"""The Schema Registry code path, against a minimal local registry speaking the Confluent API."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.events.codec import (
    EventCodec,
    EventDecodeError,
    SchemaCatalog,
    SchemaRegistryClient,
    SchemaRegistryError,
)
from tests.samples import example_event


class Registry(BaseHTTPRequestHandler):
    schemas: dict[int, str] = {}
    ids: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        schema = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["schema"]
        canonical = json.dumps(json.loads(schema), sort_keys=True)
        schema_id = self.ids.setdefault(canonical, 100 + len(self.ids))
        self.schemas[schema_id] = schema
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        schema_id = int(self.path.rsplit("/", 1)[-1])
        if schema_id not in self.schemas:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})
        else:
            self._reply(200, {"schema": self.schemas[schema_id]})


@pytest.fixture
def registry_url() -> Iterator[str]:
    Registry.schemas, Registry.ids = {}, {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_registry_ids_are_used_on_the_wire_and_resolved_on_read(registry_url: str) -> None:
    writer = EventCodec(SchemaCatalog(), SchemaRegistryClient(registry_url))
    data = writer.encode("Usage", example_event("Usage"))
    assert int.from_bytes(data[1:5], "big") >= 100, "the registry's id, not the fixed table's"
    reader = EventCodec(SchemaCatalog(), SchemaRegistryClient(registry_url))
    assert reader.decode(data).record == example_event("Usage")


def test_unknown_registry_id_is_a_typed_decode_error(registry_url: str) -> None:
    codec = EventCodec(SchemaCatalog(), SchemaRegistryClient(registry_url))
    with pytest.raises(EventDecodeError, match=r"tollgate\.usage"):
        codec.decode(b"\x00\x00\x00\x03\xe7abc", topic="tollgate.usage", offset=3)


def test_unreachable_registry_says_which_setting_to_check() -> None:
    with pytest.raises(SchemaRegistryError, match="TOLLGATE_SCHEMA_REGISTRY_URL"):
        EventCodec(SchemaCatalog(), SchemaRegistryClient("http://127.0.0.1:9", timeout_s=1))
