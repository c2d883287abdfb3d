"""The money a burst's page states: what the burst spends, not a third of it.

Probe H's D3 (docs/ANOMALY.md, "Probe H"): a quiet user's 3,000-a-minute burst paged 20 s
in, on its 1-minute window, which then held 20 s of the burst: "1,001 requests/min ...
about $22/hour above expected" where the burst spent about $190 an hour above normal.
The page is the one message on-call reads first; its money decides how fast they act.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from agents.anomaly.engine import AnomalyEngine
from tests.anomaly_traffic import (
    T0,
    Caller,
    Feature,
    World,
    daily_rhythm,
    merged,
    pages,
    run,
    zipf_callers,
)

CHAT = Feature("chat", economy_share=0.7, sigma=0.6)


def burst_page(
    per_minute: float, seconds: float, token_factor: float, unpriced: bool = False
) -> tuple[dict, float]:
    """Two hours of 30 users on one feature, then a quiet user's burst at ``per_minute``
    for ``seconds``, its calls ``token_factor`` times the usual tokens. Returns the user's
    page and the burst's true spend per hour (USD; the user's normal spend is ~0)."""
    world = World(seed=5, callers=zipf_callers([CHAT], 30, 20.0), rhythm=daily_rhythm(15, 0.25))
    start = T0 + timedelta(hours=14)
    background = world.traffic(start - timedelta(hours=2), start + timedelta(minutes=10))
    rng = random.Random(7)
    user = Caller("burster", CHAT, 0.02)
    history = [world.call(rng, start - timedelta(minutes=110 - 10 * k), user) for k in range(10)]
    n = int(per_minute * seconds / 60)
    burst = [
        world.call(rng, start + timedelta(seconds=k * 60 / per_minute), user, token_factor)
        for k in range(n)
    ]
    spend_usd = sum(r["cost_usd_nanos"] for r in burst) / 1e9
    if unpriced:  # a model the price catalog does not know: cost 0, not a real $0
        burst = [{**r, "cost_usd_nanos": 0, "price_unknown": True} for r in burst]
    alerts = run(AnomalyEngine(), merged(background, history, burst))
    mine = [a for a in pages(alerts) if a["scope"] == "user:burster"]
    assert mine, [a["message"] for a in pages(alerts)]
    return mine[0], spend_usd / seconds * 3600


def money(alert: dict[str, Any]) -> float:
    return float(alert["impact_usd_per_hour"])


def test_a_bursts_page_states_about_what_the_burst_spends_an_hour() -> None:
    page, true_per_hour = burst_page(3000.0, 120.0, 1.0)
    assert 0.7 * true_per_hour <= money(page) <= 1.3 * true_per_hour, (
        page["message"],
        true_per_hour,
    )


def test_a_burst_of_costlier_calls_is_priced_at_its_own_calls() -> None:
    """The burst's calls carry 5 times the usual tokens: its money is theirs, not the
    usual cost per call times their count."""
    page, true_per_hour = burst_page(600.0, 120.0, 5.0)
    assert 0.7 * true_per_hour <= money(page) <= 1.3 * true_per_hour, (
        page["message"],
        true_per_hour,
    )


def test_a_burst_of_cheaper_calls_is_still_money_above_expected() -> None:
    """Calls at a fifth of the usual tokens: fewer dollars, but above expected, never a
    negative figure next to a count above expected (a review of the first version priced
    the window's calls at their own cost and the expected ones at the usual)."""
    page, true_per_hour = burst_page(600.0, 120.0, 0.2)
    assert 0.7 * true_per_hour <= money(page) <= 1.3 * true_per_hour, (
        page["message"],
        true_per_hour,
    )


def test_a_burst_of_calls_of_unknown_price_is_priced_at_the_usual_cost() -> None:
    """A model the catalog does not price reports cost 0 with ``price_unknown``: that is
    no real $0, and its burst is money at the usual cost per call, not nothing."""
    page, true_per_hour = burst_page(600.0, 120.0, 1.0, unpriced=True)
    assert 0.5 * true_per_hour <= money(page) <= 1.5 * true_per_hour, (
        page["message"],
        true_per_hour,
    )
