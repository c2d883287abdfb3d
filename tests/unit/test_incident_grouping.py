"""Grouping alerts into incidents (``agents.anomaly.incidents.Correlator``), alert by alert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agents.anomaly.incidents import Correlator
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
