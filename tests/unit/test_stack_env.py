"""`tollgate up` (`make up`) runs every pillar: its dispatchers learn through the shared
learner and answer exact temperature-0 repeats from the response cache, unless the user's
configuration (``TOLLGATE_*``, which every service reads) says otherwise explicitly."""

from __future__ import annotations

import orjson
import pytest

from app.cache.config import CacheSettings
from app.routing.config import RoutingSettings
from app.settings import Settings
from devtools.stack import stack_env


def services_settings(env: dict[str, str]) -> Settings:
    routing = orjson.loads(env["TOLLGATE_ROUTING"]) if "TOLLGATE_ROUTING" in env else {}
    cache = orjson.loads(env["TOLLGATE_CACHE"]) if "TOLLGATE_CACHE" in env else {}
    return Settings(routing=RoutingSettings(**routing), cache=CacheSettings(**cache))


def test_the_stack_turns_on_shared_learning_and_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOLLGATE_ROUTING", raising=False)
    monkeypatch.delenv("TOLLGATE_CACHE", raising=False)
    seen = services_settings(stack_env(Settings()))
    assert seen.routing.shared_learning
    assert seen.cache.enabled


def test_an_explicit_choice_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_ROUTING", '{"shared_learning": false, "exploration_rate": 0}')
    monkeypatch.setenv("TOLLGATE_CACHE", '{"enabled": false, "ttl_s": 60}')
    seen = services_settings(stack_env(Settings()))
    assert not seen.routing.shared_learning and seen.routing.exploration_rate == 0.0
    assert not seen.cache.enabled and seen.cache.ttl_s == 60


def test_other_cache_settings_are_kept_when_the_stack_turns_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLGATE_CACHE", '{"ttl_s": 60}')
    seen = services_settings(stack_env(Settings()))
    assert seen.cache.enabled and seen.cache.ttl_s == 60
