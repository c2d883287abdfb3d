"""Budget policies: validation that names the field to fix, defaults per scope kind, evaluation."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from app.budgets.periods import Period
from app.budgets.policy import (
    DEFAULT_THRESHOLDS,
    Policy,
    PolicyBook,
    PolicyError,
    evaluate,
    parse_policy,
    scopes_of,
    validate_scope,
)

USD = 1_000_000_000  # nanos


def policy(scope: str = "user:alice", **body: Any) -> Policy:
    body.setdefault("limit_usd", 10)
    return parse_policy(scope, body)


# -- parsing: valid bodies ---------------------------------------------------------------
def test_full_valid_body_is_parsed() -> None:
    parsed = parse_policy(
        "feature:chat",
        {
            "scope": "feature:chat",
            "period": "day",
            "limit_usd": "200.50",
            "thresholds": [0.9, 0.25],
            "timezone": "America/New_York",
            "upgrade_url": "https://example.com/upgrade",
            "upgrade_prompt": "Upgrade to Pro for more chat.",
        },
    )
    assert parsed == Policy(
        scope="feature:chat",
        period="day",
        limit_usd_nanos=200_500_000_000,
        thresholds=(0.25, 0.9, 1.0),
        timezone="America/New_York",
        window_seconds=None,
        upgrade_url="https://example.com/upgrade",
        upgrade_prompt="Upgrade to Pro for more chat.",
    )
    assert parsed.limit_usd == Decimal("200.5")


def test_minimal_body_gets_month_utc_and_default_thresholds() -> None:
    parsed = parse_policy("global", {"limit_usd": 5})
    assert parsed.period == "month"
    assert parsed.timezone == "UTC"
    assert parsed.thresholds == DEFAULT_THRESHOLDS == (0.5, 0.8, 1.0)
    assert parsed.window_seconds is None
    assert parsed.limit_usd_nanos == 5 * USD


@pytest.mark.parametrize(
    ("raw", "nanos"),
    [(5, 5 * USD), (0.1, 100_000_000), ("12.345678901", 12_345_678_901), ("1e3", 1000 * USD)],
)
def test_limit_accepts_numbers_and_numeric_strings_exactly(raw: Any, nanos: int) -> None:
    assert policy(limit_usd=raw).limit_usd_nanos == nanos


def test_limit_of_one_billion_usd_is_the_maximum() -> None:
    assert policy(limit_usd=1_000_000_000).limit_usd_nanos == 10**18
    with pytest.raises(PolicyError) as err:
        policy(limit_usd=1_000_000_001)
    assert err.value.field == "limit_usd"


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("1h", 3600), ("30m", 1800), ("7d", 604800), ("120s", 120), (3600, 3600), (60, 60)],
)
def test_window_period_accepts_seconds_and_durations(window: Any, seconds: int) -> None:
    parsed = policy(period="window", window=window)
    assert parsed.period == "window"
    assert parsed.window_seconds == seconds


@pytest.mark.parametrize("zone", ["UTC", "Etc/UTC"])
def test_a_window_may_name_utc_the_zone_it_is_aligned_in(zone: str) -> None:
    parsed = parse_policy("user:a", {"limit_usd": 1, "period": "window", "window": "1h",
                                     "timezone": zone})  # fmt: skip
    assert parsed.window_seconds == 3600


def test_window_can_be_given_as_window_seconds() -> None:
    assert policy(period="window", window_seconds=7200).window_seconds == 7200


@pytest.mark.parametrize(
    "body",
    [
        {"limit_usd": 5},
        {"limit_usd": "7.25", "period": "day", "timezone": "Asia/Kolkata"},
        {"limit_usd": 1, "period": "window", "window": "1h", "thresholds": [0.3]},
        {"limit_usd": 3, "upgrade_url": "https://x.test/up", "upgrade_prompt": "Go pro"},
    ],
)
def test_policy_round_trips_through_its_record(body: dict[str, Any]) -> None:
    parsed = parse_policy("user:*", body)
    record = parsed.to_record("evt-1", datetime(2026, 1, 1, tzinfo=UTC), updated_by="key_admin")
    assert record["event_id"] == "evt-1"
    assert record["deleted"] is False
    assert record["updated_by"] == "key_admin"
    assert Policy.from_record(record) == parsed


def test_to_json_shows_the_limit_in_usd() -> None:
    shown = policy(limit_usd="5.50", period="window", window="1h").to_json()
    assert shown["limit_usd"] == "5.5"
    assert shown["window_seconds"] == 3600
    assert shown["thresholds"] == [0.5, 0.8, 1.0]


@pytest.mark.parametrize(("limit", "shown"), [(10, "10"), (20, "20"), (1000, "1000")])
def test_to_json_shows_round_limits_as_plain_numbers(limit: int, shown: str) -> None:
    assert policy(limit_usd=limit).to_json()["limit_usd"] == shown


# -- parsing: every error names its field ------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"limit_usd": -1}, "limit_usd"),
        ({"limit_usd": 0}, "limit_usd"),
        ({"limit_usd": "0.00"}, "limit_usd"),
        ({}, "limit_usd"),
        ({"limit_usd": None}, "limit_usd"),
        ({"limit_usd": "five"}, "limit_usd"),
        ({"limit_usd": [5]}, "limit_usd"),
        ({"limit_usd": {"usd": 5}}, "limit_usd"),
        ({"limit_usd": True}, "limit_usd"),
        ({"limit_usd": False}, "limit_usd"),
        ({"limit_usd": float("nan")}, "limit_usd"),
        ({"limit_usd": "Infinity"}, "limit_usd"),
        ({"limit_usd": 5, "period": "year"}, "period"),
        ({"limit_usd": 5, "period": "Month"}, "period"),
        ({"limit_usd": 5, "period": None}, "period"),
        ({"limit_usd": 5, "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({"limit_usd": 5, "timezone": ""}, "timezone"),
        ({"limit_usd": 5, "timezone": 5}, "timezone"),
        ({"limit_usd": 5, "timezone": None}, "timezone"),
        ({"limit_usd": 5, "timezone": {"name": "UTC"}}, "timezone"),  # the fuzzer's 500
        ({"limit_usd": 5, "timezone": ["UTC"]}, "timezone"),
        # the machine's own zone: the dispatcher's and the worker's may differ
        ({"limit_usd": 5, "timezone": "localtime"}, "timezone"),
        ({"limit_usd": 5, "timezone": "posixrules"}, "timezone"),
        ({"limit_usd": 5, "timezone": "Factory"}, "timezone"),
        # a folder of the zone database, a name past the file system's limit (a newcomer's
        # probe: a 500 from the dispatcher, a traceback from the CLI)
        ({"limit_usd": 5, "timezone": "America"}, "timezone"),
        ({"limit_usd": 5, "timezone": "America/Argentina"}, "timezone"),
        ({"limit_usd": 5, "timezone": "Etc"}, "timezone"),
        ({"limit_usd": 5, "timezone": "Europe/" + "x" * 300}, "timezone"),
        # a window is epoch-aligned (UTC): a zone there was stored and silently ignored
        (
            {"limit_usd": 5, "period": "window", "window": "1h", "timezone": "Asia/Kolkata"},
            "timezone",
        ),
        ({"limit_usd": 5, "thresholds": [0]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": [-0.5]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": [1.01]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": [0.5, 2]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": []}, "thresholds"),
        ({"limit_usd": 5, "thresholds": 0.5}, "thresholds"),
        ({"limit_usd": 5, "thresholds": "0.5,0.8"}, "thresholds"),
        ({"limit_usd": 5, "thresholds": ["0.5"]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": [True]}, "thresholds"),
        ({"limit_usd": 5, "thresholds": None}, "thresholds"),
        ({"limit_usd": 5, "period": "window"}, "window"),
        ({"limit_usd": 5, "period": "window", "window": "1w"}, "window"),
        ({"limit_usd": 5, "period": "window", "window": "1.5h"}, "window"),
        ({"limit_usd": 5, "period": "window", "window": "h"}, "window"),
        ({"limit_usd": 5, "period": "window", "window": 59}, "window"),
        ({"limit_usd": 5, "period": "window", "window": "30s"}, "window"),
        ({"limit_usd": 5, "period": "window", "window": True}, "window"),
        ({"limit_usd": 5, "period": "window", "window": 3600.0}, "window"),
        ({"limit_usd": 5, "period": "month", "window": "1h"}, "window"),
        ({"limit_usd": 5, "window_seconds": 3600}, "window"),
        ({"limit_usd": 5, "period": "day", "window": 3600}, "window"),
        ({"limit_usd": 5, "upgrade_url": 42}, "upgrade_url"),
        ({"limit_usd": 5, "upgrade_prompt": "x" * 2001}, "upgrade_prompt"),
        ({"limit_usd": 5, "limit": 5}, "limit"),
        ({"limit_usd": 5, "zzz": 1, "hard_limit": 2}, "hard_limit"),
        ({"limit_usd": 5, "scope": "user:mallory"}, "scope"),
        ({"limit_usd": 5, "scope": None}, "scope"),
    ],
)
def test_invalid_body_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("user:alice", body)
    assert err.value.field == field
    assert str(err.value)  # a message an admin can act on


@pytest.mark.parametrize("prompt", ["", "   ", "\t"])
def test_a_blank_upgrade_prompt_is_no_prompt(prompt: str) -> None:
    """A newcomer probe: `"upgrade_prompt": ""` was stored, and every 402 of the cap then
    carried a blank prompt (its message ending in ". "), where a policy without one gets the
    default prompt. Blank is absent, as for ids."""
    assert policy(upgrade_prompt=prompt).upgrade_prompt is None


@pytest.mark.parametrize("body", [None, [], "limit_usd=5", 5])
def test_body_that_is_not_an_object_names_body(body: Any) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("global", body)
    assert err.value.field == "body"


def test_unknown_field_message_lists_every_unknown_field() -> None:
    with pytest.raises(PolicyError, match="hard_limit, zzz"):
        parse_policy("global", {"limit_usd": 5, "zzz": 1, "hard_limit": 2})


@pytest.mark.parametrize("limit", ["0.0000000001", 1e-10, "0.0000000005"])
def test_limit_that_rounds_to_zero_nanos_is_rejected(limit: Any) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("user:alice", {"limit_usd": limit})
    assert err.value.field == "limit_usd"


@pytest.mark.parametrize(
    ("limit", "nanos"),
    [("12.3456789012", 12_345_678_901), (1.0000000001, 1_000_000_000), (100 / 30, 3_333_333_333)],
)
def test_a_limit_with_digits_finer_than_a_nano_dollar_is_rounded(limit: Any, nanos: int) -> None:
    """A monthly cap divided by 30 in a float is an ordinary limit: held to the nano-dollar."""
    policy = parse_policy("user:alice", {"limit_usd": limit})
    assert policy.limit_usd_nanos == nanos


@pytest.mark.parametrize("window", ["²h", "1²m"])
def test_window_with_non_decimal_digit_names_the_window_field(window: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy("user:alice", {"limit_usd": 5, "period": "window", "window": window})
    assert err.value.field == "window"


# -- thresholds --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([0.5], (0.5, 1.0)),
        ([0.9, 0.1, 0.5], (0.1, 0.5, 0.9, 1.0)),
        ([0.8, 0.5, 0.8], (0.5, 0.8, 1.0)),
        ([1.0], (1.0,)),
        ([1], (1.0,)),
        ([1.0, 0.95], (0.95, 1.0)),
    ],
)
def test_thresholds_are_sorted_deduplicated_and_always_include_the_limit(
    given: list[float], expected: tuple[float, ...]
) -> None:
    assert policy(thresholds=given).thresholds == expected


# -- scopes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scope",
    ["global", "user:alice", "feature:chat", "team:data", "key:key_123", "user:*", "user:a:b"],
)
def test_valid_scopes(scope: str) -> None:
    assert validate_scope(scope) == scope


@pytest.mark.parametrize(
    "scope",
    ["user:", "nope:x", "user", "", ":alice", "Global", "users:alice", "user:" + "x" * 300],
)
def test_malformed_scopes_are_rejected_naming_scope(scope: str) -> None:
    with pytest.raises(PolicyError) as err:
        validate_scope(scope)
    assert err.value.field == "scope"


@pytest.mark.parametrize("scope", ["user:", "nope:x", "user"])
def test_parse_policy_rejects_malformed_url_scope(scope: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(scope, {"limit_usd": 5})
    assert err.value.field == "scope"


@pytest.mark.parametrize("scope", ["user:*", "feature:*", "team:*", "key:*"])
def test_default_scope_is_not_a_scope_that_spends(scope: str) -> None:
    with pytest.raises(PolicyError) as err:
        validate_scope(scope, allow_default=False)
    assert err.value.field == "scope"
    assert validate_scope("user:bob", allow_default=False) == "user:bob"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("u1", "chat", "data", "key_1"), ["user:u1", "feature:chat", "team:data", "key:key_1"]),
        (("u1", None), ["user:u1"]),
        ((None, "chat"), ["feature:chat"]),
        ((None, None), []),
        (("", "", "", ""), []),
        # '*' names a default policy, never a spending scope (session 17's probe, F2)
        (("*", "*", "*"), []),
        (("u1", "*"), ["user:u1"]),
    ],
)
def test_scopes_of_lists_most_specific_first_and_always_global(
    args: tuple[Any, ...], expected: list[str]
) -> None:
    assert scopes_of(*args) == [*expected, "global"]


# -- the policy book ---------------------------------------------------------------------
def book(*policies: Policy) -> PolicyBook:
    result = PolicyBook()
    for p in policies:
        result.put(p)
    return result


def test_user_default_applies_to_every_user_under_their_own_scope() -> None:
    default = policy("user:*", limit_usd=5, upgrade_url="https://x.test/up")
    applied = book(default).policy_for("user:bob")
    assert applied is not None
    assert applied.scope == "user:bob"
    assert applied.limit_usd_nanos == 5 * USD
    assert applied.upgrade_url == "https://x.test/up"
    assert applied.thresholds == default.thresholds


def test_own_policy_wins_over_the_default() -> None:
    policies = book(policy("user:*", limit_usd=5), policy("user:bob", limit_usd=50))
    bob = policies.policy_for("user:bob")
    carol = policies.policy_for("user:carol")
    assert bob is not None and bob.limit_usd_nanos == 50 * USD
    assert carol is not None and carol.limit_usd_nanos == 5 * USD


def test_feature_default_applies_only_to_features() -> None:
    policies = book(policy("feature:*", limit_usd=100))
    chat = policies.policy_for("feature:chat")
    assert chat is not None and chat.scope == "feature:chat"
    assert policies.policy_for("user:bob") is None
    assert policies.policy_for("global") is None


@pytest.mark.parametrize("kind", ["team", "key"])
def test_team_and_key_defaults_apply_like_user_and_feature_ones(kind: str) -> None:
    policies = book(policy(f"{kind}:*", limit_usd=20))
    applied = policies.policy_for(f"{kind}:data")
    assert applied is not None and applied.scope == f"{kind}:data"
    assert applied.limit_usd_nanos == 20 * USD
    assert policies.policy_for("user:bob") is None


def test_global_never_uses_a_default() -> None:
    policies = book(policy("user:*", limit_usd=5), policy("feature:*", limit_usd=5))
    assert policies.policy_for("global") is None
    policies.put(policy("global", limit_usd=1000))
    own = policies.policy_for("global")
    assert own is not None and own.limit_usd_nanos == 1000 * USD


def test_no_policy_no_default_means_uncapped() -> None:
    assert PolicyBook().policy_for("user:bob") is None
    assert PolicyBook().policy_for("global") is None


def test_removing_the_own_policy_falls_back_to_the_default() -> None:
    policies = book(policy("user:*", limit_usd=5), policy("user:bob", limit_usd=50))
    policies.remove("user:bob")
    bob = policies.policy_for("user:bob")
    assert bob is not None and bob.limit_usd_nanos == 5 * USD
    policies.remove("user:never-existed")  # no error


def test_apply_record_puts_and_deletes() -> None:
    policies = PolicyBook()
    record = policy("team:data", limit_usd=20).to_record("e1", datetime(2026, 1, 1, tzinfo=UTC))
    policies.apply_record(record, "team:data")
    assert policies.policy_for("team:data") == policy("team:data", limit_usd=20)
    policies.apply_record({**record, "deleted": True}, "team:data")
    assert policies.policy_for("team:data") is None
    policies.apply_record(record, "team:data")
    policies.apply_record(None, "team:data")  # a tombstone
    assert policies.policy_for("team:data") is None


def test_policy_period_at_uses_its_zone() -> None:
    kolkata = policy(period="month", timezone="Asia/Kolkata")
    period = kolkata.period_at(datetime(2026, 10, 31, 19, tzinfo=UTC))
    assert period == Period(
        "month",
        datetime(2026, 10, 31, 18, 30, tzinfo=UTC),
        datetime(2026, 11, 30, 18, 30, tzinfo=UTC),
    )


# -- evaluate ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spent_usd", "state", "threshold"),
    [
        ("0", "open", None),
        ("4.999999999", "open", None),
        ("5", "warn", 0.5),
        ("7.99", "warn", 0.5),
        ("8", "warn", 0.8),
        ("9.999999999", "warn", 0.8),
        ("10", "blocked", 1.0),
        ("250", "blocked", 1.0),
    ],
)
def test_evaluate_states_and_highest_threshold(
    spent_usd: str, state: str, threshold: float | None
) -> None:
    result = evaluate(int(Decimal(spent_usd) * USD), policy(limit_usd=10))
    assert (result.state, result.threshold) == (state, threshold)


def test_evaluate_with_custom_thresholds() -> None:
    custom = policy(limit_usd=100, thresholds=[0.25, 0.9])
    assert evaluate(24 * USD, custom).state == "open"
    assert evaluate(25 * USD, custom).threshold == 0.25
    assert evaluate(90 * USD, custom).threshold == 0.9
    assert evaluate(100 * USD, custom).state == "blocked"


def test_evaluate_with_only_the_hard_limit_never_warns() -> None:
    hard = policy(limit_usd=10, thresholds=[1.0])
    assert evaluate(9 * USD, hard) == evaluate(0, hard)
    assert evaluate(9 * USD, hard).state == "open"
    assert evaluate(10 * USD, hard).state == "blocked"


def test_evaluate_one_nano_below_a_large_limit_has_not_reached_the_limit_threshold() -> None:
    large = policy(limit_usd="123456789.123456789")
    assert large.limit_usd_nanos == 123_456_789_123_456_789
    result = evaluate(large.limit_usd_nanos - 1, large)
    assert result.state == "warn"
    assert result.threshold == 0.8


@pytest.mark.parametrize(
    "url",
    ["javascript:alert(1)", "data:text/html,x", "ftp://example.com", "example.com/pro", "https://"],
)
def test_an_upgrade_url_must_be_http_or_https(url: str) -> None:
    """The URL goes into every 402 a client may render as a link: a `javascript:` URL was
    accepted and returned to every blocked user."""
    with pytest.raises(PolicyError, match="http") as info:
        parse_policy("user:alice", {"limit_usd": 1, "upgrade_url": url})
    assert info.value.field == "upgrade_url"
    ok = parse_policy("user:alice", {"limit_usd": 1, "upgrade_url": "HTTPS://example.com/pro?x=1"})
    assert ok.upgrade_url == "HTTPS://example.com/pro?x=1"


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        ("user: alice ", "user:alice"),
        ("user:\talice", "user:alice"),
        ("user:e\u0301lodie", "user:\u00e9lodie"),  # NFD, as a macOS file name gives it
        ("feature: search", "feature:search"),
        ("team:ops ", "team:ops"),
    ],
)
def test_a_scope_id_is_the_id_calls_are_attributed_with(typed: str, stored: str) -> None:
    """Probe L (F1): a cap PUT for 'user: alice ' or an NFD 'élodie' was stored as typed,
    answered 200 and shown 'open', while calls' ids are trimmed and NFC: it capped nobody."""
    assert validate_scope(typed) == stored
    assert parse_policy(typed, {"limit_usd": 1}).scope == stored
    assert parse_policy(typed, {"limit_usd": 1, "scope": stored}).scope == stored
    assert parse_policy(stored, {"limit_usd": 1, "scope": typed}).scope == stored


@pytest.mark.parametrize("typed", ["user: ", "user:\t", "feature:   "])
def test_a_blank_scope_id_is_refused(typed: str) -> None:
    with pytest.raises(PolicyError, match="blank") as refused:
        validate_scope(typed)
    assert refused.value.field == "scope"


def test_the_label_reports_give_calls_without_an_id_is_no_scope() -> None:
    """Probe S: `feature:(none)/status` read "open, $0" for calls no cap ever holds."""
    from app.budgets.policy import PolicyError, validate_scope

    for scope in ("feature:(none)", "user:(none)", "team: (none) "):
        with pytest.raises(PolicyError, match="reports show that for calls without one"):
            validate_scope(scope)
