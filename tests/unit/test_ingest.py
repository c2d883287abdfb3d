from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.errors import TollgateError
from app.http.errors import http_error
from app.metering.attribution import Identity
from app.metering.ingest import (
    MAX_BATCH,
    IdentityResolver,
    TimeWindow,
    parse_outcomes,
    parse_usage_reports,
)
from app.metering.usage import new_id


def resolve(record: object) -> Identity:
    assert isinstance(record, dict)
    return Identity(record.get("user_id") or "anonymous", feature=record.get("feature"))


def test_single_list_and_wrapped_batches() -> None:
    one = {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "user_id": "u"}
    assert len(parse_usage_reports(one, resolve)) == 1
    assert len(parse_usage_reports([one, one], resolve)) == 2
    assert len(parse_usage_reports({"records": [one] * 3}, resolve)) == 3


def test_openai_and_anthropic_style_token_names() -> None:
    [report] = parse_usage_reports(
        {"model": "m", "input_tokens": 3, "output_tokens": 4, "ts": "2026-01-31T12:00:00Z"},
        resolve,
        window=TimeWindow(now=datetime(2026, 1, 31, 13, tzinfo=UTC)),
    )
    assert (report["prompt_tokens"], report["completion_tokens"]) == (3, 4)
    assert report["ts"] == datetime(2026, 1, 31, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("record", "param"),
    [
        ({"prompt_tokens": 1, "completion_tokens": 1}, "records[1].model"),
        ({"model": "m", "completion_tokens": 1}, "records[1].prompt_tokens"),
        ({"model": "m", "prompt_tokens": -1, "completion_tokens": 1}, "records[1].prompt_tokens"),
        (
            {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "cached_tokens": 5},
            "records[1].cached_tokens",
        ),
        (
            {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "ts": "yesterday"},
            "records[1].ts",
        ),
        (
            {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "status": "meh"},
            "records[1].status",
        ),
        (
            {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "metadata": {"a": 1}},
            "records[1].metadata",
        ),
    ],
)
def test_one_bad_record_rejects_the_whole_batch_naming_it(record: dict, param: str) -> None:
    good = {"model": "m", "prompt_tokens": 1, "completion_tokens": 1}
    with pytest.raises(TollgateError) as info:
        parse_usage_reports([good, record], resolve)
    assert http_error(info.value).status == 400
    assert info.value.field == param


@pytest.mark.parametrize("model", ["   ", "\t", " \t "])
def test_a_blank_model_is_refused_saying_so(model: str) -> None:
    """A newcomer probe: a report of model "   " was accepted (202) as an unpriced call,
    its spend out of the reports' totals and a blank row in spend by model."""
    record = {"model": model, "prompt_tokens": 1, "completion_tokens": 1}
    with pytest.raises(TollgateError) as caught:
        parse_usage_reports(record, resolve)
    assert http_error(caught.value).status == 400
    assert caught.value.field == "records[0].model"
    assert "not empty or only spaces" in caught.value.message, caught.value.message


@pytest.mark.parametrize("model", [" gpt-4o", "gpt-4o ", "\tgpt-4o \t"])
def test_a_model_with_spaces_around_it_is_that_model(model: str) -> None:
    """The same probe: " gpt-4o" was stored as a model of its own (unpriced, charged by
    budgets at the fallback price); it is gpt-4o, as a padded user id is that user."""
    [report] = parse_usage_reports(
        {"model": model, "prompt_tokens": 1, "completion_tokens": 1}, resolve
    )
    assert report["model"] == "gpt-4o"


