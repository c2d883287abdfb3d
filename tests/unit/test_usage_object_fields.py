"""A usage record may be OpenAI's `usage` object as it is; fields nothing reads are named.

Before: ``prompt_tokens_details.cached_tokens`` was ignored (the cached part of the prompt
priced in full) and a typo such as ``feture`` vanished without a word.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import TollgateError
from app.metering.attribution import resolve_identity
from app.metering.ingest import parse_outcomes, parse_usage_reports

BASE = {"model": "gpt-4o", "prompt_tokens": 100, "completion_tokens": 5}


def _resolve(record: Any) -> Any:
    return resolve_identity({}, record, None)


@pytest.mark.parametrize("details", ["prompt_tokens_details", "input_tokens_details"])
def test_cached_tokens_are_read_from_the_usage_objects_details(details: str) -> None:
    record = {**BASE, "total_tokens": 105, details: {"cached_tokens": 64, "audio_tokens": 0}}
    ignored: dict[str, list[str]] = {}
    (report,) = parse_usage_reports(record, _resolve, ignored=ignored)
    assert report["cached_tokens"] == 64
    assert ignored == {}


def test_a_details_count_that_disagrees_with_cached_tokens_is_a_400() -> None:
    record = {**BASE, "cached_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}}
    with pytest.raises(TollgateError, match=r"prompt_tokens_details\.cached_tokens"):
        parse_usage_reports(record, _resolve)


def test_the_same_count_twice_is_fine() -> None:
    record = {**BASE, "cached_tokens": 64, "prompt_tokens_details": {"cached_tokens": 64}}
    assert parse_usage_reports(record, _resolve)[0]["cached_tokens"] == 64


def test_fields_nothing_reads_are_named_per_record() -> None:
    body = [{**BASE, "feture": "search"}, BASE, {**BASE, "timestamp": "2026-01-01", "zz": 1}]
    ignored: dict[str, list[str]] = {}
    parse_usage_reports(body, _resolve, ignored=ignored)
    assert ignored == {"records[0]": ["feture"], "records[2]": ["timestamp", "zz"]}
    ignored = {}
    parse_outcomes({"outcome": "success", "session_id": "s", "valu": 1}, _resolve, ignored=ignored)
    assert ignored == {"outcomes[0]": ["valu"]}


def test_a_bad_attribution_field_is_named_with_its_record() -> None:
    """Found by a newcomer probe: the second record's too-long user_id came back as
    `user_id`, not `records[1].user_id` as every other field of a batch is named."""
    body = {"records": [BASE, {**BASE, "user_id": "a" * 300}]}
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports(body, _resolve)
    assert caught.value.field == "records[1].user_id"
    assert caught.value.message.startswith("records[1].user_id is longer than 256")
    with pytest.raises(TollgateError) as caught:
        parse_outcomes([{"outcome": "success", "session_id": "s", "feature": 5}], _resolve)
    assert caught.value.field == "outcomes[0].feature"


def test_epoch_seconds_get_a_hint_to_send_milliseconds() -> None:
    import time

    with pytest.raises(TollgateError, match="epoch \\*seconds\\*: send milliseconds"):
        parse_usage_reports({**BASE, "ts": int(time.time())}, _resolve)
    assert parse_usage_reports({**BASE, "ts": int(time.time() * 1000)}, _resolve)
