"""The response cache: keys, cacheability, tenants, Cache-Control, TTL, byte bound, LRU."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from app.cache import (
    CacheControl,
    CachedAnswer,
    CacheFeatureRule,
    CacheSettings,
    MemoryCache,
    parse_cache_control,
    plan_lookup,
)
from app.cache.key import cache_key, tenant_of

IGNORED = CacheSettings().ignored_fields
BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "Hi?"}],
    "temperature": 0,
    "max_tokens": 64,
}


def _key(body: dict[str, Any], tenant: str = "team:a") -> str:
    return cache_key(tenant, body, IGNORED)


# -- keys ----------------------------------------------------------------------------------
def test_the_key_ignores_key_order_and_the_documented_fields() -> None:
    reordered = {k: BODY[k] for k in reversed(BODY)}
    reordered["messages"] = [{"content": m["content"], "role": m["role"]} for m in BODY["messages"]]
    noisy = {
        **BODY, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
        "user_id": "u2", "session_id": "s", "metadata": {"feature": "x"}, "store": True,
        "prompt_cache_key": "k", "safety_identifier": "h",
    }  # fmt: skip
    assert _key(reordered) == _key(BODY) == _key(noisy)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "gpt-4o"),
        ("messages", [{"role": "user", "content": "Hi!"}]),
        ("tools", [{"type": "function", "function": {"name": "lookup"}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("seed", 7),
        ("n", 2),
        ("temperature", 0.2),
        ("top_p", 0.5),
        ("max_tokens", 65),
        ("stop", ["\n"]),
        ("presence_penalty", 0.1),
        ("frequency_penalty", 0.1),
        ("logit_bias", {"50256": -100}),
        ("logprobs", True),
        ("reasoning_effort", "high"),
        ("some_future_field", 1),
    ],
)
def test_every_field_that_can_change_the_answer_changes_the_key(field: str, value: Any) -> None:
    changed = copy.deepcopy(BODY)
    changed[field] = value
    assert _key(changed) != _key(BODY)


def test_the_key_is_stable_across_processes_and_versions_of_dict_order() -> None:
    # a fixed value: a change to the canonical form must be deliberate (bump KEY_VERSION)
    assert _key({"b": 1, "a": [1, {"y": 2, "x": 1}]}, "user:u") == cache_key(
        "user:u", {"a": [1, {"x": 1, "y": 2}], "b": 1}, IGNORED
    )
    assert len(_key(BODY)) == 64


def test_a_number_written_as_0_or_0_0_is_the_same_request() -> None:
    """JSON's 0 and 0.0 are one number, and OpenAI answers them alike: `temperature: 0.0`
    missed the entry stored by `temperature: 0`."""
    assert _key({**BODY, "temperature": 0.0}) == _key({**BODY, "temperature": 0})
    assert _key({**BODY, "top_p": 1.0}) == _key({**BODY, "top_p": 1})
    assert _key({**BODY, "temperature": 0.5}) != _key({**BODY, "temperature": 0})


# -- cacheability and tenants --------------------------------------------------------------
def _plan(body: dict[str, Any], settings: CacheSettings | None = None, **who: Any) -> Any:
    identity = {"feature": "f", "team": None, "api_key_id": None, "user_id": "u", **who}
    return plan_lookup(settings or CacheSettings(enabled=True), body, **identity)


@pytest.mark.parametrize(
    ("temperature", "opt_in", "status"),
    [
        (0, False, "lookup"),
        (0.0, False, "lookup"),
        (None, False, "bypass"),  # no temperature = OpenAI's default 1
        (0.7, False, "bypass"),
        (0.7, True, "lookup"),
        (None, True, "lookup"),
    ],
)
def test_only_temperature_zero_is_cached_unless_the_feature_opts_in(
    temperature: float | None, opt_in: bool, status: str
) -> None:
    body = {k: v for k, v in BODY.items() if k != "temperature"}
    if temperature is not None:
        body["temperature"] = temperature
    settings = CacheSettings(enabled=True, features={"f": CacheFeatureRule(cache_sampled=opt_in)})
    assert _plan(body, settings).status == status


def test_disabled_cache_or_feature_bypasses() -> None:
    assert _plan(BODY, CacheSettings()).status == "bypass"  # off by default
    settings = CacheSettings(enabled=True, features={"f": CacheFeatureRule(enabled=False)})
    assert _plan(BODY, settings).status == "bypass"


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ({"team": "a", "user_id": "u1"}, {"team": "a", "user_id": "u2"}, True),
        ({"team": "a"}, {"team": "b"}, False),
        ({"api_key_id": "k1", "user_id": "u"}, {"api_key_id": "k2", "user_id": "u"}, False),
        ({"api_key_id": "k1", "user_id": "u1"}, {"api_key_id": "k1", "user_id": "u2"}, True),
        ({"user_id": "u1"}, {"user_id": "u2"}, False),
        ({"team": "a", "feature": "f"}, {"team": "a", "feature": "g"}, True),
    ],
)
def test_tenant_is_team_else_key_else_user(
    first: dict[str, Any], second: dict[str, Any], same: bool
) -> None:
    assert (_plan(BODY, **first).key == _plan(BODY, **second).key) is same


def test_a_shareable_feature_shares_across_tenants_but_not_with_other_features() -> None:
    settings = CacheSettings(enabled=True, features={"docs": CacheFeatureRule(shareable=True)})
    a = _plan(BODY, settings, feature="docs", team="a").key
    b = _plan(BODY, settings, feature="docs", team="b").key
    other = _plan(BODY, settings, feature="other", team="a").key
    assert a == b != other
    assert tenant_of(team="a", api_key_id=None, user_id=None, feature="x", shareable=False) != (
        tenant_of(team=None, api_key_id="a", user_id=None, feature="x", shareable=False)
    )


# -- Cache-Control -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, CacheControl()),
        ("", CacheControl()),
        ("no-cache", CacheControl(no_cache=True)),
        ("No-Store", CacheControl(no_store=True)),
        ("private, no-cache, no-store", CacheControl(no_cache=True, no_store=True)),
        ("max-age=60", CacheControl(max_age_s=60)),
        ('max-age="30", max-age=90', CacheControl(max_age_s=30)),
        ("max-age=0", CacheControl(no_cache=True, max_age_s=0)),
        ("max-age=soon", CacheControl()),
        ("no-transform", CacheControl()),
    ],
)
def test_cache_control_parsing(header: str | None, expected: CacheControl) -> None:
    assert parse_cache_control(header) == expected


def test_no_store_neither_reads_nor_stores_and_no_cache_still_stores() -> None:
    no_store = _plan(BODY, cache_control=parse_cache_control("no-store"))
    assert (no_store.status, no_store.store, no_store.key) == ("bypass", False, None)
    no_cache = _plan(BODY, cache_control=parse_cache_control("no-cache"))
    assert (no_cache.status, no_cache.store) == ("bypass", True)
    assert no_cache.key == _plan(BODY).key
    assert _plan(BODY, cache_control=parse_cache_control("max-age=5")).max_age_s == 5


# -- the in-process store ------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answer(size: int = 100, model: str = "m") -> CachedAnswer:
    return CachedAnswer(b"x" * size, model, 10, 5)


async def test_hit_miss_and_ttl() -> None:
    clock = FakeClock()
    cache = MemoryCache(10_000, clock=clock)
    assert await cache.get("k") is None
    assert await cache.put("k", _answer(), ttl_s=60)
    hit = await cache.get("k")
    assert hit is not None and hit.body == b"x" * 100 and hit.stored_at == 1000.0
    clock.now += 59.999
    assert await cache.get("k") is not None
    assert await cache.get("k", max_age_s=30) is None  # too old for this client only
    clock.now += 0.001
    assert await cache.get("k") is None  # expired exactly at the TTL
    assert len(cache) == 0 and cache.bytes_used == 0
    assert (cache.stats.hits, cache.stats.misses, cache.stats.expirations) == (2, 3, 1)


async def test_the_byte_bound_holds_and_evicts_least_recently_used() -> None:
    entry = _answer(1000).size_bytes + len("k0")
    cache = MemoryCache(entry * 3)
    for name in ("k0", "k1", "k2"):
        await cache.put(name, _answer(1000), ttl_s=60)
    assert await cache.get("k0") is not None  # k1 is now the least recently used
    await cache.put("k3", _answer(1000), ttl_s=60)
    assert cache.bytes_used <= cache.max_bytes
    assert await cache.get("k1") is None
    assert all([await cache.get(k) for k in ("k0", "k2", "k3")])
    assert cache.stats.evictions == 1
    # a big entry evicts as many as it needs; replacing a key does not double count
    await cache.put("big", _answer(2500), ttl_s=60)
    assert cache.bytes_used <= cache.max_bytes
    before = cache.bytes_used
    await cache.put("big", _answer(2500), ttl_s=60)
    assert cache.bytes_used == before


async def test_an_entry_larger_than_the_limit_is_not_stored() -> None:
    cache = MemoryCache(100_000, max_entry_bytes=1000)
    assert not await cache.put("k", _answer(5000), ttl_s=60)
    assert len(cache) == 0 and cache.stats.rejected_too_big == 1
    await cache.delete("k")


@pytest.mark.parametrize(
    "value", [2**70, -(2**64), 1e20, {"nested": [2**64]}], ids=["2**70", "-2**64", "1e20", "deep"]
)
def test_a_number_json_allows_but_64_bits_do_not_still_has_a_key(value: Any) -> None:
    """A newcomer's probe: `seed: 2**70` at temperature 0 was a 500 ("Integer exceeds 64-bit
    range" from the key's serialiser) where at temperature 0.7 the call was served. JSON
    numbers have no size limit: the key must be built for any of them, one way."""
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [], "seed": value}
    key = _key(body, "user:u")
    assert key == _key(copy.deepcopy(body), "user:u")
    assert key != _key({**body, "seed": 1}, "user:u")
    if value == 1e20:  # written as the integer it is, like every integral top-level number
        assert key == _key({**body, "seed": 10**20}, "user:u")


def test_a_lone_surrogate_in_a_message_still_has_a_key() -> None:
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": [{"content": "a\ud800"}]}
    assert _key(body, "user:u") != _key({**body, "messages": [{"content": "a"}]}, "user:u")


def test_headers_sent_on_to_the_provider_are_in_the_key_and_none_keeps_the_old_key() -> None:
    body = {"model": "gpt-4o-mini", "temperature": 0, "messages": []}
    plain = _key(body)
    assert cache_key("team:a", body, IGNORED, ()) == plain  # stored entries stay found
    project = cache_key("team:a", body, IGNORED, [("openai-project", "p1")])
    assert project != plain
    assert project != cache_key("team:a", body, IGNORED, [("openai-project", "p2")])
    both = [("openai-beta", "x"), ("openai-project", "p1")]
    assert cache_key("team:a", body, IGNORED, both) == cache_key(
        "team:a", body, IGNORED, list(reversed(both))
    )


def test_the_forwarded_headers_are_read_only_when_the_plan_needs_a_key() -> None:
    """Which client headers go on to the provider (an fnmatch over every header) was worked
    out for every attempt, though only a key needs them: a plan that bypasses the cache
    without a key never asks; one with a key asks once and keys on them as before."""
    asked: list[int] = []

    def forwarded() -> list[tuple[str, str]]:
        asked.append(1)
        return [("openai-project", "p1")]

    sampled = {**BODY, "temperature": 0.7}
    off = CacheSettings(enabled=False)
    for settings, body, control in [
        (off, BODY, CacheControl()),
        (CacheSettings(enabled=True), BODY, CacheControl(no_store=True)),
        (CacheSettings(enabled=True), sampled, CacheControl()),
    ]:
        plan = plan_lookup(
            settings, body, feature="f", team="t", api_key_id=None, user_id="u",
            cache_control=control, headers=forwarded,
        )  # fmt: skip
        assert (plan.status, plan.key) == ("bypass", None)
    assert asked == []

    plan = plan_lookup(
        CacheSettings(enabled=True), BODY, feature="f", team="t", api_key_id=None, user_id="u",
        headers=forwarded,
    )  # fmt: skip
    assert asked == [1]
    assert plan.status == "lookup"
    assert plan.key == cache_key("team:t", BODY, IGNORED, [("openai-project", "p1")])
    eager = plan_lookup(
        CacheSettings(enabled=True), BODY, feature="f", team="t", api_key_id=None, user_id="u",
        headers=[("openai-project", "p1")],
    )  # fmt: skip
    assert eager.key == plan.key