def test_the_model_asked_for_is_spelled_as_the_model_served_is() -> None:
    """``model`` was trimmed and ``model_requested`` was not: "gpt-4o " asked for was an
    unpriced model of its own (no routing saving, a row of its own in the routing report)
    and " auto" slipped past the refusal of the router's alias. Both are in the one
    spelling of an id (``normal_id``: trimmed, NFC), as a user or request id is: a model
    named in decomposed Unicode is the one its price override names composed."""
    composed, decomposed = "mod\u00e8le-7b", "mode\u0300le-7b"
    [report] = parse_usage_reports(
        {"model": decomposed, "model_requested": " gpt-4o\t", "prompt_tokens": 1,
         "completion_tokens": 1},
        resolve,
    )  # fmt: skip
    assert (report["model"], report["model_requested"]) == (composed, "gpt-4o")
    [report] = parse_usage_reports(
        {"model": "m", "model_requested": f" {decomposed}", "prompt_tokens": 1,
         "completion_tokens": 1},
        resolve,
    )  # fmt: skip
    assert report["model_requested"] == composed
    [report] = parse_usage_reports(
        {"model": "m", "model_requested": "  ", "prompt_tokens": 1, "completion_tokens": 1},
        resolve,
    )
    assert report["model_requested"] is None  # blank: not given, as "" was


def test_future_timestamps_are_refused() -> None:
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    with pytest.raises(TollgateError, match="future"):
        parse_usage_reports(
            {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "ts": future}, resolve
        )


def test_batch_limit() -> None:
    with pytest.raises(TollgateError, match=str(MAX_BATCH)):
        parse_usage_reports([{}] * (MAX_BATCH + 1), resolve)


def test_outcomes() -> None:
    [outcome] = parse_outcomes(
        {"session_id": "s1", "outcome": "success", "kind": "ticket_resolved", "value_usd": 12.5},
        resolve,
    )
    assert outcome["value_usd_nanos"] == 12_500_000_000
    assert outcome["user_id"] is None
    with pytest.raises(TollgateError, match="request_id"):
        parse_outcomes({"outcome": "success"}, resolve)
    with pytest.raises(TollgateError, match="outcome"):
        parse_outcomes({"request_id": "r", "outcome": "great"}, resolve)
    with pytest.raises(TollgateError, match="value_usd"):
        parse_outcomes({"request_id": "r", "outcome": "success", "value_usd": -3}, resolve)


def test_an_outcome_value_may_be_a_decimal_string_as_a_budget_limit_may() -> None:
    """``value_usd: "1.00"`` was a 400 while ``limit_usd: "19.99"`` is a limit (a newcomer
    probe): money is read one way, a number or a decimal string (cents kept exact)."""
    for text, nanos in (("1.00", 10**9), ("19.99", 19_990_000_000), (" 5 ", 5 * 10**9),
                        (".5", 5 * 10**8), ("0", 0), ("1e3", 10**12)):  # fmt: skip
        [outcome] = parse_outcomes(
            {"request_id": "r", "outcome": "success", "value_usd": text}, resolve
        )
        assert outcome["value_usd_nanos"] == nanos, text
    for text in ("", "x", "NaN", "Infinity", "-1", "-0.01", "+5", "1,000", "$5", "1e10"):
        with pytest.raises(TollgateError) as info:
            parse_outcomes({"request_id": "r", "outcome": "success", "value_usd": text}, resolve)
        assert info.value.field == "outcomes[0].value_usd", text
        assert "decimal string" in info.value.message or "from 0" in info.value.message, (
            info.value.message
        )
    for value in (-3, float("nan"), float("inf"), True, [1], {"usd": 1}):
        with pytest.raises(TollgateError, match="value_usd"):
            parse_outcomes({"request_id": "r", "outcome": "success", "value_usd": value}, resolve)


@pytest.mark.parametrize("value", [0.0000000001, "0.0000000001", "1e-10", "0.0000000005"])
def test_an_outcome_value_that_would_be_held_as_zero_is_refused(value: Any) -> None:
    """A probe: 0.0000000001 was accepted and kept as $0. Money is held in whole
    nano-dollars; a non-zero value below half of one is a 400 naming the resolution, as a
    budget limit's is."""
    with pytest.raises(TollgateError) as info:
        parse_outcomes({"request_id": "r", "outcome": "success", "value_usd": value}, resolve)
    assert info.value.field == "outcomes[0].value_usd"
    assert "$0.000000001 resolution" in info.value.message, info.value.message


