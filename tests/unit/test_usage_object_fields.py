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


# -- OpenAI's usage object nested under `usage` ------------------------------------------
# The README said the usage object "can be posted as it is", and a service posts
# {"model": resp.model, "usage": resp.usage.model_dump(), ...}: that was a 400
# "records[0].prompt_tokens is required", with not a word about `usage`.

CHAT_USAGE = {  # openai.types.CompletionUsage(...).model_dump()
    "prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
    "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 64},
    "completion_tokens_details": {
        "accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}  # fmt: skip
RESPONSES_USAGE = {  # openai.types.responses.ResponseUsage(...).model_dump()
    "input_tokens": 100, "output_tokens": 5, "total_tokens": 105,
    "input_tokens_details": {"cached_tokens": 64, "cache_write_tokens": 0},
    "output_tokens_details": {"reasoning_tokens": 2},
}  # fmt: skip
FLAT = {"model": "gpt-4o", "user_id": "u", "prompt_tokens": 100, "completion_tokens": 5,
        "cached_tokens": 64}  # fmt: skip


def _counts(report: dict[str, Any]) -> tuple[int, int, int]:
    return report["prompt_tokens"], report["completion_tokens"], report["cached_tokens"]


@pytest.mark.parametrize("usage", [CHAT_USAGE, RESPONSES_USAGE], ids=["chat", "responses"])
def test_a_nested_usage_object_counts_as_its_fields_at_the_top_level(usage: dict) -> None:
    ignored: dict[str, list[str]] = {}
    (nested,) = parse_usage_reports(
        {"model": "gpt-4o", "usage": usage, "user_id": "u"}, _resolve, ignored=ignored
    )
    (flat,) = parse_usage_reports(FLAT, _resolve)
    assert _counts(nested) == _counts(flat) == (100, 5, 64)
    assert ignored == {}  # `usage` is read, not named back as a field nothing reads


def test_the_probes_record_with_a_nested_usage_is_accepted() -> None:
    record = {
        "model": "gpt-4o",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "user_id": "u",
    }
    (report,) = parse_usage_reports(record, _resolve)
    assert _counts(report) == (10, 5, 0)


def test_a_count_given_nested_and_at_the_top_level_alike_is_fine() -> None:
    record = {**FLAT, "usage": CHAT_USAGE, "total_tokens": 105}
    assert _counts(parse_usage_reports(record, _resolve)[0]) == (100, 5, 64)


@pytest.mark.parametrize(
    ("top", "usage", "named", "other"),
    [
        ({"prompt_tokens": 12}, {}, "usage.prompt_tokens", "prompt_tokens (12)"),
        ({"completion_tokens": 7}, {}, "usage.completion_tokens", "completion_tokens (7)"),
        ({"total_tokens": 1}, {}, "usage.total_tokens", "total_tokens (1)"),
        (
            {"cached_tokens": 3},
            {},
            "usage.prompt_tokens_details.cached_tokens",
            "cached_tokens (3)",
        ),
        (
            {"prompt_tokens_details": {"cached_tokens": 3}},
            {},
            "usage.prompt_tokens_details.cached_tokens",
            "prompt_tokens_details.cached_tokens (3)",
        ),
        (
            {"input_tokens": 99},
            {"input_tokens": 100, "prompt_tokens": None},
            "usage.input_tokens",
            "input_tokens (99)",
        ),
    ],
)
def test_a_count_given_nested_and_at_the_top_level_differently_is_a_400_naming_both(
    top: dict, usage: dict, named: str, other: str
) -> None:
    record = {"model": "gpt-4o", "usage": {**CHAT_USAGE, **usage}, **top}
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports(record, _resolve)
    assert caught.value.field == f"records[0].{named}", caught.value.message
    assert caught.value.message.startswith(f"records[0].{named} ("), caught.value.message
    assert other in caught.value.message, caught.value.message


@pytest.mark.parametrize("usage", [5, "x", [1], True])
def test_a_usage_that_is_not_an_object_is_a_400_naming_it(usage: Any) -> None:
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports([BASE, {"model": "gpt-4o", "usage": usage}], _resolve)
    assert caught.value.field == "records[1].usage"
    assert "must be an object" in caught.value.message


def test_a_bad_count_inside_usage_is_named_with_usage() -> None:
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports(
            {"model": "gpt-4o", "usage": {**CHAT_USAGE, "prompt_tokens": -1}}, _resolve
        )
    assert caught.value.field == "records[0].usage.prompt_tokens"
    assert caught.value.message.startswith("records[0].usage.prompt_tokens must be ")


def test_a_null_usage_is_absent_and_an_empty_one_says_where_counts_go() -> None:
    assert parse_usage_reports({**BASE, "usage": None}, _resolve)
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports({"model": "gpt-4o", "usage": {}}, _resolve)
    assert caught.value.field == "records[0].prompt_tokens"
    assert "usage" in caught.value.message


def test_fields_of_a_nested_usage_nothing_reads_are_named() -> None:
    """A typo inside ``usage`` (``prompt_token_details``) dropped the cached tokens with
    ``ignored_fields`` empty, as did another vendor's names (Anthropic's
    ``cache_read_input_tokens``): named back as ``usage.<field>`` (a review). OpenAI's own
    fields are read, so an SDK's dump names nothing."""
    record = {
        "model": "gpt-4o", "user_id": "u",
        "usage": {"prompt_tokens": 100, "completion_tokens": 5,
                  "prompt_token_details": {"cached_tokens": 64},
                  "cache_read_input_tokens": 64},
    }  # fmt: skip
    ignored: dict[str, list[str]] = {}
    parse_usage_reports(record, _resolve, ignored=ignored)
    assert ignored == {
        "records[0]": ["usage.cache_read_input_tokens", "usage.prompt_token_details"]
    }
    from openai.types import CompletionUsage

    dumped = CompletionUsage(prompt_tokens=100, completion_tokens=5, total_tokens=105)
    ignored = {}
    parse_usage_reports(
        {"model": "gpt-4o", "user_id": "u", "usage": dumped.model_dump()}, _resolve, ignored=ignored
    )
    assert ignored == {}
