"""Schemas evolve only backward-compatibly: the current reader reads every older writer.

Checked against every version frozen in schemas/history/ and, when this is a git
checkout, against the version of each schema in the last commit (HEAD).
"""

import io
import json
import subprocess
from pathlib import Path

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from app.events.codec import EVENT_TYPES, SCHEMAS_DIR, SchemaCatalog, load_schema_file
from tests.samples import example_fields

CATALOG = SchemaCatalog()


def _round_trip(writer: dict, reader: dict) -> dict:
    record = example_fields(writer)
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(writer), record)
    buf.seek(0)
    return schemaless_reader(buf, parse_schema(writer), parse_schema(reader))


@pytest.mark.parametrize("schema_id", sorted(CATALOG.versions))
def test_current_schema_reads_every_registered_version(schema_id: int) -> None:
    version = CATALOG.versions[schema_id]
    writer = json.loads((SCHEMAS_DIR / version.file).read_text())
    result = _round_trip(writer, CATALOG.current[version.name])
    for field in CATALOG.current[version.name]["fields"]:
        assert field["name"] in result


def _committed(name: str) -> dict | None:
    path = Path("schemas") / f"{name}.avsc"
    try:
        out = subprocess.run(
            ["git", "show", f"HEAD:{path}"],
            cwd=SCHEMAS_DIR.parent,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    return json.loads(out)


@pytest.mark.parametrize("name", EVENT_TYPES)
def test_current_schema_reads_last_committed_version(name: str) -> None:
    committed = _committed(name)
    if committed is None:
        pytest.skip("no committed version of this schema yet")
    _round_trip(committed, CATALOG.current[name])


def test_new_fields_need_defaults_is_enforced() -> None:
    """The guard really fails when a field is added without a default."""
    writer = CATALOG.current["Outcome"]
    broken = json.loads(json.dumps(writer))
    broken["fields"].append({"name": "brand_new", "type": "string"})
    with pytest.raises(Exception, match="brand_new"):
        _round_trip(writer, broken)


def test_every_schema_version_starts_with_event_id_and_ts() -> None:
    """The sink reads these two fields straight from the Avro body of every event."""
    catalog = SchemaCatalog()
    schemas = [*catalog.current.values()]
    schemas += [load_schema_file(catalog.schemas_dir / v.file) for v in catalog.versions.values()]
    for schema in schemas:
        first, second = schema["fields"][:2]
        assert (first["name"], first["type"]) == ("event_id", "string"), schema["name"]
        assert second["name"] == "ts" and second["type"]["type"] == "long", schema["name"]
        assert second["type"]["logicalType"] == "timestamp-millis", schema["name"]


def test_usage_written_before_explored_reads_as_not_explored() -> None:
    """Usage v3 (schema id 10, dispatchers before exploration was reported) reads with
    explored=false; v4 (id 14) carries it."""
    v3 = json.loads((SCHEMAS_DIR / CATALOG.versions[10].file).read_text())
    assert "explored" not in {f["name"] for f in v3["fields"]}
    assert _round_trip(v3, CATALOG.current["Usage"])["explored"] is False
    v4 = json.loads((SCHEMAS_DIR / CATALOG.versions[14].file).read_text())
    record = example_fields(v4)
    record["explored"] = True
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(v4), record)
    buf.seek(0)
    read = schemaless_reader(buf, parse_schema(v4), parse_schema(CATALOG.current["Usage"]))
    assert read["explored"] is True


def test_a_policy_written_before_file_digest_reads_without_one() -> None:
    """BudgetPolicy v1 (schema id 3, dispatchers before F1 of probe 54) reads with
    file_digest null (``file_digest_of`` then recognises a file's record by updated_by)."""
    v1 = json.loads((SCHEMAS_DIR / CATALOG.versions[3].file).read_text())
    assert "file_digest" not in {f["name"] for f in v1["fields"]}
    assert _round_trip(v1, CATALOG.current["BudgetPolicy"])["file_digest"] is None