@pytest.mark.parametrize(
    ("value", "nanos"),
    [(4.5000000001, 4_500_000_000), ("4.5000000004", 4_500_000_000),
     ("12.3456789016", 12_345_678_902), (100 / 30, 3_333_333_333)],
)  # fmt: skip
def test_an_outcome_value_with_finer_digits_is_rounded_to_the_nano_dollar(
    value: Any, nanos: int
) -> None:
    """Finer digits of a larger value are rounded where it is held (documented): refusing
    them would refuse a float from ordinary arithmetic (100 / 30 has 16 digits)."""
    [outcome] = parse_outcomes(
        {"request_id": "r", "outcome": "success", "value_usd": value}, resolve
    )
    assert outcome["value_usd_nanos"] == nanos


@pytest.mark.parametrize(
    ("value", "nanos"),
    [(4.35, 4_350_000_000), (0.1, 100_000_000), ("4.500000001", 4_500_000_001),
     (1e-9, 1), ("4.5000000000000", 4_500_000_000), ("0e-20", 0), (1e9, 10**18)],
)  # fmt: skip
def test_an_outcome_value_in_whole_nano_dollars_is_kept_exactly(value: Any, nanos: int) -> None:
    """A float is read by its shortest repr (the JSON text): 4.35 is 4.35, not the binary
    4.3499999999999996447..."""
    [outcome] = parse_outcomes(
        {"request_id": "r", "outcome": "success", "value_usd": value}, resolve
    )
    assert outcome["value_usd_nanos"] == nanos


def test_null_optional_fields_count_as_absent() -> None:
    """Clients send explicit nulls for fields they do not have; that must not be a 400."""
    record = {
        "model": "m",
        "prompt_tokens": 3,
        "input_tokens": None,
        "completion_tokens": 2,
        "cached_tokens": None,
        "latency_ms": None,
        "request_id": None,
        "provider": None,
        "model_requested": None,
        "metadata": None,
        "ts": None,
    }
    [report] = parse_usage_reports(record, resolve)
    assert (report["cached_tokens"], report["latency_ms"], report["metadata"]) == (0, 0, {})
    assert report["provider"] is None and report["request_id"].startswith("rep_")


def test_a_token_count_written_as_an_integral_number_is_that_integer() -> None:
    """Session 13's fuzzing: `completion_tokens: 20920.0` was refused, though JSON has one
    number type and the OpenAPI document's `integer` admits it. A count with a fraction,
    a string or a bool is still refused."""
    [report] = parse_usage_reports(
        {"model": "m", "prompt_tokens": 12.0, "completion_tokens": 20920.0, "cached_tokens": 2.0},
        resolve,
    )
    assert (report["prompt_tokens"], report["completion_tokens"]) == (12, 20920)
    assert report["cached_tokens"] == 2 and type(report["prompt_tokens"]) is int
    for bad in (1.5, "12", True, float("nan"), 1e300):
        with pytest.raises(TollgateError) as info:
            parse_usage_reports(
                {"model": "m", "prompt_tokens": bad, "completion_tokens": 1}, resolve
            )
        assert http_error(info.value).status == 400


