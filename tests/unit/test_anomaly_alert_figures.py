"""What the alerts of one incident say, and when its page ends (probe W's live run).

Four defects on-call read in probe W: a rate alarm that resolved "back to normal" quoting
its in-alarm value, a routing regression paged with the smaller of its two money figures,
historical users' alerts at "$0.0000/hour", and users' late cost alarms holding their
feature's page open 16 minutes after the spike ended.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from agents.anomaly.alerting import AlertManager
from agents.anomaly.core import Verdict, duration_text
from agents.anomaly.engine import AnomalyEngine
from agents.anomaly.incidents import Correlator
from app.anomaly_config import DetectorSettings
from tests.anomaly_traffic import (
    T0,
    Caller,
    Feature,
    World,
    arrivals,
    firing,
    merged,
    run,
    zipf_callers,
)

CHAT = Feature("chat", economy_share=0.7, sigma=0.6)


def test_a_users_rate_alarm_resolves_quoting_a_rate_back_to_normal() -> None:
    """Probe W, incident 1: a quiet user (a call every 15 min) looped at 6 calls a minute
    for 5 minutes; the resolve said "back to normal" with "latest 6.0 vs 0.1 requests/min
    expected" (its record: observed 6.0), the loop's last call. The resolve now quotes
    the rate of the same metric when it resolved, and says over which span."""
    world = World(seed=1, callers=zipf_callers([CHAT], users=20, total_per_minute=8))
    rng = random.Random(1)
    quiet = Caller("q", CHAT, 0)
    start = T0 + timedelta(hours=6, minutes=3, seconds=17)
    history = [world.call(rng, ts, quiet) for ts in arrivals(rng, T0, start, 1 / 15)]
    loop = [
        world.call(rng, start + timedelta(seconds=10 * i + rng.uniform(0, 1)), quiet)
        for i in range(30)
    ]
    background = world.traffic(T0, start + timedelta(minutes=20))
    engine = AnomalyEngine()
    alerts = run(engine, merged(background, history, loop))

    key = "volume_spike|user:q"
    fired = [a for a in alerts if a["alert_key"] == key and a["status"] == "firing"]
    resolved = [a for a in alerts if a["alert_key"] == key and a["status"] == "resolved"]
    assert len(fired) == 1 and len(resolved) == 1
    end = resolved[0]
    assert end["unit"] == fired[0]["unit"] == "requests/min"
    assert end["window_seconds"] == fired[0]["window_seconds"]
    # back to normal: the rate it quotes is not above the effect-size floor of its expected
    assert end["observed"] is not None and end["expected"] is not None
    assert end["observed"] <= engine.settings.volume_min_ratio * end["expected"], end["message"]
    now, peak = end["message"].split("; peak ")
    assert f"{end['observed']:.1f} vs" in now, end["message"]
    # the in-alarm value (the loop's 6 a minute) only as the peak
    peak_rate = float(peak.split(" vs")[0].split()[-1])
    assert 5.5 <= peak_rate <= 7.0, end["message"]
    assert f"{peak_rate:.1f} vs" not in now
    assert "before" in now and "UTC" in now  # over which span the quoted rate was measured


def _verdict(kind: str, scope: str, at: float, impact: float, anomalous: bool = True) -> Verdict:
    share = kind == "tier_mix"
    return Verdict(
        kind=kind,  # type: ignore[arg-type]
        scope=scope,
        ts=T0 + timedelta(seconds=at),
        score=10.0 if anomalous else 0.0,
        is_anomaly=anomalous,
        expected=0.8 if share else 0.0013,
        observed=(0.55 if anomalous else 0.79) if share else (0.0042 if anomalous else 0.0013),
        unit="share" if share else "usd/request",
        metric="economy-tier share" if share else "cost per request",
        window_seconds=None,
        impact_usd_per_hour=impact if anomalous else 0.0,
    )


def _lifecycle(
    nests: Any, settings: DetectorSettings | None = None
) -> tuple[AlertManager, Correlator]:
    s = settings or DetectorSettings()
    manager = AlertManager(s)
    return manager, Correlator(s, nests, lambda narrow, wide, now: False, manager.refreshed)


def test_a_routing_regressions_incident_states_one_money_figure() -> None:
    """Probe W, incident 4: a feature's economy share 80 % -> 20 %. Its page (tier mix)
    said "$0.31/hour" (the share's drop x calls x the tiers' typical price gap), and the
    feature's cost alert, which joined the incident after the page, said "$0.99/hour" (its
    calls' extra cost): the same money, two figures, and the page's resolve again quoted
    the tier mix's. The later alert now says it is the incident's money as measured since
    the page, and the page's resolve states the incident's peak as best known."""
    manager, correlator = _lifecycle(lambda a, b: a == b or "global" in (a, b))
    out: list[dict[str, Any]] = []

    def feed(verdict: Verdict) -> None:
        nonlocal out
        out += correlator.process(manager.process(verdict), verdict.ts)
        out += correlator.process(manager.tick(verdict.ts), verdict.ts)

    feed(_verdict("tier_mix", "feature:code-assist", 0, 0.31))
    feed(_verdict("tier_mix", "feature:code-assist", 30, 0.31))  # past the hold: paged
    feed(_verdict("cost_per_request", "feature:code-assist", 60, 0.99))
    page = [a for a in out if a["incident_role"] == "primary" and a["status"] == "firing"]
    assert [a["kind"] for a in page] == ["tier_mix"]
    later = [a for a in out if a["kind"] == "cost_per_request" and a["status"] == "firing"]
    assert len(later) == 1 and later[0]["incident_role"] == "related"
    assert "$0.99/hour" in later[0]["message"]
    # it says what it is next to the page's figure
    assert "$0.31/hour" in later[0]["message"] and "paged" in later[0]["message"], later[0][
        "message"
    ]
    # back to normal: both resolve; the page's resolve states the incident's peak money
    for t in range(70, 130, 10):
        for kind in ("tier_mix", "cost_per_request"):
            feed(_verdict(kind, "feature:code-assist", t, 0.0, anomalous=False))
    for t in range(130, 1200, 60):
        now = T0 + timedelta(seconds=t)
        out += correlator.process(manager.tick(now), now)
    end = [a for a in out if a["incident_role"] == "primary" and a["status"] == "resolved"]
    assert len(end) == 1
    assert "$0.99/hour" in end[0]["message"], end[0]["message"]
    assert end[0]["details"]["incident_peak_impact_usd_per_hour"] == "0.99"


def test_historical_users_cost_alerts_state_their_money() -> None:
    """Probe W: history replayed into an agent that had seen later traffic (every call late
    for the request rates) fired users' cost alarms saying "about $0.0000/hour above
    expected" (impact 0.0): their rate detectors expect no calls, as they judge none.
    Session 13 gave features a fallback (the calls their tier costs remember), not users."""
    live = zipf_callers([CHAT], users=20, total_per_minute=20)
    hist = Feature("hist-chat", economy_share=0.7, prompt_median=500, sigma=0.6)
    history = [Caller(f"hx{i:02d}", hist, 0.8) for i in range(10)]
    now = T0 + timedelta(hours=6)
    engine = AnomalyEngine()
    run(engine, World(seed=8, callers=live).traffic(T0, now))
    world = World(seed=9, callers=history)
    start, end = now - timedelta(hours=1, minutes=45), now - timedelta(hours=1, minutes=15)
    rng = random.Random(99)
    by_user = {c.user: c for c in history}
    replayed = []
    for r in world.traffic(now - timedelta(hours=4), now - timedelta(hours=1)):
        if start <= r["ts"] < end and rng.random() < 0.5:
            r = world.call(rng, r["ts"], by_user[r["user_id"]], token_factor=8)
        replayed.append(r)
    alerts = run(engine, replayed) + engine.flush()
    assert engine.stats.late_records == len(replayed)
    users = [a for a in firing(alerts) if a["scope"].startswith("user:hx")]
    assert users, [a["message"] for a in firing(alerts)]
    for alert in users:
        # 0.8 calls a minute at about 2x the usual cost: cents an hour, not nothing
        assert alert["impact_usd_per_hour"] is not None
        assert alert["impact_usd_per_hour"] > 0.001, alert["message"]
        assert "$0.0000/hour" not in alert["message"]
    for alert in alerts:
        if alert["status"] == "resolved" and alert["scope"].startswith("user:hx"):
            assert "$0.0000/hour" not in alert["message"], alert["message"]


def test_a_users_late_cost_alarm_does_not_hold_its_features_page_open() -> None:
    """Probe W, incident 3: half of a feature's calls at 8x the prompt for 5 min. The
    feature was "back to normal since 01:22:41"; two users' cost alarms fired after that
    (01:23:01 at 1.5x, 01:25:57 at 2.5x, their calls ordinary: the evidence of the spike
    their alarms had gathered while the feature's alarm absorbed them) and joined its
    incident as related; the page's resolve waited for them: 01:34:10, 16 min after the
    spike ended (on a seeded world, a user's alarm fired 2 s before the feature's last
    anomalous call and held its page 13 min). A weak member (not critical) narrower than the
    page that joined after the page went out does not hold the page's resolve (it is
    published as related, and its resolve too)."""

    def nests(a: str, b: str) -> bool:
        return a == b or "global" in (a, b) or {a, b} == {"user:c03", "feature:chat"}

    settings = DetectorSettings()
    manager, correlator = _lifecycle(nests, settings)
    out: list[dict[str, Any]] = []

    def feed(verdict: Verdict) -> None:
        nonlocal out
        out += correlator.process(manager.process(verdict), verdict.ts)
        out += correlator.process(manager.tick(verdict.ts), verdict.ts)

    # the spike: the feature's cost alarm, 5 min; a user's stale alarm (3.2x, not critical)
    # fires 10 s before the feature's last anomalous call and keeps firing for 10 min
    for t in range(0, 1500, 10):
        if t < 300:
            feed(_verdict("cost_per_request", "feature:chat", t, 0.16))
        else:  # after it, the feature's calls are normal
            feed(_verdict("cost_per_request", "feature:chat", t + 5, 0.0, anomalous=False))
        if 280 <= t < 880:
            feed(_verdict("cost_per_request", "user:c03", t + 1, 0.01))
    ends = {
        (a["scope"], a["incident_role"]): a["ts"]
        for a in out
        if a["status"] == "resolved" and a["incident_key"]
    }
    spike_end = T0 + timedelta(seconds=290)
    page_end = ends[("feature:chat", "primary")]
    user_end = ends[("user:c03", "related")]
    assert page_end - spike_end <= timedelta(seconds=settings.resolve_after_seconds + 60)
    assert user_end > page_end  # the user's alarm is still reported, as related
    pages = [a for a in out if a["status"] == "firing" and a["incident_role"] == "primary"]
    assert [a["scope"] for a in pages] == ["feature:chat"]  # still one page


def test_durations_and_window_lengths_are_said_as_before() -> None:
    """One formatter for both: a duration is cut down to whole seconds, minutes under
    2 hours, then hours; a window's length (exact) is rounded to the second and said in
    minutes only when they are whole, never in hours."""
    said = {s: duration_text(timedelta(seconds=s)) for s in (0, 59.9, 119.9, 150, 7199, 7200, 9000)}
    assert said == {
        0: "0 s",
        59.9: "59 s",
        119.9: "119 s",
        150: "2 min",
        7199: "119 min",
        7200: "2.0 h",
        9000: "2.5 h",
    }
    windows = {
        s: duration_text(s, exact=True) for s in (60.0, 119.6, 120.0, 150.0, 900.0, 7200.0, 9000.4)
    }
    assert windows == {
        60.0: "60 s",
        119.6: "2 min",
        120.0: "2 min",
        150.0: "150 s",
        900.0: "15 min",
        7200.0: "120 min",
        9000.4: "150 min",
    }
