"""A feature's surge that no user could be named for pages when its alert fires.

A new incident holds its page ``incident_hold_seconds`` (20 s) so that a narrower alert of
the same moment can join and name it: a user's loop that made their feature's rate fire.
A user is named only when they hold ``incident_explain_share`` (75 %) of the feature's
extra spend. In a viral ramp of a feature's many users none comes close, so the hold only
delayed the page: every viral ramp of the bench paged 20 s after its verdict
(docs/ANOMALY.md, probe E). Now such an incident pages at once
(``incident_spread_share``); a user's loop still holds its feature's page and names the
user."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from agents.anomaly.engine import AnomalyEngine
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import T0, Caller, Feature, World, arrivals, firing, merged, pages, run

APPS = [Feature(f"app{i}", economy_share=0.7, sigma=0.6) for i in range(4)]
RAMPING = Feature("ramping", economy_share=0.7, sigma=0.6)
WARM = T0 + timedelta(hours=3)


def world(seed: int) -> tuple[World, list[Caller]]:
    """40 users of four features (120 calls a minute between them) and 10 users of
    ``ramping`` at 2 a minute each (20 a minute), all Poisson."""
    rest = [Caller(f"u{i:02d}", APPS[i % 4], 3.0) for i in range(40)]
    ramping = [Caller(f"r{i:02d}", RAMPING, 2.0) for i in range(10)]
    return World(seed=seed, callers=[*rest, *ramping]), ramping


def ramp(w: World, callers: list[Caller], factor: float) -> list[dict[str, Any]]:
    """Every caller of ``ramping`` rises linearly from 1x to ``factor`` x over 10 minutes
    (the bench's viral ramp: extra calls from the feature's usual users)."""
    rng = random.Random(w.seed * 7919)
    out = []
    for c in callers:
        for ts in arrivals(rng, WARM, WARM + timedelta(minutes=10), c.per_minute * (factor - 1)):
            if rng.random() < (ts - WARM) / timedelta(minutes=10):
                out.append(w.call(rng, ts, c))
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_a_viral_ramp_of_many_users_pages_when_its_alert_fires(seed: int) -> None:
    w, callers = world(seed)
    alerts = run(
        AnomalyEngine(), merged(w.traffic(T0, WARM + timedelta(minutes=15)), ramp(w, callers, 10.0))
    )

    assert [a["message"] for a in pages(alerts) if a["_at"] < WARM] == []
    found = [a for a in pages(alerts) if a["_at"] >= WARM]
    assert found, "the ramp never paged"
    page = found[0]
    assert page["scope"] == "feature:ramping", page["message"]
    # the page goes out with the call that made the feature's alert fire, not 20 s later
    late = (page["_at"] - page["ts"]).total_seconds()
    assert late < 1, f"paged {late:.1f} s after the alert fired"


def test_a_users_loop_still_holds_its_features_page_and_names_the_user() -> None:
    """One user of ``ramping`` loops at 30 calls a minute: most of the feature's extra
    spend is theirs, so the feature's alert waits for the user's and the page names them."""
    w, callers = world(3)
    rng = random.Random(11)
    loop = [
        w.call(rng, ts, callers[0])
        for ts in arrivals(rng, WARM, WARM + timedelta(minutes=10), 30.0)
    ]
    alerts = run(AnomalyEngine(), merged(w.traffic(T0, WARM + timedelta(minutes=15)), loop))

    found = [a for a in pages(alerts) if a["_at"] >= WARM]
    assert [a["scope"] for a in found] == [f"user:{callers[0].user}"], [a["message"] for a in found]
    assert any(a["scope"] == "feature:ramping" for a in firing(alerts) if a["_at"] >= WARM)


def test_the_spread_share_is_validated_and_zero_always_holds() -> None:
    with pytest.raises(ValueError, match="incident_spread_share"):
        DetectorSettings.with_options(incident_spread_share=1.5)
    with pytest.raises(ValueError, match="incident_spread_share"):
        DetectorSettings.with_options(incident_spread_share=-0.1)
    assert DetectorSettings.with_options(incident_spread_share=0).incident_spread_share == 0