def test_a_header_naming_another_owner_than_a_record_is_refused_naming_the_record() -> None:
    """Probe J: a /v1/usage batch sent with `X-Tollgate-User: svc` charged alice's and bob's
    records to svc without a word (202). A record names its own owner: a header that says
    otherwise is a 400 naming the record's field; one that agrees, or a record that says
    nothing, is fine."""
    from app.metering.attribution import resolve_identity

    def by_header(headers: dict[str, str]) -> IdentityResolver:
        return lambda record: resolve_identity(headers, record, None, refuse_conflicts=True)

    record = {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5}
    batch = [{**record, "user_id": "alice", "feature": "f"}, {**record, "user_id": "bob"}]
    with pytest.raises(TollgateError) as refused:
        parse_usage_reports(batch, by_header({"X-Tollgate-User": "alice"}))
    assert http_error(refused.value).status == 400
    assert refused.value.field == "records[1].user_id"
    assert "'X-Tollgate-User'" in refused.value.message and "'bob'" in refused.value.message
    with pytest.raises(TollgateError) as refused:
        parse_usage_reports(batch, by_header({"X-Tollgate-Feature": "g"}))
    assert refused.value.field == "records[0].feature"
    agreeing = parse_usage_reports(
        [{**record, "user_id": "alice"}, record], by_header({"X-Tollgate-User": "alice"})
    )
    assert [r["identity"].user_id for r in agreeing] == ["alice", "alice"]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(" pj-ws ", "pj-ws"), ("\tpj-ws", "pj-ws"), ("Zoe\u0308", "Zo\u00eb"), ("   ", None)],
)
def test_an_id_has_one_spelling_whether_it_came_by_header_or_body(
    sent: str, kept: str | None
) -> None:
    """Probe J: a header's value arrives trimmed and a body's did not, so " pj-ws " and
    "pj-ws" were two users, "   " a user of its own; "Zoë" typed two Unicode ways was two
    users shown alike."""
    from app.metering.attribution import ANONYMOUS_USER, resolve_identity

    identity = resolve_identity({}, {"user": sent, "feature": sent, "session_id": sent}, None)
    assert identity.user_id == (kept or ANONYMOUS_USER)
    assert identity.feature == kept and identity.session_id == kept


