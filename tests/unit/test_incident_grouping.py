"""Grouping alerts into incidents (``agents.anomaly.incidents.Correlator``), alert by alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agents.anomaly.incidents import Correlator
from agents.notifier import iso, pagerduty_payload
from app.alerts_config import AlertTarget
from app.anomaly_config import DetectorSettings

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def alert(kind: str, scope: str, at: float, impact: float = 10.0) -> dict[str, Any]:
    return {
        "alert_key": f"{kind}|{scope}",
        "kind": kind,
        "scope": scope,
        "status": "firing",
        "ts": T0 + timedelta(seconds=at),
        "message": f"{kind} on {scope}",
        "details": {},
        "impact_usd_per_hour": impact,
    }


def correlator(explains: bool = True) -> Correlator:
    def nests(a: str, b: str) -> bool:
        return a == b or "global" in (a, b)

    return Correlator(DetectorSettings(), nests, lambda narrow, wide, now: explains)


def pages(out: list[dict[str, Any]]) -> list[str]:
    return [a["scope"] for a in out if a.get("incident_role") == "primary"]


def test_a_narrower_alert_within_a_global_alerts_hold_joins_its_incident() -> None:
    """Session 13's probe: a feature's routing regression (economy share 80 % -> 5 %) fired
    `tier_mix global`, then `tier_mix feature:c2` 3 s later: two primary pages for one
    incident, because a narrower alert joined only incidents with a narrower member."""
    c = correlator()
    out = c.process([alert("tier_mix", "global", 0)], T0)
    out += c.process([alert("tier_mix", "feature:c2", 3, impact=9.0)], T0 + timedelta(seconds=3))
    out += c.tick(T0 + timedelta(seconds=60))
    assert pages(out) == ["feature:c2"]
    assert {a["incident_key"] for a in out} == {out[0]["incident_key"]}


def test_a_narrower_alert_after_a_global_page_is_its_own_incident() -> None:
    """A loop that starts after a global surge was paged is another incident (unchanged)."""
    c = correlator()
    out = c.process([alert("volume_spike", "global", 0)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    out += c.process([alert("volume_spike", "user:u1", 40)], T0 + timedelta(seconds=40))
    out += c.tick(T0 + timedelta(seconds=90))
    assert pages(out) == ["global", "user:u1"]


def test_two_narrower_alerts_in_a_global_alerts_hold_that_do_not_nest_stay_apart() -> None:
    """Two users' loops that start together with the global surge: the first joins the
    global alert's incident, the second (not nesting with the first) pages on its own."""
    c = correlator()
    out = c.process([alert("volume_spike", "global", 0)], T0)
    out += c.process([alert("volume_spike", "user:u1", 2)], T0 + timedelta(seconds=2))
    out += c.process([alert("volume_spike", "user:u2", 4)], T0 + timedelta(seconds=4))
    out += c.tick(T0 + timedelta(seconds=60))
    assert sorted(pages(out)) == ["user:u1", "user:u2"]