def test_the_label_reports_give_a_missing_id_is_not_an_id() -> None:
    """Probe J: a feature named "(none)" read exactly like calls without a feature."""
    from app.metering.attribution import resolve_identity

    for field in ("user", "feature", "session_id"):
        with pytest.raises(TollgateError, match="reports show"):
            resolve_identity({}, {field: "(none)"}, None)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(" r-1 ", "r-1"), ("Zoe\u0308-1", "Zo\u00eb-1"), ("   ", None)],
)
def test_a_linking_id_has_one_spelling_as_attribution_ids_do(sent: str, kept: str | None) -> None:
    """Session 19's closing note: a request id was kept as sent, so a usage retry that
    trimmed it (or spelt "Zoë" the other Unicode way) was another call, counted twice, and an
    outcome naming a session "Zoë" missed the spend attributed to "Zoë"."""
    [usage] = parse_usage_reports(
        {"model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1, "request_id": sent},
        resolve,
    )
    if kept is None:
        assert usage["request_id"].startswith("rep_")  # blank: no id given, one is made
    else:
        assert usage["request_id"] == kept
        [again] = parse_usage_reports(
            {"model": "gpt-4o", "prompt_tokens": 1, "completion_tokens": 1, "request_id": kept},
            resolve,
        )
        assert again["event_id"] == usage["event_id"]  # the retry is the same event
    outcome = {"outcome": "success", "request_id": sent, "session_id": sent}
    if kept is None:  # blank ids link to nothing: the outcome names what to send
        with pytest.raises(TollgateError, match="request_id or session_id is required"):
            parse_outcomes(outcome, resolve)
    else:
        [parsed] = parse_outcomes(outcome, resolve)
        assert parsed["request_id"] == kept and parsed["session_id"] == kept


def test_a_report_of_a_call_the_gateway_served_keeps_that_calls_event_id() -> None:
    """A reviewer: once a report's event id became its user's, a report naming a served
    call's X-Request-Id at another dispatcher (which cannot 409 it) got an id of its own,
    and the call was counted twice. A gateway id keeps the call's own usage event id."""
    from app.metering.usage import GATEWAY_REQUEST_ID, reported_event_id, usage_event_id

    served = new_id("req_")  # as the dispatcher names its calls
    assert GATEWAY_REQUEST_ID.fullmatch(served)
    assert reported_event_id("alice", served) == usage_event_id(served)
    assert reported_event_id("bob", served) == usage_event_id(served)
    # a client's own ids are its user's
    assert reported_event_id("alice", "job-42") != reported_event_id("bob", "job-42")
    assert reported_event_id("alice", "req_42") != usage_event_id("req_42")


def test_a_retry_of_a_record_reported_before_the_upgrade_keeps_its_event_id() -> None:
    """A reviewer: report ids became their user's in session 37, so a retry of a record
    accepted before the upgrade (read back by the dispatcher at its start) got a new event
    id and was counted again. It keeps the old one, and is a repeat."""
    from app.metering.ingest import ReportedRequests
    from app.metering.usage import usage_event_id

    reported = ReportedRequests()
    reported.remember_usage(
        {
            "source": "usage_api", "request_id": "r-old", "event_id": usage_event_id("r-old"),
            "user_id": "u", "feature": None, "model_served": "gpt-4o", "prompt_tokens": 10,
            "completion_tokens": 5, "cached_tokens": 0, "cache_hit": False, "status": "ok",
        }
    )  # fmt: skip
    record = {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "user_id": "u"}
    reports = parse_usage_reports({**record, "request_id": "r-old"}, resolve)
    reported.check(reports, {0})
    assert reports[0]["event_id"] == usage_event_id("r-old")
    assert reported.repeats(reports, {0}) == {0}
    # another record under the id is not that record: an id of its own
    other = parse_usage_reports({**record, "prompt_tokens": 11, "request_id": "r-old"}, resolve)
    reported.check(other, {0})
    assert other[0]["event_id"] != usage_event_id("r-old")


def _read_back(request_id: str) -> dict[str, object]:
    """A Usage event of a /v1/usage report of user u, as a starting dispatcher reads it back."""
    from app.metering.usage import reported_event_id

    return {
        "source": "usage_api", "request_id": request_id,
        "event_id": reported_event_id("u", request_id), "user_id": "u",
        "feature": None, "model_served": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5,
        "cached_tokens": 0, "cache_hit": False, "status": "ok",
    }  # fmt: skip


def test_a_large_read_back_does_not_push_live_reports_out_of_the_repeat_memory() -> None:
    """Review 59 finding 6: the ids of /v1/usage reports accepted here (live) and those read
    back at the start shared one window of the last 10,000 ids. A read-back that finished
    after live reports (Kafka answering late: it runs in the background) pushed the live ids
    out, and a retry of a live report was emitted and held at the gate again, the user
    charged twice until a decision counted it. Live ids are kept apart: a read-back, however
    large, evicts only ids it read."""
    from app.errors import Conflict
    from app.metering.ingest import ReportedRequests

    reported = ReportedRequests()
    record = {"model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "user_id": "u"}
    live = parse_usage_reports({**record, "request_id": "live-1"}, resolve)
    reported.check(live, {0})
    assert reported.repeats(live, {0}) == set()
    reported.remember(live, {0})
    for n in range(reported.capacity + 1):  # a large read-back, after the live report
        reported.remember_usage(_read_back(f"read-{n}"))
    retry = parse_usage_reports({**record, "request_id": "live-1"}, resolve)
    reported.check(retry, {0})
    assert reported.repeats(retry, {0}) == {0}, "a retry of a live report was not a repeat"
    # another record under the live id is still a 409
    other = parse_usage_reports({**record, "prompt_tokens": 11, "request_id": "live-1"}, resolve)
    with pytest.raises(Conflict):
        reported.check(other, {0})
    # the newest ids read back are known too (a retry of one is a repeat) ...
    newest = f"read-{reported.capacity}"
    again = parse_usage_reports({**record, "request_id": newest}, resolve)
    reported.check(again, {0})
    assert reported.repeats(again, {0}) == {0}
    # ... and live reports do not push them out either
    for n in range(reported.capacity + 1):
        more = parse_usage_reports({**record, "request_id": f"live-more-{n}"}, resolve)
        reported.remember(more, {0})
    assert reported.repeats(again, {0}) == {0}