def test_a_user_alert_while_their_features_incident_is_still_open_joins_it() -> None:
    """Probe N (H1, seed 777): a feature's cost incident fired at 10:12 and resolved at
    12:35, yet a user of that feature paged at 11:30 and again at 12:25 as new incidents:
    an alert joined an incident only within ``incident_window_seconds`` of its last
    firing. An incident still open takes a nesting alert of its kind whenever it comes;
    once resolved, a later alert is a new incident (as before)."""

    def nests(a: str, b: str) -> bool:
        return a == b or "global" in (a, b) or {a, b} == {"user:u2", "feature:code"}

    c = Correlator(DetectorSettings(), nests, lambda narrow, wide, now: False)
    minute = 60.0
    out = c.process([alert("cost_per_request", "feature:code", 0)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    late = alert("cost_per_request", "user:u2", 78 * minute)
    out += c.process([late], late["ts"])
    out += c.tick(late["ts"] + timedelta(seconds=30))
    other_kind = alert("volume_spike", "user:u2", 100 * minute)  # not this incident's kind
    out += c.process([other_kind], other_kind["ts"])
    out += c.tick(other_kind["ts"] + timedelta(seconds=30))
    assert pages(out) == ["feature:code", "user:u2"]
    assert [a["incident_role"] for a in out if a["alert_key"] == late["alert_key"]] == ["related"]
    assert [a["kind"] for a in out if a.get("incident_role") == "primary"] == [
        "cost_per_request",
        "volume_spike",
    ]
    for key in ("cost_per_request|user:u2", "cost_per_request|feature:code"):
        resolved = {**alert(*key.split("|"), 150 * minute), "status": "resolved"}
        out += c.process([resolved], resolved["ts"])
    after = alert("cost_per_request", "user:u2", 200 * minute)
    out += c.process([after], after["ts"])
    out += c.tick(after["ts"] + timedelta(seconds=30))
    assert pages(out)[-1] == "user:u2"  # the incident had ended: a new one


def test_a_member_that_resolves_and_fires_again_keeps_its_incident_open() -> None:
    """A member of an open incident resolved and fired again (the incident's other member
    still firing): the incident counted it resolved, ended with the other member, and the
    member's next resolve found no incident to end (ValueError: the engine crashed on
    probe N's trace)."""

    def nests(a: str, b: str) -> bool:
        return a == b or {a, b} == {"user:u2", "feature:code"}

    c = Correlator(DetectorSettings(), nests, lambda narrow, wide, now: False)
    kind = "cost_per_request"

    def resolved(scope: str, at: float) -> dict[str, Any]:
        return {**alert(kind, scope, at), "status": "resolved"}

    out = c.process([alert(kind, "feature:code", 0)], T0)
    # (a small part of the feature's extra spend: the page names the feature)
    out += c.process([alert(kind, "user:u2", 10, impact=2.0)], T0 + timedelta(seconds=10))
    out += c.tick(T0 + timedelta(seconds=60))
    for event in (
        resolved("user:u2", 600),
        alert(kind, "user:u2", 900, impact=2.0),  # fires again while the feature still fires
        resolved("feature:code", 1200),  # not the end: user:u2 is firing
        resolved("user:u2", 1500),  # the end
    ):
        out += c.process([event], event["ts"])
    assert pages([a for a in out if a["status"] == "firing"]) == ["feature:code"]
    ends = [a for a in out if a["status"] == "resolved" and a["incident_role"] == "primary"]
    assert [a["ts"] for a in ends] == [T0 + timedelta(seconds=1500)]
    assert c.groups == []


def test_a_quiet_cost_incident_held_open_takes_no_other_alert() -> None:
    """Probe T: a cost incident is held open through its scope's silence (no calls judged
    normal yet). Session 20 tried that alone and, on the bench, quiet users' cost incidents
    held open took in their features' later alerts as related (3 of 48 incidents lost their
    page). A quiet member keeps its own incident, but takes no other alert; once it is
    anomalous again, it does."""

    def nests(a: str, b: str) -> bool:
        return a == b or "global" in (a, b) or {a, b} == {"user:u2", "feature:code"}

    quiet = {"cost_per_request|user:u2"}
    c = Correlator(
        DetectorSettings(), nests, lambda narrow, wide, now: False, quiet=quiet.__contains__
    )
    out = c.process([alert("cost_per_request", "user:u2", 0)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    # Ten minutes later, the user silent: their feature's routing and cost alerts page.
    out += c.process([alert("tier_mix", "feature:code", 600)], T0 + timedelta(seconds=600))
    out += c.tick(T0 + timedelta(seconds=630))
    assert pages(out) == ["user:u2", "feature:code"]
    # Anomalous again: the user's incident is live, and takes a nesting alert of its kind.
    quiet.clear()
    later = T0 + timedelta(hours=1)
    out = c.process([alert("cost_per_request", "feature:code", 3600)], later)
    out += c.tick(later + timedelta(seconds=30))
    assert [(a["scope"], a["incident_role"]) for a in out] == [("feature:code", "related")]


def test_a_users_cost_page_can_wait_for_its_features_building_alert() -> None:
    """Probe T (``incident_cost_wait_seconds``): the bench's search drift paged
    ``user:u0030`` ($0.04/hour), whose alarm fired 115 s before the feature's; the feature's
    alert joined as related. With a wait, while the feature's cost evidence builds, the
    user's page waits, the feature's alert joins, and the page names the feature (its money
    is most of it). Without evidence building, the user pages after the usual hold."""

    def nests(a: str, b: str) -> bool:
        return a == b or "global" in (a, b) or {a, b} == {"user:u30", "feature:search"}

    kind = "cost_per_request"
    settings = DetectorSettings(incident_cost_wait_seconds=180)
    c = Correlator(
        settings, nests, lambda narrow, wide, now: False, building=lambda scope, at: True
    )
    out = c.process([alert(kind, "user:u30", 0, impact=0.04)], T0)
    out += c.tick(T0 + timedelta(seconds=60))
    assert pages(out) == []
    out += c.process([alert(kind, "feature:search", 115, impact=1.66)], T0 + timedelta(seconds=115))
    out += c.tick(T0 + timedelta(seconds=140))
    assert pages(out) == ["feature:search"]
    assert {(a["scope"], a["incident_role"]) for a in out} == {
        ("feature:search", "primary"),
        ("user:u30", "related"),
    }

    c = Correlator(
        settings, nests, lambda narrow, wide, now: False, building=lambda scope, at: False
    )
    out = c.process([alert(kind, "user:u30", 0, impact=0.04)], T0)
    out += c.tick(T0 + timedelta(seconds=20))
    assert pages(out) == ["user:u30"]


def cost_alert(scope: str, at: float, observed: float, expected: float, impact: float) -> dict:
    return {
        **alert("cost_per_request", scope, at, impact),
        "observed": observed,
        "expected": expected,
    }


def nested(explains: bool) -> Correlator:
    """Users nest in their feature ``feature:f`` and everything in global."""

    def nests(a: str, b: str) -> bool:
        pair = {a.split(":")[0], b.split(":")[0]}
        return a == b or "global" in (a, b) or pair == {"user", "feature"}

    return Correlator(DetectorSettings(), nests, lambda narrow, wide, now: explains)


def test_a_user_far_further_from_normal_than_their_feature_is_the_cost_page() -> None:
    """Held-out bench (seed 11): a user's 14x cost shift ($8.83/hour above expected) moved
    their feature's cost too; the feature's figure was over 4/3 of the user's, so comparing
    money alone named the feature. A user at 14x in a feature at 4x is the cause; in a drift
    of the whole feature the users are about as far from normal as it is."""
    c = nested(explains=False)  # by calls, the user explains nothing
    out = c.process([cost_alert("user:u1", 0, 0.0137, 0.0010, 8.83)], T0)
    out += c.process([cost_alert("feature:f", 5, 0.0048, 0.0012, 12.5)], T0 + timedelta(seconds=5))
    out += c.tick(T0 + timedelta(seconds=60))
    assert pages(out) == ["user:u1"]
    drift = nested(explains=True)  # by calls, the heaviest user explains the feature
    out = drift.process([cost_alert("user:u2", 0, 0.0030, 0.0010, 0.44)], T0)
    out += drift.process(
        [cost_alert("feature:f", 5, 0.0036, 0.0012, 2.95)], T0 + timedelta(seconds=5)
    )
    out += drift.tick(T0 + timedelta(seconds=60))
    assert pages(out) == ["feature:f"]


def resolved(kind: str, scope: str, at: float, peak: float) -> dict[str, Any]:
    return {
        **alert(kind, scope, at),
        "status": "resolved",
        "message": f"resolved: {kind} on {scope}",
        "details": {"peak_impact_usd_per_hour": f"{peak:.4g}"},
    }


def test_a_later_alert_of_the_page_scope_with_far_more_money_pages_as_an_update() -> None:
    """Probe H's D8: a quiet user's loop whose first calls were gpt-4o paged as the user's
    cost per request ("3.3x, $0.0028/hour"); the loop's own volume alert of the same user
    ("393x, $0.49/hour") joined 3.5 minutes later as related, and no paging target heard of
    the loop. Now it pages as an update of the same incident and becomes its page: one
    incident key, one resolve (the new page's, once both resolved) stating the larger money."""
    c = correlator()
    out = c.process([alert("cost_per_request", "user:u054", 0, impact=0.0028)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    loop = alert("volume_spike", "user:u054", 240, impact=0.49)
    out += c.process([loop], T0 + timedelta(seconds=240))
    firing = [a for a in out if a["status"] == "firing"]
    assert [(a["kind"], a["incident_role"]) for a in firing] == [
        ("cost_per_request", "primary"),
        ("volume_spike", "primary"),
    ]
    assert len({a["incident_key"] for a in firing}) == 1
    update = firing[1]
    assert update["message"].startswith("escalated: volume_spike on user:u054")
    assert "$0.0028/hour above expected: this is its money" in update["message"]
    assert update["details"]["escalated_from"] == "cost_per_request|user:u054"
    at = T0 + timedelta(seconds=400)
    end = c.process([resolved("cost_per_request", "user:u054", 400, 0.0028)], at)
    assert [a["incident_role"] for a in end] == ["related"]
    at = T0 + timedelta(seconds=900)
    end = c.process([resolved("volume_spike", "user:u054", 900, 0.49)], at)
    assert [(a["kind"], a["incident_role"]) for a in end] == [("volume_spike", "primary")]
    assert end[0]["details"]["incident_peak_impact_usd_per_hour"] == "0.49"


def test_a_later_alert_of_the_page_scope_with_somewhat_more_money_stays_related() -> None:
    """Below ``incident_escalate_ratio`` (a routing regression's cost alert at 3x its tier
    mix's lagging figure, probe W) the later alert is related, naming the incident's money;
    and an escalation is of the page's own scope only."""
    c = correlator()
    out = c.process([alert("tier_mix", "feature:s", 0, impact=0.31)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    out += c.process([alert("cost_per_request", "feature:s", 200, impact=0.99)], T0)
    out += c.process([alert("volume_spike", "global", 210, impact=50.0)], T0)
    assert pages(out) == ["feature:s"]
    assert "this is its money" in out[-2]["message"]


def test_a_page_that_stated_no_money_escalates_once_and_only_for_money() -> None:
    """Session 25's review: a page stating $0 (an early tier-mix figure, an unpriced scope)
    escalated on every later alert of its scope, $0 ones too: three primary records."""
    c = correlator()
    out = c.process([alert("tier_mix", "feature:s", 0, impact=0.0)], T0)
    out += c.tick(T0 + timedelta(seconds=30))
    out += c.process([alert("cost_per_request", "feature:s", 200, impact=0.0)], T0)
    assert pages(out) == ["feature:s"], [a["incident_role"] for a in out]
    out += c.process([alert("volume_spike", "feature:s", 260, impact=0.4)], T0)
    out += c.process([alert("volume_drop", "feature:s", 300, impact=0.5)], T0)
    primary = [a for a in out if a["status"] == "firing" and a["incident_role"] == "primary"]
    assert [a["kind"] for a in primary] == ["tier_mix", "volume_spike"]


def test_no_escalation_after_the_page_resolved() -> None:
    """Session 25's review: an escalated primary published after the page's resolve reads as
    the incident reopening under the same key; it is related instead."""
    c = Correlator(
        DetectorSettings(),
        lambda a, b: a == b or "global" in (a, b) or {a, b} == {"feature:s", "user:u"},
        lambda narrow, wide, now: False,
    )
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731
    out = c.process([alert("tier_mix", "feature:s", 0, impact=0.5)], at(0))
    out += c.tick(at(30))
    out += c.process([alert("volume_spike", "user:u", 60, impact=0.1)], at(60))  # trails
    out += c.process([resolved("tier_mix", "feature:s", 120, 0.5)], at(120))
    assert any(a["status"] == "resolved" and a["incident_role"] == "primary" for a in out)
    late = c.process([alert("cost_per_request", "feature:s", 150, impact=6.0)], at(150))
    assert [a["incident_role"] for a in late] == ["related"], late


def test_a_page_named_by_a_user_stays_open_while_its_features_drift_fires() -> None:
    """Probe 57's D1: a feature's 3-hour cost drift paged as its heaviest user's cost alarm
    (``user:p57-u001``), the feature's alarm joining as related. The user's alarm resolved
    while the feature's still fired (its resolve held), then fired again (a new lifecycle)
    69 minutes later: the held resolve went out as the page's (``resolves_page``) under the
    page's own PagerDuty key, closing the page while the drift went on 2.5 hours, and the
    incident's resolve at the end carried the key of the second lifecycle, never triggered.
    Played into a PagerDuty target (the notifier's filters and ``dedup_key``): the page's key
    is resolved once, when the last member of its incident resolves, and no key is resolved
    that was not triggered."""
    c = nested(explains=True)
    kind = "cost_per_request"
    at = lambda s: T0 + timedelta(seconds=s)  # noqa: E731

    def fired(scope: str, s: float, impact: float) -> dict[str, Any]:
        return {**alert(kind, scope, s, impact), "first_seen": at(s)}

    def ended(scope: str, s: float, since: float) -> dict[str, Any]:
        return {**resolved(kind, scope, s, 0.07), "first_seen": at(since)}

    out = c.process([fired("user:p57-u001", 0, 0.06)], at(0))
    out += c.tick(at(60))  # the page: the user
    steps = [
        (fired("feature:chat", 95, 0.32), 95),  # the drift's feature joins, related
        (ended("user:p57-u001", 215, since=0), 215),  # the user resolves; the feature fires on
        (fired("user:p57-u001", 4144, 0.07), 4144),  # the user fires again (a new lifecycle)
        (ended("user:p57-u001", 4800, since=4144), 4800),
        (fired("user:p57-u001", 6800, 0.07), 6800),  # and again, still the drift
        (ended("feature:chat", 9151, since=95), 9151),  # the drift ends
        (ended("user:p57-u001", 9151, since=6800), 9151),  # the incident's last member
    ]
    pager = AlertTarget.model_validate(
        {"name": "pager", "url": "http://127.0.0.1:9/p", "format": "pagerduty", "routing_key": "k"}
    )
    events: list[tuple[float, str, str]] = []  # (when, trigger/resolve, dedup key)
    played = [(r, 60.0) for r in out]
    for event, when in steps:
        played += [(r, when) for r in c.process([event], at(when))]
    for record, when in played:
        if pager.accepts(record) and pager.declines(record) is None:
            payload = pagerduty_payload(record, "k")
            events.append((when, payload["event_action"], payload["dedup_key"]))
    triggered = [key for _, action, key in events if action == "trigger"]
    assert triggered == [f"{kind}|user:p57-u001@{iso(at(0))}"], events
    resolves = [(s, key) for s, action, key in events if action == "resolve"]
    assert len(resolves) == 1, events
    assert resolves[0][0] == 9151  # only when the drift (every member) is over
    assert resolves[0][1] == triggered[0]
    assert c.groups == []


def test_a_users_burst_on_one_feature_does_not_join_another_features_open_surge() -> None:
    """Probe 57 (seeds 1 and 2): user u042 called chat until 12:40, then burst at 3,000
    calls/min on code at 13:00, while a request-rate incident of ``feature:chat`` was still
    open. The user's alert joined chat's incident (the user called chat in the last hour)
    as ``related``; ``feature:code``'s alert paged alone, and the page named the feature,
    not the user whose burst it was. A user's request-rate alarm counts the calls it makes
    now: it joins a feature's request-rate incident only if it calls that feature now."""
    last_call = {("user:u42", "feature:chat"): -1200.0, ("user:u42", "feature:code"): 0.0}

    def nests(a: str, b: str) -> bool:  # u42 called both features in the last hour
        return a == b or "global" in (a, b) or "user:u42" in (a, b)

    def calls(user: str, feature: str, at: datetime) -> bool:
        seen = last_call.get((user, feature))
        seconds = DetectorSettings().incident_volume_feature_seconds
        return seen is not None and (at - T0).total_seconds() - seen <= seconds

    c = Correlator(DetectorSettings(), nests, lambda narrow, wide, now: True, calls=calls)
    out = c.process([alert("volume_spike", "feature:chat", -5400)], T0 - timedelta(seconds=5400))
    out += c.tick(T0 - timedelta(seconds=5300))
    assert pages(out) == ["feature:chat"]
    out = c.process([alert("volume_spike", "user:u42", 0)], T0)
    out += c.process([alert("volume_spike", "feature:code", 0)], T0)
    out += c.tick(T0 + timedelta(seconds=60))
    assert pages(out) == ["user:u42"]
    by_scope = {a["scope"]: a["incident_key"] for a in out if a["status"] == "firing"}
    assert by_scope["user:u42"] == by_scope["feature:code"]


def test_the_engine_says_a_user_calls_a_feature_only_if_recently() -> None:
    """The engine's side of the rule above: a user calls a feature now if its last call to
    it is within ``incident_volume_feature_seconds``; a feature never called, or a user
    never seen, is not called."""
    from agents.anomaly import AnomalyEngine
    from tests.anomaly_traffic import record

    engine = AnomalyEngine(DetectorSettings())
    engine.observe(record(T0, "u42", "chat", "gpt-4o-mini", 500, 100))
    engine.observe(record(T0 + timedelta(seconds=1200), "u42", "code", "gpt-4o-mini", 500, 100))
    at = T0 + timedelta(seconds=1200)
    assert engine.calls_feature("user:u42", "feature:code", at)
    assert not engine.calls_feature("user:u42", "feature:chat", at)
    assert engine.calls_feature("user:u42", "feature:chat", T0 + timedelta(seconds=60))
    assert not engine.calls_feature("user:u42", "feature:search", at)
    assert not engine.calls_feature("user:u7", "feature:chat", at)
